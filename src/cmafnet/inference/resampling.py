"""Inference at the training data's physical scale (one implementation for evaluate, predict and wsi).

A run was trained on patches of ``patch_hw`` pixels at ``patch_mpp`` microns per pixel (run.json;
see :func:`run_scale`). An input image of known µm/px is *resampled* to that scale (PIL area
averaging when shrinking, bicubic when enlarging) and *tiled* with the training patch size; tile
probabilities are aggregated per image (mean, or max of the positive class). This replaces the
"squeeze": resizing a whole 700x460 BreakHis field into the model's square input, a different
physical scale and aspect from what the model learned.

Tiles cover the resampled image with the fewest tiles, spread evenly (they overlap by less than a
tile where the size is not a multiple). An image smaller than one patch at the training scale is
padded with white (glass, as ingest pads IDC edge patches) when it covers at least
:data:`MIN_COVERAGE` of the patch, else it is not assessable at that scale.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmafnet.data import safety
from cmafnet.errors import ConfigError
from cmafnet.inference.temperature import apply_temperature

MIN_COVERAGE = 0.5  # an image must fill half a training patch at the training scale
AGGREGATES = ("mean", "max")
SMALLER_THAN_PATCH = "smaller_than_patch"
MPP_UNKNOWN = "mpp_unknown"
TOO_LARGE = "too_large"  # past the pixel cap once resampled


@dataclass(frozen=True)
class RunScale:
    """The physical scale a run was trained at."""

    mpp: float | None  # µm/px of the training images (None: unknown)
    tile_hw: tuple[int, int]  # training patch (H, W) in pixels
    source: str  # where the numbers come from

    def describe(self) -> str:
        mpp = f"{self.mpp:g} um/px" if self.mpp else "unknown um/px"
        return f"{mpp}, {self.tile_hw[0]}x{self.tile_hw[1]} px patches ({self.source})"


def run_scale(meta: dict) -> RunScale:
    """The training scale from run.json (``patch_mpp``, ``patch_hw`` / ``patch_px``).

    These are recorded by ``cmafnet evaluate`` from the training store (the run's ``store_hash``),
    or by the trainer. An IDC run without them falls back to the documented IDC scale.
    """
    from cmafnet.data.scale import IDC_MPP, IDC_MPP_SOURCE

    hw = meta.get("patch_hw")
    px = meta.get("patch_px")
    if isinstance(hw, (list, tuple)) and len(hw) == 2:
        tile_hw = (int(hw[0]), int(hw[1]))
    elif isinstance(px, (int, float)) and px > 0:
        tile_hw = (int(px), int(px))
    else:
        tile_hw = (50, 50) if meta.get("dataset") in (None, "idc") else None
    mpp = meta.get("patch_mpp")
    if isinstance(mpp, (int, float)) and mpp > 0 and tile_hw:
        return RunScale(float(mpp), tile_hw, str(meta.get("patch_scale_source") or "run.json patch_mpp"))
    if meta.get("dataset") in (None, "idc") and "patch_mpp" not in meta:
        return RunScale(IDC_MPP, tile_hw or (50, 50), f"run.json has no patch_mpp; {IDC_MPP_SOURCE}")
    reason = meta.get("patch_scale_source") or "run.json has no patch_mpp"
    return RunScale(None, tile_hw or (0, 0), str(reason))


def record_run_scale(run_dir: str | Path, meta: dict, store: Any, rows: np.ndarray | None = None) -> dict:
    """Write ``patch_mpp`` / ``patch_hw`` / ``patch_px`` into run.json from the run's training store.

    Only when the store is the one the run was trained on (same ``store_hash``) and run.json does
    not already state them (a trainer-written value wins). Returns the (possibly updated) meta.
    """
    from cmafnet.data.scale import store_scale
    from cmafnet.run import update_meta

    if "patch_mpp" in meta or meta.get("store_hash") != getattr(store, "store_hash", None):
        return meta
    mpp, hw, source = store_scale(store, rows)
    return update_meta(
        run_dir,
        patch_mpp=mpp,
        patch_hw=[int(hw[0]), int(hw[1])],
        patch_px=int(hw[0]) if hw[0] == hw[1] else None,
        patch_scale_source=source,
    )


def matching_scale(meta: dict, classes: list[str], mpp: float | None, aggregate: str) -> RunScale | None:
    """The run's training scale when inputs of ``mpp`` µm/px are to be matched to it, else None."""
    if mpp is None:
        return None
    from cmafnet.data.scale import check_mpp

    check_mpp(mpp, "--input-mpp")
    _check_aggregate(aggregate, len(classes))
    scale = run_scale(meta)
    if scale.mpp is None:
        raise ConfigError(f"--input-mpp: the run records no training scale to match ({scale.source})")
    return scale


def resize_image(image: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """Resize RGB uint8 to ``(W, H)``: area averaging (PIL BOX) when shrinking, bicubic when enlarging."""
    from PIL import Image

    h, w = image.shape[:2]
    if (w, h) == tuple(size_wh):
        return image
    method = Image.Resampling.BOX if size_wh[0] < w else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(image).resize(tuple(size_wh), method))


def resample(image: np.ndarray, src_mpp: float, dst_mpp: float) -> np.ndarray:
    """An RGB uint8 ``(H, W, 3)`` image from ``src_mpp`` to ``dst_mpp`` µm/px (same field of view).

    Raises:
        UnsafeFile: the resampled image would exceed the pixel cap (``CMAFNET_MAX_IMAGE_PIXELS``), the
            same rule as for a decoded image: a 50-px patch at 1000x enlargement is refused, not made.
    """
    f = float(src_mpp) / float(dst_mpp)  # output pixels per input pixel
    h, w = image.shape[:2]
    size = (max(1, round(w * f)), max(1, round(h * f)))
    cap = safety.limits().max_pixels
    if size[0] * size[1] > cap:
        raise safety.UnsafeFile(
            safety.TOO_LARGE,
            f"resampled from {src_mpp:g} to {dst_mpp:g} um/px it would be {size[0]} x {size[1]} pixels, "
            f"limit {cap:,} ({safety.MAX_PIXELS_ENV})",
        )
    return resize_image(image, size)


def tile_origins(length: int, tile: int) -> list[int]:
    """Start offsets of the fewest ``tile``-long windows covering ``length`` (evenly spread)."""
    if length <= tile:
        return [0]
    n = math.ceil(length / tile)
    return [round(x) for x in np.linspace(0, length - tile, n)]


def make_tiles(image: np.ndarray, tile_hw: tuple[int, int]) -> tuple[list[np.ndarray], str]:
    """Tiles of a resampled image and a status (``""`` = ok, or :data:`SMALLER_THAN_PATCH`)."""
    th, tw = tile_hw
    h, w = image.shape[:2]
    if h < th or w < tw:
        if (min(h, th) * min(w, tw)) / (th * tw) < MIN_COVERAGE:
            return [], SMALLER_THAN_PATCH
        canvas = np.full((max(h, th), max(w, tw), 3), 255, np.uint8)  # white = glass
        canvas[:h, :w] = image
        image, h, w = canvas, canvas.shape[0], canvas.shape[1]
    tiles = [image[y : y + th, x : x + tw] for y in tile_origins(h, th) for x in tile_origins(w, tw)]
    return [np.ascontiguousarray(t) for t in tiles], ""


def _check_aggregate(how: str, n_classes: int) -> None:
    if how not in AGGREGATES:
        raise ConfigError(f"--aggregate must be one of {AGGREGATES}, got {how!r}")
    if how == "max" and n_classes != 2:
        raise ConfigError("--aggregate max needs a binary run (max of the positive class)")


def aggregate(tile_probs: np.ndarray, how: str = "mean") -> np.ndarray:
    """One probability vector ``(C,)`` from ``(n_tiles, C)``: mean, or max of the positive class (binary)."""
    _check_aggregate(how, tile_probs.shape[1])
    if how == "mean":
        return tile_probs.mean(axis=0)
    p1 = float(tile_probs[:, 1].max())
    return np.array([1.0 - p1, p1])


@dataclass
class ScaledImage:
    """Scale-matched inference of one image: tile logits ``(n, C)`` or a reason why none."""

    logits: np.ndarray | None
    n_tiles: int
    resampled_hw: tuple[int, int]
    status: str = ""  # "" = predicted, else SMALLER_THAN_PATCH / MPP_UNKNOWN / TOO_LARGE
    error: str = ""  # with TOO_LARGE: why (an error, not an assessment)

    def probs(self, temperature: float, how: str = "mean") -> np.ndarray | None:
        if self.logits is None:
            return None
        return aggregate(apply_temperature(self.logits, temperature), how)


def predict_scaled(
    predictor: Any,
    images: Iterable[np.ndarray],
    mpps: Sequence[float | None],
    scale: RunScale,
) -> list[ScaledImage]:
    """Resample each image to the run's scale, tile it and return the tiles' uncalibrated logits
    (through the predictor's :meth:`~cmafnet.inference.predict.Predictor.logits_stream`)."""
    if scale.mpp is None:
        raise ConfigError(f"scale-matched inference needs the run's training scale: {scale.source}")
    out: list[ScaledImage] = []

    def tiles() -> Iterator[tuple[int, np.ndarray]]:  # (output index, tile) of every image in turn
        for img, mpp in zip(images, mpps):
            if mpp is None or not math.isfinite(mpp) or mpp <= 0:
                out.append(ScaledImage(None, 0, (0, 0), MPP_UNKNOWN))
                continue
            try:
                small = resample(img, mpp, scale.mpp)
            except safety.UnsafeFile as err:
                out.append(ScaledImage(None, 0, (0, 0), TOO_LARGE, str(err)))
                continue
            found, status = make_tiles(small, scale.tile_hw)
            out.append(ScaledImage(None, len(found), tuple(small.shape[:2]), status))
            yield from ((len(out) - 1, t) for t in found)

    per_image: dict[int, list[np.ndarray]] = {}
    for keys, logits in predictor.logits_stream(tiles()):  # logits (B, C), tiles in order
        for i, row in zip(keys, logits):
            per_image.setdefault(i, []).append(row)
    for i, rows in per_image.items():
        out[i].logits = np.stack(rows)  # (n_tiles, C)
    return out
