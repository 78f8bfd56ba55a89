"""The zero-shot diagnosis figure: score distributions per subtype and per magnification."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cmafnet.evaluation.zeroshot import _check_binary, _mag_key, group_scores


def _strip_box(
    ax: Any, values: list[np.ndarray], colors: list[str], positions: np.ndarray, width: float = 0.6
) -> None:
    """Box plots with jittered points (at most 300 per box, drawn as a fixed random subset)."""
    rng = np.random.default_rng(0)
    box = ax.boxplot(
        values, positions=positions, widths=width, showfliers=False, patch_artist=True, manage_ticks=False
    )
    for patch, c in zip(box["boxes"], colors):
        patch.set(facecolor=c, alpha=0.25, edgecolor=c)
    for median in box["medians"]:
        median.set(color="black", lw=1.2)
    for x, v, c in zip(positions, values, colors):
        shown = v if v.size <= 300 else rng.choice(v, 300, replace=False)
        ax.scatter(x + rng.uniform(-0.37, 0.37, shown.size) * width, shown, s=5, color=c, alpha=0.45, lw=0)


def plot_score_distributions(
    p_pos: np.ndarray,
    subtypes: np.ndarray | None,
    magnifications: np.ndarray | None,
    y: np.ndarray,
    path: Path,
    title: str,
) -> Path:
    """Score distributions per subtype and per magnification (benign / malignant), saved as PNG.

    Left: one box per subtype, benign subtypes first (blue), malignant (red); a subtype with both
    labels is grey. Right: per magnification, a benign and a malignant box side by side. The dashed
    line is the 0.5 threshold. A panel whose grouping is ``None`` is left out.

    Args:
        p_pos: ``(N,)`` probability of malignant.
        subtypes: ``(N,)`` subtype codes, or ``None``.
        magnifications: ``(N,)`` magnifications, or ``None``.
        y: ``(N,)`` 0/1 labels.
        path: the PNG to write (folders are created).
        title: the figure title.

    Returns:
        ``path``.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from cmafnet.evaluation.plots import figure_png

    colors = {0: "tab:blue", 1: "tab:red", None: "0.5"}
    y, p = _check_binary(y, p_pos)
    panels = [
        (n, np.asarray(g))
        for n, g in (("subtype", subtypes), ("magnification", magnifications))
        if g is not None
    ]
    for name, g in panels:
        if g.shape != p.shape:
            raise ValueError(f"{name}s must have shape {p.shape}, got {g.shape}")
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(5.5 * max(len(panels), 1), 4.2), squeeze=False)
    for ax, (name, g) in zip(axes[0], panels):
        if name == "subtype":
            code = {"benign": 0, "malignant": 1}
            rows = sorted(group_scores(p, g, y), key=lambda r: (code.get(r["label"], 2), str(r["group"])))
            keys = [r["group"] for r in rows]
            vals = [p[g == k] for k in keys]
            cols = [colors[code.get(r["label"])] for r in rows]
            ticks = [f"{k}\nn={v.size}" for k, v in zip(keys, vals)]
            pos = np.arange(len(keys), dtype=float)
            _strip_box(ax, vals, cols, pos)
            ax.set_xticks(pos, ticks, fontsize=8)
        else:
            mags = sorted(np.unique(g).tolist(), key=_mag_key)
            pos, vals, cols, tick_pos, ticks = [], [], [], [], []
            for i, m in enumerate(mags):
                for j, lab in enumerate((0, 1)):
                    sel = p[(g == m) & (y == lab)]
                    if sel.size:
                        pos.append(i + (j - 0.5) * 0.4)
                        vals.append(sel)
                        cols.append(colors[lab])
                tick_pos.append(i)
                ticks.append(f"{m}\nn={int(np.sum(g == m))}")
            _strip_box(ax, vals, cols, np.asarray(pos), width=0.35)  # two boxes per magnification
            ax.set_xticks(tick_pos, ticks, fontsize=8)
        ax.axhline(0.5, color="0.3", lw=0.8, ls="--")
        ax.set(ylim=(-0.02, 1.02), ylabel="p(malignant)", title=f"per {name}")
        ax.grid(alpha=0.3, axis="y")
    handles = [
        Patch(color=colors[0], alpha=0.5, label="benign"),
        Patch(color=colors[1], alpha=0.5, label="malignant"),
        Line2D([], [], color="0.3", lw=0.8, ls="--", label="threshold 0.5"),
    ]
    fig.suptitle(title, fontsize=10, x=0.02, ha="left")
    fig.legend(handles=handles, fontsize=8, ncol=3, loc="upper right", frameon=False)  # above the panels
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(figure_png(fig, dpi=110))
    return path
