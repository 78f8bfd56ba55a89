"""The equal-compute view of Tables 1 and 2 (``--match-compute``): rows, training-MACs cells, the figure.

Every baseline row is shown twice: trained for the paper's epochs ("equal epochs") and trained for the
training MACs its CMAF-Net run of the same seed (and imbalance column) recorded ("CMAF-Net's compute").
Training MACs are what each run folder records (``run.json`` ``cost.total.macs``: forward MACs per image
x images x passes x 3, a SAM step being two passes). The figure puts every finished run on one plot:
balanced accuracy and AUPRC against its training MACs (log scale).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cmafnet.evaluation.table import Column
from cmafnet.experiments.paper_tables import matched_row_key, view_label
from cmafnet.experiments.results import ResultDoc
from cmafnet.experiments.spec import Row, RunSpec, Scale, TableDef

MACS_NOTE = (
    "Training MACs: what each run recorded (forward MACs per image x training images x passes x 3; a SAM "
    "step is two passes), mean ± std over seeds. '(equal epochs)' rows train for the paper's epochs, "
    "'(CMAF-Net's compute)' rows for the training MACs of the CMAF-Net run of the same seed (early stopping "
    "can end either sooner); the paper's numbers sit beside the equal-epoch rows only. Table 2: 'MACs "
    "<ratio>' is the training MACs of that column's runs."
)


@dataclass(frozen=True)
class ViewRow:
    """One printed row: its label, the run row key it reads, and the paper row it sits beside (if any)."""

    label: str
    key: str
    paper: Row | None


def view_rows(table: TableDef, match_compute: bool) -> list[ViewRow]:
    """The rows to print: each baseline twice with ``match_compute`` (equal epochs, then matched)."""
    if not match_compute or table.compute_reference is None:
        return [ViewRow(r.name, r.key, r) for r in table.rows]
    ref = next(r for r in table.rows if r.key == table.compute_reference)
    out = []
    for r in table.rows:
        if r.recipe.base != "baseline":
            out.append(ViewRow(r.name, r.key, r))
            continue
        out.append(ViewRow(view_label(r.name, None), r.key, r))
        out.append(ViewRow(view_label(r.name, ref.recipe.label), matched_row_key(r.key, ref.key), None))
    return out


EXTRACTION_NOTE = (
    "Probe rows: a frozen backbone embeds the training and validation images once (forward MACs x images, no "
    "backward; 'of which extraction') and a linear head trains on the embeddings; the backbone's pretraining "
    "is not counted. Other rows extract nothing (0)."
)


def compute_columns(table: TableDef, foundation: bool = False) -> tuple[Column, ...]:
    """The recorded training MACs of a table's runs: one column, or one per imbalance ratio (Table 2);
    with probe rows (``foundation``) also the part a probe spent embedding its images."""
    if len(table.ratios) == 1:
        macs = Column("train_macs", "Training MACs", "cost.macs", "sig3", paper=False)
        extraction = Column(
            "extraction_macs", "of which extraction", "cost.extraction_macs", "sig3", paper=False
        )
        return (macs, extraction) if foundation else (macs,)
    return tuple(
        Column(f"train_macs {c.key}", f"MACs {c.key}", "cost.macs", "sig3", paper=False, ratio=c.ratio)
        for c in table.columns
    )


def training_macs(doc: ResultDoc) -> float | None:
    """A result's recorded training MACs (``load_results`` adds ``cost``), or None."""
    v = (doc.cost or {}).get("macs")
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 else None


# ------------------------------------------------------------------------------------------ figure
def _model_label(spec: RunSpec) -> str:
    """The method a run belongs to, without the view (both views of ResNet-50 share a colour)."""
    return spec.label.rsplit(" (", 1)[0] if spec.match is not None else spec.label


def compute_figure(
    results: list[tuple[RunSpec, Any]], path: Path, title: str, reference_row: str | None
) -> Path | None:
    """Balanced accuracy and AUPRC against training MACs, one point per finished run; None without any.

    Colour = method; marker = view (circle: equal epochs, triangle: at CMAF-Net's compute, star: the
    reference rows themselves). One pair of panels per imbalance column that has finished runs.
    """
    from cmafnet.evaluation.plots import plt

    points = [
        (s, d, m) for s, d in results if isinstance(d, ResultDoc) and (m := training_macs(d)) is not None
    ]
    if not points:
        return None
    columns = list(dict.fromkeys(s.column for s, _, _ in points))
    methods = list(dict.fromkeys(_model_label(s) for s, _, _ in points))
    others = [
        m for m in methods if not any(s.row == reference_row and _model_label(s) == m for s, _, _ in points)
    ]
    colours = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(others)}
    colours.update({m: "black" for m in methods if m not in colours})  # the reference stands out
    fig, axes = plt.subplots(len(columns), 2, figsize=(13, 1 + 3.6 * len(columns)), squeeze=False)
    for r, col in enumerate(columns):
        for c, (key, name) in enumerate((("balanced_accuracy", "balanced accuracy (%)"), ("auprc", "AUPRC"))):
            ax = axes[r][c]
            for s, d, macs in points:
                y = d.metrics.get(key)
                if s.column != col or not isinstance(y, (int, float)) or not np.isfinite(y):
                    continue
                marker = "^" if s.match else ("*" if s.row == reference_row else "o")
                ax.scatter(macs, 100 * y if key == "balanced_accuracy" else y, color=colours[_model_label(s)],
                           marker=marker, s=110 if marker == "*" else 40, alpha=0.85,
                           zorder=3 if marker == "*" else 2)  # fmt: skip
            ax.set_xscale("log")
            ax.set_xlabel("training MACs (log scale)")
            ax.set_ylabel(name)
            ax.set_title(f"{name}{'' if col is None else f', training ratio {col}'}", fontsize=9)
            ax.grid(alpha=0.3, which="both")
    handles = [plt.Line2D([], [], ls="", marker="o", color=colours[m], label=m) for m in methods]
    handles += [
        plt.Line2D([], [], ls="", marker=k, color="grey", label=v)
        for k, v in (("o", "equal epochs"), ("^", "at CMAF-Net's compute"), ("*", "CMAF-Net (reference)"))
    ]
    fig.legend(handles=handles, loc="center right", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.8, 1))  # the legend takes the right fifth
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compute_points(results: list[tuple[RunSpec, Any]]) -> list[dict[str, Any]]:
    """The figure's points as records (run, method, view, column, seed, training MACs, metrics)."""
    return [{
        "run": s.run_id, "row": s.row, "label": s.label, "column": s.column, "seed": s.seed,
        "match": s.match, "train_macs": training_macs(d),
        **{k: d.metrics.get(k) for k in ("balanced_accuracy", "auprc")},
    } for s, d in results if isinstance(d, ResultDoc)]  # fmt: skip


def write_compute_outputs(
    name: str, results: list[tuple[RunSpec, Any]], folder: Path, scale: Scale
) -> dict[str, Path]:
    """``compute.json`` (every finished run's training MACs and metrics) and ``compute.png`` in ``folder``."""
    from cmafnet.experiments.paper_tables import get_table
    from cmafnet.run import write_json

    paths = {"compute_json": folder / "compute.json"}
    write_json(paths["compute_json"], {"table": name, "scale": scale, "runs": compute_points(results)})
    title = f"{name}: test metrics against training compute (one point per run)"
    fig = compute_figure(results, folder / "compute.png", title, get_table(name).compute_reference)
    if fig is not None:
        paths["compute_figure"] = fig
    return paths
