"""Figures for reports and experiments (matplotlib, Agg backend: no display needed).

Every function returns a :class:`matplotlib.figure.Figure`; :func:`figure_png` turns one into
PNG bytes (the report embeds them as base64 ``data:`` URIs).
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless; must precede pyplot

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from pandas.api.types import is_bool_dtype, is_numeric_dtype
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_curve

# Validation metrics worth a curve (not counts, thresholds or Brier).
VAL_CURVES = (
    "balanced_accuracy",
    "auprc",
    "auroc",
    "sensitivity",
    "specificity",
    "f1",
    "mcc",
    "macro_f1",
    "ece",
)
_COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    """PNG bytes of ``fig``; the figure is closed afterwards (no leak across many reports)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plot_curves(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], kind: str, title: str = "") -> Figure:
    """ROC (``kind="roc"``) or precision-recall (``"pr"``) curves, one line per ``name -> (y_true, p_positive)``.

    Precision-recall draws each curve's prevalence (a classifier at chance) as a dotted line.
    """
    fig, ax = plt.subplots(figsize=(5.2, 4.4))
    for k, (name, (y, s)) in enumerate(curves.items()):
        y, s, color = np.asarray(y), np.asarray(s), _COLORS[k % len(_COLORS)]
        if len(np.unique(y)) < 2:
            continue  # ROC/PR undefined with one class; the metrics table says so
        if kind == "roc":
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, color=color, label=f"{name} (AUROC {auc(fpr, tpr):.3f})")
        else:
            prec, rec, _ = precision_recall_curve(y, s)
            ax.plot(rec, prec, color=color, label=f"{name} (AP {average_precision_score(y, s):.3f})")
            ax.axhline(float(np.mean(y)), color=color, lw=0.6, ls=":")
    if kind == "roc":
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--")
        ax.set(xlabel="1 - specificity (FPR)", ylabel="sensitivity (TPR)")
    else:
        ax.set(xlabel="recall (sensitivity)", ylabel="precision")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), title=title or ("ROC" if kind == "roc" else "Precision-recall"))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="lower right" if kind == "roc" else "lower left")
    fig.tight_layout()
    return fig


