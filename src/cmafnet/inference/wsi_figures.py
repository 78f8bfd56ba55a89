"""Readable whole-slide outputs: the tile partition, slide-level scores and the heatmap figure.

Every tile of the grid falls in exactly one category, so the counts add up to the tile total:

* ``background``: glass on the thumbnail (never read) or on the tile itself;
* ``not assessable``: pen / ink, or too little tissue to classify;
* ``classified positive`` / ``classified negative``: at the operating threshold.
"""

from __future__ import annotations

import io
from collections import Counter
from typing import Any

import numpy as np

from cmafnet.inference.tissue import NOT_ASSESSABLE

BACKGROUND = "background"
NOT_ASSESSABLE_CAT = "not assessable"
POSITIVE = "classified positive"
NEGATIVE = "classified negative"
CATEGORIES = (BACKGROUND, NOT_ASSESSABLE_CAT, POSITIVE, NEGATIVE)


def tile_category(row: dict, positive: str) -> str:
    """The one category of a ``tiles.csv`` row (see the module docstring)."""
    if row.get("status") == "ok":
        return POSITIVE if row.get("decision") == positive else NEGATIVE
    flags = str(row.get("flags") or "")
    return BACKGROUND if f"{NOT_ASSESSABLE}:background" in flags.split(";") else NOT_ASSESSABLE_CAT


def partition(rows: list[dict], positive: str) -> dict[str, Any]:
    """Counts per category (summing to ``len(rows)``) and the not-assessable reasons."""
    cats = [tile_category(r, positive) for r in rows]
    reasons = Counter(
        f.split(":", 1)[1]
        for r, cat in zip(rows, cats)
        if cat == NOT_ASSESSABLE_CAT
        for f in str(r.get("flags") or "").split(";")
        if f.startswith(f"{NOT_ASSESSABLE}:")
    )
    counts = Counter(cats)
    return {**{c: counts[c] for c in CATEGORIES}, "total": len(rows), "not_assessable_reasons": dict(reasons)}


def partition_line(p: dict[str, Any]) -> str:
    """``35 tiles = 12 background + 8 not assessable (pen 3, low_tissue 5) + 4 positive + 11 negative``."""
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(p["not_assessable_reasons"].items()))
    return (
        f"{p['total']} tiles = {p[BACKGROUND]} background + {p[NOT_ASSESSABLE_CAT]} not assessable"
        + (f" ({reasons})" if reasons else "")
        + f" + {p[POSITIVE]} classified positive + {p[NEGATIVE]} classified negative"
    )


def slide_scores(
    classified: list[dict],
    prob_key: str,
    positive: str,
    *,
    top_k: int,
    tile_mm2: float | None,
    tissue_mm2: float | None,
) -> dict[str, Any]:
    """A slide's numbers from its classified tiles (``status == "ok"``), for a cohort summary.

    Areas count the tissue in each tile (its ``thumb_tissue`` fraction of the thumbnail mask), so the
    area called positive never exceeds the tissue area; ``positive_fraction`` is that area over the
    classified tiles' tissue (the tissue the model assessed). ``prob_top_k`` is the mean of the
    ``top_k`` highest positive-class probabilities (all of them when fewer). Areas are None when the
    slide states no microns per pixel (``tile_mm2`` / ``tissue_mm2`` None), the other scores None when
    no tile was classified.
    """
    probs = np.sort(np.array([float(r[prob_key]) for r in classified]))[::-1]
    tissue = np.array([float(r["thumb_tissue"]) for r in classified])
    called = np.array([r["decision"] == positive for r in classified], dtype=bool)
    pos_tiles = float(tissue[called].sum())  # positive tissue in tile units
    return {
        "tissue_area_mm2": None if tissue_mm2 is None else round(tissue_mm2, 6),
        "positive_area_mm2": None if tile_mm2 is None else round(pos_tiles * tile_mm2, 6),
        "positive_fraction": pos_tiles / float(tissue.sum()) if tissue.sum() > 0 else None,
        "prob_mean": float(probs.mean()) if len(probs) else None,
        "prob_top_k": float(probs[:top_k].mean()) if len(probs) else None,
    }


def heatmap_figure(
    thumb: np.ndarray,
    overlay: np.ndarray,
    *,
    title: str,
    positive: str,
    threshold: float,
    calibration: str,
    counts: dict[str, Any],
) -> bytes:
    """PNG of the overlay with a colour bar (probability) and a legend of the tile categories."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Patch

    h, w = thumb.shape[:2]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(2 * 6.0 * min(1.6, w / h) + 1.5, 6.4))
    ax0.imshow(thumb)
    ax0.set_title("slide (thumbnail)")
    ax1.imshow(overlay)
    ax1.set_title(f"P({positive}), threshold {threshold:.3g}")
    for ax in (ax0, ax1):
        ax.set_axis_off()
    sm = ScalarMappable(norm=Normalize(0, 1), cmap=matplotlib.colormaps["jet"])
    bar = fig.colorbar(sm, ax=ax1, fraction=0.046, pad=0.02)
    bar.set_label(f"probability of '{positive}' ({calibration})")
    bar.ax.axhline(threshold, color="white", lw=2)
    bar.ax.axhline(threshold, color="black", lw=1, ls="--")
    legend = [
        Patch(facecolor="none", edgecolor="grey", label=f"no colour: background ({counts[BACKGROUND]}) or "
              f"not assessable ({counts[NOT_ASSESSABLE_CAT]})"),
        Patch(facecolor="red", alpha=0.45, label=f"classified tiles ({counts[POSITIVE] + counts[NEGATIVE]}): colour "
              "= probability"),
        Patch(facecolor="white", edgecolor="black", ls="--", label=f"dashed line on the bar: threshold "
              f"({counts[POSITIVE]} positive, {counts[NEGATIVE]} negative)"),
    ]  # fmt: skip
    fig.legend(handles=legend, loc="lower center", ncol=1, fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def heatmap_overlay(
    thumb: np.ndarray, grid: np.ndarray, cols_rows: tuple[int, int], size0: int, thumb_ds: float
) -> np.ndarray:
    """Blend the positive-probability grid (rows, cols; NaN = not classified) over the thumbnail.

    ``size0`` is a tile's edge in level-0 pixels, ``thumb_ds`` the thumbnail's downsample from level 0.
    """
    import matplotlib
    from PIL import Image

    cmap = matplotlib.colormaps["jet"]
    h, w = thumb.shape[:2]
    rgba = cmap(np.nan_to_num(grid, nan=0.0))  # (rows, cols, 4) in [0, 1]
    rgba[..., 3] = np.where(np.isnan(grid), 0.0, 0.45)
    # Upsample the grid to the covered thumbnail area with nearest neighbour (one colour per tile).
    cov_w, cov_h = (round(n * size0 / thumb_ds) for n in cols_rows)
    over = Image.fromarray((rgba * 255).astype(np.uint8), "RGBA").resize(
        (max(cov_w, 1), max(cov_h, 1)), Image.Resampling.NEAREST
    )
    base = Image.fromarray(thumb).convert("RGBA")
    layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    layer.paste(over, (0, 0))
    return np.asarray(Image.alpha_composite(base, layer).convert("RGB"))


def png_bytes(arr: np.ndarray) -> bytes:
    """An RGB or grey uint8 array as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
