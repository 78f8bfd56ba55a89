"""The figure that goes with each table (matplotlib, Agg): ours as bars/solid lines, the paper's as markers/dashes.

Table 1 -> the paper's Fig. 2 (sensitivity, balanced accuracy, AUPRC per method); Table 2 -> Fig. 3
(sensitivity against imbalance ratio). The other tables get the plot that reads them best.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cmafnet.evaluation.paper import paper_value


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _paper_num(cell: Any, scale: float) -> float:
    v = paper_value(cell, "fraction")  # as printed
    return np.nan if v is None else v * scale


def _ours(table: Any, row: int, key: str) -> float:
    c = table.rows[row][1].get(key)
    return np.nan if c is None or c.mean is None else c.mean


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


def grouped_bars(
    table: Any, keys: list[str], path: Path, *, ylabel: str, rows: list[int] | None = None
) -> Path:
    """Bars = ours (mean, error bar = std), black ticks = paper, one group per row."""
    plt = _plt()
    rows = list(range(len(table.rows))) if rows is None else rows
    x = np.arange(len(rows))
    width = 0.8 / max(len(keys), 1)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) * len(keys)), 4))
    for j, key in enumerate(keys):
        ours = [_ours(table, r, key) for r in rows]
        err = [table.rows[r][1][key].std or 0 if key in table.rows[r][1] else 0 for r in rows]
        paper = [
            _paper_num(table.rows[r][1][key].paper, 1.0) if key in table.rows[r][1] else np.nan for r in rows
        ]
        pos = x - 0.4 + width * (j + 0.5)
        ax.bar(pos, ours, width, yerr=err, label=f"{dict(table.columns).get(key, key)} (ours)")
        ax.plot(pos, paper, "k_", markersize=12, mew=2, label="paper" if j == 0 else None)
    ax.set_xticks(x, [table.rows[r][0] for r in rows], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{table.name}: ours (bars) vs paper (black ticks)", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path)


def lines(
    table: Any, keys: list[str], path: Path, *, xlabel: str, ylabel: str, rows: list[int] | None = None
) -> Path:
    """One line per row over ``keys`` (columns): ours solid, paper dashed in the same colour."""
    plt = _plt()
    rows = list(range(len(table.rows))) if rows is None else rows
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(len(keys))
    for r in rows:
        label, cells = table.rows[r]
        ours = [_ours(table, r, k) for k in keys]
        paper = [_paper_num(cells[k].paper, 1.0) if k in cells else np.nan for k in keys]
        (ln,) = ax.plot(x, ours, "o-", label=f"{label} (ours)")
        ax.plot(x, paper, "s--", color=ln.get_color(), alpha=0.5, label=f"{label} (paper)")
    ax.set_xticks(x, [dict(table.columns).get(k, k) for k in keys])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def _fig1(t: Any, p: Path) -> Path:
    return grouped_bars(t, ["sensitivity", "balanced_accuracy"], p, ylabel="%")


def _fig2(t: Any, p: Path) -> Path:
    rows = list(range(len(t.rows) - 1))  # without the retention row
    return lines(
        t,
        [k for k, _ in t.columns],
        p,
        xlabel="majority:minority (training split)",
        ylabel="sensitivity (%)",
        rows=rows,
    )


def _fig3(t: Any, p: Path) -> Path:
    return grouped_bars(t, ["40X", "100X", "200X", "400X"], p, ylabel="zero-shot sensitivity (%)")


def _fig4(t: Any, p: Path) -> Path:
    return grouped_bars(t, ["macro_f1", "balanced_accuracy"], p, ylabel="%")


def _fig5(t: Any, p: Path) -> Path:
    return grouped_bars(t, [k for k, _ in t.columns], p, ylabel="recall (%)")


def _fig6(t: Any, p: Path) -> Path:
    return grouped_bars(t, ["sensitivity", "balanced_accuracy"], p, ylabel="%")


def _fig7(t: Any, p: Path) -> Path:
    return grouped_bars(t, ["convergence_epoch"], p, ylabel="convergence epoch")


def _fig8(t: Any, p: Path) -> Path:
    return grouped_bars(t, ["params_m", "flops_g", "memory_gb"], p, ylabel="M params / GMACs / GiB")


FIGURES: dict[str, Callable[[Any, Path], Path | None]] = {
    "table1": _fig1,
    "table2": _fig2,
    "table3": _fig3,
    "table4": _fig4,
    "table5": _fig5,
    "table6": _fig6,
    "table7": _fig7,
    "table8": _fig8,
}


def _cell_tuple(cell: Any, to_fraction: bool) -> tuple[float, float] | None:
    if cell is None or cell.mean is None:
        return None
    k = 0.01 if to_fraction else 1.0
    return (cell.mean * k, (cell.std or 0.0) * k)


def paper_style_figure(table: Any, path: Path) -> Path | None:
    """The paper's own figure for Tables 1 and 2 (Fig. 2, Fig. 3), drawn by ``cmafnet.evaluation.plots``.

    Ours only (mean ± std over seeds), in the paper's style; ``figure.png`` has the comparison with
    the paper's numbers.
    """
    from cmafnet.evaluation import plots

    if table.name == "table1":
        data = {}
        for label, cells in table.rows:
            row = {
                "sensitivity": _cell_tuple(cells.get("sensitivity"), True),
                "balanced_accuracy": _cell_tuple(cells.get("balanced_accuracy"), True),
                "auprc": _cell_tuple(cells.get("auprc"), False),
            }
            data[label] = {k: v for k, v in row.items() if v is not None}
        fig = plots.plot_method_comparison(data)
    elif table.name == "table2":
        data = {
            label: {k: v for k, _ in table.columns if (v := _cell_tuple(cells.get(k), False)) is not None}
            for label, cells in table.rows[:-1]  # without the retention row
        }
        fig = plots.plot_imbalance_degradation(data, metric="sensitivity (%)")
    else:
        return None
    return _save(fig, path)
