"""Physical scale of stored images: microns per pixel (µm/px), per image and per store.

Every store records the µm/px of each stored image (``index.csv`` column ``mpp``; empty when
unknown) and a store-level summary in ``meta.json`` (``mpp``: the value when all images share it,
else null; ``mpp_by_magnification``; ``mpp_source``: where the numbers come from). A value is the
source image's µm/px times the resize factor of ingest (``--size``); white padding changes nothing.

Documented values (sources and caveats in ``docs/decisions/data.md``):

* IDC: 50x50 patches at an apparent 2.5x, cut from 40x scans downsampled 16:1 (Janowczyk &
  Madabhushi 2016; Cruz-Roa et al. 2014). The sources state no µm/px: 0.25 µm/px at 40x (the usual
  Aperio 40x pixel) is an *assumption*, giving 4.0 µm/px.
* BreakHis: Spanhol et al. 2016 give the magnifications (objective 4x/10x/20x/40x with a 10x
  eyepiece = 40X...400X) and the optics, not a pixel size. The values below are our *assumption*:
  the camera cell (6.5 µm) over the objective times the 3.3x relay lens.
* Folder data: ``--mpp`` (or a manifest ``mpp`` column); otherwise unknown.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from cmafnet.errors import CmafnetError, ConfigError, RunFolderError

IDC_MPP = 4.0  # assumption: 0.25 µm/px at 40x, downsampled 16:1 to the patches' 2.5x
IDC_MPP_SOURCE = (
    "IDC documented scale: 2.5x patches of 40x scans (Janowczyk & Madabhushi 2016); "
    "4.0 um/px assumes 0.25 um/px at 40x (not stated by the source)"
)
BREAKHIS_CAMERA_CELL_UM = 6.5  # Samsung SCC-131AN, 1/3" CCD cell width
BREAKHIS_RELAY = 3.3  # relay lens between microscope and camera
BREAKHIS_MPP = {
    mag: round(BREAKHIS_CAMERA_CELL_UM / (BREAKHIS_RELAY * mag / 10), 4) for mag in (40, 100, 200, 400)
}  # 40X 0.4924, 100X 0.197, 200X 0.0985, 400X 0.0492 um/px
BREAKHIS_MPP_SOURCE = (
    "BreakHis ASSUMPTION: camera cell 6.5 um / (objective x relay 3.3) from the optics in Spanhol "
    "et al. 2016, which state no pixel size; pass --mpp (the 40X value) to override"
)
ANISOTROPY_TOLERANCE = 0.01  # a resize changing the aspect by more than 1% is counted in meta
# Physical µm/px accepted anywhere (a source, a stored image, a slide, a target): 10 nm is 5x finer than
# BreakHis 400X's assumed 0.049 (the finest pixel here) and far below optical resolution; 100 µm/px is
# coarser than a whole slide's 1000-px thumbnail. Outside it a value is a unit slip (nm, mm) or garbage.
MPP_RANGE = (0.01, 100.0)


def breakhis_mpp(magnification: int, mpp_40x: float | None = None) -> float:
    """µm/px of a native BreakHis image: the documented assumption, or ``mpp_40x`` scaled by 40/M.

    All four magnifications share one camera and relay lens, so the pixel size is inversely
    proportional to the objective's magnification.
    """
    if mpp_40x is None:
        return BREAKHIS_MPP[int(magnification)]
    return float(mpp_40x) * 40.0 / float(magnification)


def magnification_number(value: Any) -> int:
    """40, '40', '40X', 40.0 -> 40; anything else (IDC's -1, '') -> -1."""
    try:
        return int(float(str(value).strip().upper().rstrip("X")))
    except ValueError:
        return -1


def check_mpp(value: Any, what: str = "--mpp", error: type[CmafnetError] = ConfigError) -> float:
    """A µm/px value within :data:`MPP_RANGE`, else ``error`` (one line naming ``what``)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise error(f"{what} must be a number of microns per pixel, got {value!r}") from None
    lo, hi = MPP_RANGE
    if not lo <= v <= hi:  # NaN fails too
        raise error(f"{what} must be {lo:g} to {hi:g} microns per pixel, got {value!r}")
    return v


def stored_mpp(
    src_mpp: float | None,
    orig_hw: tuple[int, int],
    out_hw: tuple[int, int],
    canvas_hw: tuple[int, int],
    resize_any: bool,
) -> tuple[float | None, bool]:
    """µm/px of a stored image from its source µm/px, and whether the resize was anisotropic.

    Mirrors :meth:`cmafnet.data.validation.SizePolicy.place`: an image at the store size is kept,
    a smaller one is padded to the canvas (no scale change) and the canvas is resized to the store
    size; with ``resize_any`` the image itself is resized. An anisotropic resize gets the geometric
    mean of the two axes' pixel sizes.
    """
    if src_mpp is None or not math.isfinite(src_mpp):
        return None, False
    if tuple(orig_hw) == tuple(out_hw):
        return float(src_mpp), False
    ref_h, ref_w = orig_hw if resize_any else canvas_hw
    fy, fx = ref_h / out_hw[0], ref_w / out_hw[1]
    aniso = abs(fx / fy - 1.0) > ANISOTROPY_TOLERANCE
    return float(src_mpp) * math.sqrt(fx * fy), aniso


def store_mpp_summary(mpp: np.ndarray, magnification: np.ndarray) -> dict[str, Any]:
    """``meta.json`` fields from per-image µm/px (NaN = unknown): ``mpp``, ``mpp_by_magnification``, counts."""
    vals = np.asarray(mpp, dtype=np.float64)
    known = np.isfinite(vals)
    out: dict[str, Any] = {"mpp": None, "n_mpp_unknown": int((~known).sum())}
    if known.any():
        lo, hi = float(vals[known].min()), float(vals[known].max())
        if known.all() and hi - lo <= 1e-6 * hi:
            out["mpp"] = round(lo, 6)
        out["mpp_range"] = [round(lo, 6), round(hi, 6)]
    nums = np.array([magnification_number(x) for x in magnification], dtype=np.int64)
    if (known & (nums > 0)).any():
        out["mpp_by_magnification"] = {
            f"{m}X": round(float(np.median(vals[known & (nums == m)])), 6)
            for m in np.unique(nums[known & (nums > 0)])
        }
    return out


def image_mpp(store: Any, rows: np.ndarray | None = None) -> np.ndarray:
    """Per-image µm/px of a store (NaN where unknown), for ``rows`` (default all).

    Reads the ``mpp`` column; a store ingested before the column existed falls back to its
    ``meta.json`` ``mpp``, then to the documented values of its dataset (IDC, BreakHis by
    magnification) at the stored size. A recorded value outside :data:`MPP_RANGE` is a
    ``RunFolderError``.
    """
    index, folder = store.index, store.path
    rows = np.arange(len(index)) if rows is None else np.asarray(rows)
    if "mpp" in index.columns:
        col = np.asarray(index["mpp"].replace("", np.nan), dtype=np.float64)
        return _in_range(col[rows], rows, f"{folder}/index.csv column mpp")
    if isinstance(store.meta.get("mpp"), (int, float)):
        return _in_range(np.full(len(rows), float(store.meta["mpp"])), rows, f"{folder}/meta.json mpp")
    _, w = store.image_size
    if store.dataset == "idc":
        return np.full(len(rows), IDC_MPP * 50.0 / w)
    if store.dataset == "breakhis":
        mags = index["magnification"].to_numpy()[rows]
        nums = [magnification_number(m) for m in mags]
        return np.array([breakhis_mpp(m) * 700.0 / w if m in BREAKHIS_MPP else np.nan for m in nums])
    return np.full(len(rows), np.nan)


def _in_range(vals: np.ndarray, rows: np.ndarray, where: str) -> np.ndarray:
    """``vals`` (NaN = unknown) if every known one is within :data:`MPP_RANGE`, else ``RunFolderError``
    naming the first image past it (a store ingested before the range was enforced)."""
    lo, hi = MPP_RANGE
    bad = np.flatnonzero(np.isfinite(vals) & ((vals < lo) | (vals > hi)))
    if bad.size:
        raise RunFolderError(
            f"{where}: image {int(rows[bad[0]])} is {vals[bad[0]]:g} microns per pixel, outside {lo:g} to "
            f"{hi:g}; re-ingest the store with a correct --mpp"
        )
    return vals


def store_scale(store: Any, rows: np.ndarray | None = None) -> tuple[float | None, tuple[int, int], str]:
    """The scale of a training store's images: (µm/px if all agree, patch (H, W), description)."""
    vals = image_mpp(store, rows)
    hw = store.image_size
    src = store.meta.get("mpp_source", "store")
    if vals.size == 0 or not np.isfinite(vals).all():
        return None, hw, f"training store has no microns per pixel for some images ({src})"
    lo, hi = float(vals.min()), float(vals.max())
    if hi - lo > 1e-6 * hi:
        return None, hw, f"training images vary in scale ({lo:g} to {hi:g} um/px): no single training scale"
    return lo, hw, f"training store: {src}"