def plot_confusion(
    panels: Sequence[tuple[str, Sequence[Sequence[float]]]],
    class_names: Sequence[str],
    *,
    normalize: bool = False,
    title: str = "",
) -> Figure:
    """Confusion matrices (rows = true class) side by side, one per ``(name, matrix)``: counts, e.g.
    overall + each magnification (Fig. 5 style; a binary panel names its sensitivity), or row-normalised
    with a colour bar (Fig. 6 style)."""
    n, k = len(class_names), len(panels)
    size = max(3.6, 0.65 * n + 1.6)
    figsize = (size * k, size * 0.9) if normalize else (3.4 * k, 3.3)
    fig, axes = plt.subplots(1, k, figsize=figsize, squeeze=False)
    for ax, (name, cm) in zip(axes[0], panels):
        m = np.asarray(cm, dtype=np.float64)
        sens = m[1, 1] / m[1].sum() if m.shape == (2, 2) and m[1].sum() and not normalize else None
        if normalize:
            rows = m.sum(axis=1, keepdims=True)
            m = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
        im = ax.imshow(m, cmap="Blues", vmin=0, vmax=1 if normalize else max(m.max(), 1))
        ax.set_xticks(
            range(n), labels=list(class_names), rotation=45 if n > 2 else 0, ha="right" if n > 2 else "center"
        )
        ax.set_yticks(range(n), labels=list(class_names))
        ax.set(xlabel="predicted", ylabel="true")
        thresh = (1 if normalize else m.max()) / 2
        for i in range(n):
            for j in range(n):
                text = f"{m[i, j]:.2f}" if normalize else f"{int(m[i, j])}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8 if n > 4 else 10,
                        color="white" if m[i, j] > thresh else "black")  # fmt: skip
        if normalize:
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        ax.set_title(name + (f"\nsensitivity {100 * sens:.2f}%" if sens is not None else ""), fontsize=10)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_training_curves(df: Any, title: str = "") -> Figure | None:
    """Loss terms, validation metrics, information monitors and learning rate per epoch (``metrics.csv``).

    Columns are found by name: ``*loss*`` and loss-term columns (``train_*``), ``val_<metric>``
    for the metrics in ``VAL_CURVES``, ``mi_*`` / ``i_*`` information monitors, ``lr*``.
    Returns ``None`` when there is nothing to plot.
    """
    if df is None or len(df) == 0:
        return None
    x_col = next((c for c in ("epoch", "global_epoch", "step") if c in df.columns), None)
    x = df[x_col].to_numpy() if x_col else np.arange(len(df))
    numeric = [c for c in df.columns if c != x_col and is_numeric_dtype(df[c]) and not is_bool_dtype(df[c])]
    losses = [
        c for c in numeric if "loss" in c or (c.startswith("train_") and not c.endswith(("_n", "grad_norm")))
    ]
    vals = [c for c in numeric if c.startswith("val_") and c[4:] in VAL_CURVES]
    info = [c for c in numeric if c.startswith("mi_") or c.startswith("i_")]
    # the learning rate and the effective learning rate per class (lr x the class's mean loss weight)
    lrs = [c for c in numeric if c == "lr" or c.startswith(("lr_", "eff_lr_")) or c.endswith("_lr")]
    panels = [
        (n, cols)
        for n, cols in (
            ("loss terms", losses),
            ("validation", vals),
            ("information monitors", info),
            ("learning rate", lrs),
        )
        if cols
    ]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, (name, cols) in zip(axes[0], panels):
        for c in cols[:12]:  # more lines are unreadable
            ax.plot(x, df[c].to_numpy(dtype=float), label=c, marker="." if len(x) < 30 else None)
        ax.set(xlabel=x_col or "row", title=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if name == "learning rate":
            ax.set_yscale("log")
        elif name in ("loss terms", "information monitors"):
            # terms differ by orders of magnitude (KL vs. a 0.005-weighted redundancy) and may be < 0
            ax.set_yscale("symlog", linthresh=1e-2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if "stage" in df.columns:  # stage boundaries as vertical lines
        st = df["stage"].to_numpy()
        for i in np.flatnonzero(st[1:] != st[:-1]):
            for ax in axes[0]:
                ax.axvline(x[i + 1], color="0.5", lw=0.8, ls="--")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _head_columns(columns: Sequence[str], prefix: str) -> list[tuple[int, str]]:
    """``(head, column)`` for columns like ``attn_entropy_h0`` / ``tau_h3`` / ``tau_3`` / ``tau/3``."""
    return sorted((int(m.group(1)), c) for c in columns if (m := re.fullmatch(rf"{prefix}[_/]?h?(\d+)", c)))


def plot_attention_heads(df: Any, title: str = "") -> Figure | None:
    """Fig. 4: per-head attention entropy and temperature (last epoch), and their evolution.

    Reads ``attn_entropy_h<i>`` / ``entropy_h<i>`` and ``tau_h<i>`` columns; tolerant of either
    being absent. Returns ``None`` when neither exists.
    """
    if df is None or len(df) == 0:
        return None
    cols = list(df.columns)
    ent = _head_columns(cols, "attn_entropy") or _head_columns(cols, "entropy")
    tau = _head_columns(cols, "tau") or _head_columns(cols, "temperature")
    if not ent and not tau:
        return None
    x_col = "epoch" if "epoch" in df.columns else None
    x = df[x_col].to_numpy() if x_col else np.arange(len(df))
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.8))
    last = df.iloc[-1]
    if ent:
        heads = [h for h, _ in ent]
        ax0.plot(heads, [float(last[c]) for _, c in ent], "o-", color="tab:blue", label="attention entropy")
        ax0.set_ylabel("mean attention entropy (nats)", color="tab:blue")
    if tau:
        axt = ax0.twinx()
        heads = [h for h, _ in tau]
        axt.plot(heads, [float(last[c]) for _, c in tau], "s-", color="tab:orange", label="temperature τ")
        axt.set_ylabel("temperature τ", color="tab:orange")
    ax0.set(xlabel="head", title="per head (last epoch)")
    ax0.grid(alpha=0.3)
    for h, c in tau or ent:
        ax1.plot(x, df[c].to_numpy(dtype=float), label=f"h{h}")
    ax1.set(xlabel=x_col or "row", title=("τ" if tau else "entropy") + " per head over training")
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7, ncol=2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def table_figure(
    table: Any,
    kind: str,
    keys: Sequence[str],
    path: Path,
    *,
    rows: Sequence[str],
    ylabel: str,
    xlabel: str = "",
) -> Path:
    """A table's figure, ours beside the paper's, written to ``path``.

    ``bars``: one group per row, a bar per column in ``keys`` (ours: mean, error bar = std; the paper's:
    black ticks). ``lines``: one line per row over the columns ``keys`` (ours solid, the paper's dashed).

    Args:
        table: a :class:`~cmafnet.evaluation.table.TableResult`.
        rows: the labels of the rows to draw.
    """
    from cmafnet.evaluation.paper import paper_value

    cells = dict(table.rows)
    headers = {c.key: c.header for c in table.columns}

    def ours(row: str, key: str) -> tuple[float, float]:
        c = cells[row].get(key)
        return (np.nan, 0.0) if c is None or c.mean is None else (c.mean, c.std or 0.0)

    def paper(row: str, key: str) -> float:
        c = cells[row].get(key)
        v = paper_value(c.paper) if c is not None else None
        return np.nan if v is None else v

    x = np.arange(len(rows) if kind == "bars" else len(keys))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) * len(keys)), 4) if kind == "bars" else (7, 4))
    if kind == "bars":
        width = 0.8 / max(len(keys), 1)
        for j, key in enumerate(keys):
            pos = x - 0.4 + width * (j + 0.5)
            mean, err = zip(*(ours(r, key) for r in rows), strict=True)
            ax.bar(pos, mean, width, yerr=err, label=f"{headers.get(key, key)} (ours)")
            ax.plot(pos, [paper(r, key) for r in rows], "k_", markersize=12, mew=2,
                    label="paper" if j == 0 else None)  # fmt: skip
        ax.set_xticks(x, list(rows), rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{table.name}: ours (bars) vs paper (black ticks)", fontsize=9)
    else:
        colours, k = plt.get_cmap("tab20").colors, 0
        for r in rows:
            mean, err = zip(*(ours(r, key) for key in keys), strict=True)
            theirs = [paper(r, key) for key in keys]
            if not np.isfinite([*mean, *theirs]).any():
                continue  # neither ours nor the paper's: nothing to draw
            c = colours[(2 * k) % 20 + (k // 10) % 2]  # the dark shades first, then the light ones
            k += 1
            if np.isfinite(mean).any():
                ax.errorbar(x, mean, yerr=err, marker="o", capsize=3, color=c, label=f"{r} (ours)")
            if np.isfinite(theirs).any():
                ax.plot(x, theirs, "s--", color=c, alpha=0.45, label=f"{r} (paper)")
        ax.set_xticks(x, [headers.get(k, k) for k in keys])
    ax.set(xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the axes, never over data
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(figure_png(fig, dpi=120))
    return path


def plot_reliability(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray]], n_bins: int = 10, title: str = ""
) -> Figure:
    """Reliability diagram: observed frequency vs mean predicted probability, before/after calibration.

    ``curves`` maps a name to ``(y_true01, p_uncalibrated, p_calibrated)`` where ``y_true01`` is
    the event (positive class, or "top label correct" for multi-class) and the probabilities are
    the model's for that event. Bins are equal-width (``sklearn.calibration.calibration_curve``).
    """
    from sklearn.calibration import calibration_curve

    fig, axes = plt.subplots(1, len(curves), figsize=(4.6 * len(curves), 4.3), squeeze=False)
    for ax, (name, (y, p0, p1)) in zip(axes[0], curves.items()):
        ax.plot([0, 1], [0, 1], ls=":", color="grey", label="perfect calibration")
        for p, label, color in (
            (p0, "uncalibrated (T = 1)", _COLORS[1]),
            (p1, "temperature-scaled", _COLORS[0]),
        ):
            frac, mean = calibration_curve(y, p, n_bins=n_bins, strategy="uniform")
            ax.plot(mean, frac, marker="o", color=color, label=label)
        ax.set(
            xlim=(0, 1),
            ylim=(0, 1),
            xlabel="mean predicted probability",
            ylabel="observed frequency",
            title=name,
        )
        ax.legend(loc="upper left", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
