"""The tables of a report: what run folders say, as :class:`~cmafnet.evaluation.table.TableResult` objects.

:func:`collect_run` reads a run folder (``run.json``, ``config.yaml``, ``metrics.csv``,
``metrics_<name>.json``, ``predictions_<name>.csv``). Each table has one row per run and evaluation
and columns declared here as data; a metric cell is the point estimate with its 95 % bootstrap
interval, ``93.3 [83.3, 100]``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmafnet.errors import ConfigError, RunFolderError
from cmafnet.evaluation.metrics import FRACTION_METRICS
from cmafnet.evaluation.rows import MIN_CI_PATIENTS, short_rule, threshold_rule
from cmafnet.evaluation.table import Column, TableResult, derive_cells, read_cell
from cmafnet.evaluation.tables_cost import run_facts
from cmafnet.run import CONFIG_FILE, METRICS_FILE, read_meta

log = logging.getLogger(__name__)

# the calibration table has ECE
BINARY_KEYS = ("sensitivity", "specificity", "balanced_accuracy", "f1", "mcc", "auprc", "auroc")
MULTI_KEYS = ("macro_f1", "weighted_f1", "balanced_accuracy", "mcc", "accuracy")
POINT = (
    Column("n", "images (patients)", "n", "text", paper=False),
    Column("threshold", "threshold", "threshold", "text", paper=False),
)
CI_NOTE = (
    "Cells: point estimate [95 % bootstrap interval, patients resampled with all their images]; "
    f"percent except {', '.join(FRACTION_METRICS)}. ⚠: fewer than {MIN_CI_PATIENTS} patients, "
    "too few independent clusters for the interval to be trusted."
)


def metric_columns(keys: Iterable[str], source: str = "metrics", ci: str | None = "ci") -> list[Column]:
    """One column per metric key: ``<source>.<key>``, its interval at ``<ci>.<key>``."""
    return [
        Column(k, k.upper() if k in FRACTION_METRICS else f"{k.replace('_', ' ')} (%)", f"{source}.{k}",
               "fraction" if k in FRACTION_METRICS else "percent", paper=False, ci=ci and f"{ci}.{k}")
        for k in keys
    ]  # fmt: skip


@dataclass
class RunInfo:
    """What a report needs from one run folder."""

    path: Path
    name: str
    model: str | None = None
    cost: dict | None = None  # tables_cost.run_facts: budget and training cost (None: none recorded)
    evaluations: dict[str, dict] = field(default_factory=dict)  # name -> metrics_<name>.json
    predictions: dict[str, tuple[Any, list[str]]] = field(default_factory=dict)  # name -> (frame, classes)
    history: Any = None  # DataFrame of metrics.csv or None


def _read_object(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RunFolderError(f"{path}: not readable JSON ({str(err).splitlines()[0][:120]})") from None
    if not isinstance(doc, dict):
        raise RunFolderError(f"{path}: not a JSON object")
    return doc


def collect_run(run_dir: str | Path) -> RunInfo:
    """Read a run folder; an unreadable metrics or predictions file is a one-line error."""
    import pandas as pd

    from cmafnet.config import yaml_load
    from cmafnet.evaluation.evaluate import load_predictions

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir}: run folder not found")
    facts = run_facts(read_meta(run_dir))
    cfg_path = run_dir / CONFIG_FILE
    try:
        config = (yaml_load(cfg_path.read_text(), str(cfg_path)) or {}) if cfg_path.exists() else {}
    except ConfigError as err:  # the run folder's own file: a fault there is the folder's
        raise RunFolderError(str(err)) from None
    model = (config.get("model") or {}).get("name") if isinstance(config, dict) else None
    info = RunInfo(run_dir, facts.name or run_dir.name, model, facts.cost)
    for p in sorted(run_dir.glob("metrics_*.json")):
        info.evaluations[p.stem.removeprefix("metrics_")] = _read_object(p)
    for p in sorted(run_dir.glob("predictions_*.csv")):
        info.predictions[p.stem.removeprefix("predictions_")] = load_predictions(p)
    if (hist := run_dir / METRICS_FILE).exists():
        try:
            info.history = pd.read_csv(hist)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError) as err:
            log.warning("%s: unreadable (%s); no training curves", hist, err)
    return info


def ev_label(name: str, ev: dict) -> str:
    """An evaluation's name with its scale mode when it is not the plain squeeze."""
    return f"{name} (scale-matched)" if (ev.get("scale") or {}).get("mode") == "match" else name


def row_label(run: RunInfo, name: str, ev: dict) -> str:
    """``run`` for its test evaluation, ``run / evaluation`` for any other."""
    return run.name if name == "test" else f"{run.name} / {ev_label(name, ev)}"


def _evaluations(runs: Sequence[RunInfo], binary: bool | None = None) -> Iterable[tuple[RunInfo, str, dict]]:
    for run in runs:
        for name, ev in run.evaluations.items():
            if binary is None or (len(ev.get("classes") or []) == 2) == binary:
                yield run, name, ev


def _point(ev: dict, operating: bool) -> dict:
    """One row's document: the operating point's (or the 0.5 / argmax) metrics and intervals."""
    binary = len(ev.get("classes") or []) == 2
    op = ev.get("operating_point") if operating else None
    src = op or ev
    n_pat = ev.get("n_patients")
    warn = " ⚠" if n_pat is not None and n_pat < MIN_CI_PATIENTS and src.get("ci") else ""
    return {"n": f"{ev.get('n')}" + ("" if n_pat is None else f" ({n_pat}{warn})"),
            "threshold": f"{op['value']:.4f}" if op else short_rule(None, binary),
            "metrics": src.get("metrics") or {}, "ci": src.get("ci") or {}}  # fmt: skip


def runs_table(
    name: str,
    title: str,
    columns: Sequence[Column],
    items: Iterable[tuple[str, dict]],
    notes: Sequence[str] = (),
) -> TableResult:
    """A table with one row per ``(label, document)``; the columns read the document."""
    table = TableResult(name, title, "run", list(columns), notes=list(notes))
    for label, doc in items:
        cells = {c.key: read_cell(c, [doc]) for c in columns if not c.derive}
        derive_cells(columns, cells, None, None)
        table.rows.append((label, cells))
    return table


def comparison_tables(runs: Sequence[RunInfo]) -> list[TableResult]:
    """The comparison a reader came for: every run at its operating threshold, at 0.5, and multi-class."""
    tables = []
    ops = [(r, n, ev) for r, n, ev in _evaluations(runs, True) if ev.get("operating_point")]
    if ops:
        rules = [f"{row_label(r, n, ev)}: the {threshold_rule(ev['operating_point'])}" for r, n, ev in ops]
        items = [(row_label(r, n, ev), _point(ev, True)) for r, n, ev in ops]
        tables.append(runs_table("operating", "Binary: every run at its operating threshold",
                                 [POINT[1], *metric_columns(BINARY_KEYS)], items, [*rules, CI_NOTE]))  # fmt: skip
    binary = [(row_label(r, n, ev), _point(ev, False)) for r, n, ev in _evaluations(runs, True)]
    if binary:
        ranking = ("auprc", "auroc") if ops else ()  # the same at any threshold: in the table above
        note = "AUPRC and AUROC do not depend on the threshold: see the table above." if ranking else ""
        cols = [POINT[0], *metric_columns(k for k in BINARY_KEYS if k not in ranking)]
        tables.append(runs_table("threshold_0.5", "Binary: every run at threshold 0.5 (the untuned default)",
                                 cols, binary, [CI_NOTE, *([note] if note else [])]))  # fmt: skip
    multi = list(_evaluations(runs, False))
    if multi:
        items = [(row_label(r, n, ev), _point(ev, False)) for r, n, ev in multi]
        tables.append(runs_table("multiclass", "Multi-class: every run (argmax)",
                                 [POINT[0], *metric_columns(MULTI_KEYS)], items, [CI_NOTE]))  # fmt: skip
        classes = list(dict.fromkeys(c for _, _, ev in multi for c in ev.get("classes") or []))
        cols = [Column(c, c, f"metrics.per_class_recall.{c}", paper=False) for c in classes]
        tables.append(runs_table("per_class_recall", "Multi-class: recall (%) per class", cols,
                                 [(row_label(r, n, ev), ev) for r, n, ev in multi]))  # fmt: skip
    return tables


def _mag_point(entry: dict, op: dict | None) -> dict:
    """A magnification's metrics and intervals: at the operating threshold when there is one, else 0.5."""
    prefix = "operating_" if op else ""
    return {"metrics": entry.get(f"{prefix}metrics") or {}, "ci": entry.get(f"{prefix}ci") or {}}


def magnification_tables(runs: Sequence[RunInfo]) -> list[TableResult]:
    """Per magnification: one row per run, evaluation and magnification, at the operating threshold."""
    tables = []
    for binary, keys in ((True, BINARY_KEYS), (False, MULTI_KEYS)):
        items = []
        for r, n, ev in _evaluations(runs, binary):
            op = ev.get("operating_point") if binary else None
            for mag, e in (ev.get("by_magnification") or {}).items():
                doc = {"n": e.get("n"), "threshold": short_rule(op, binary), **_mag_point(e, op)}
                items.append((f"{row_label(r, n, ev)} / {mag}", doc))
        if items:
            title = f"Per magnification ({'binary' if binary else 'multi-class'})"
            tables.append(runs_table(f"magnification_{'binary' if binary else 'multiclass'}", title,
                                     [*POINT, *metric_columns(keys)], items, [CI_NOTE]))  # fmt: skip
    return tables


def zero_shot_table(runs: Sequence[RunInfo]) -> list[TableResult]:
    """Table 3's layout: zero-shot sensitivity per magnification at the operating threshold, mean and std.

    Table 3 does not name its metric; Fig. 5 and Section 6.4 quote its CMAF-Net values as sensitivity,
    so sensitivity is shown (docs/decisions/evaluation.md).
    """
    items, mags = [], []
    for r, n, ev in _evaluations(runs, True):
        if not ev.get("zero_shot") or not ev.get("by_magnification"):
            continue
        op = ev.get("operating_point")
        by_mag = {m: _mag_point(e, op) for m, e in ev["by_magnification"].items()}
        mags += [m for m in by_mag if m not in mags]
        items.append((row_label(r, n, ev), {"threshold": short_rule(op), "mag": by_mag}))
    if not items:
        return []
    cols = [POINT[1], *(Column(m, m.replace("X", "×"), f"mag.{m}.metrics.sensitivity", ci=f"mag.{m}.ci.sensitivity",
                               paper=False) for m in mags),
            Column("average", "average", derive="mean", of=tuple(mags), paper=False),
            Column("std", "std", derive="std", of=tuple(mags), paper=False)]  # fmt: skip
    note = (
        "Sensitivity (%) per magnification; average and std (ddof=1) over magnifications. A plain evaluation "
        "resizes each whole image into the model input; 'scale-matched' resamples it to the training microns "
        "per pixel and tiles it with the training patch size (images smaller than half a patch at that scale "
        "are excluded; the per-magnification table gives the n)."
    )
    return [runs_table("zero_shot", "Zero-shot BreakHis (Table 3 layout)", cols, items, [note, CI_NOTE])]


def _ci_cell(m: dict) -> str:
    v, ci = m.get("value"), m.get("ci")
    if v is None:
        return "n/a"
    return f"{100 * v:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


DIAGNOSIS_KEYS = ("sensitivity", "specificity", "balanced_accuracy", "auroc", "auprc")


def diagnosis_tables(runs: Sequence[RunInfo]) -> list[TableResult]:
    """Every zero-shot evaluation's diagnosis: its metrics with patient-level intervals beside the trivial
    rows, the verdict, and the mean score per subtype (which tissue the model takes for cancer)."""
    evs = [(row_label(r, n, ev), ev) for r, n, ev in _evaluations(runs, True) if ev.get("diagnosis")]
    if not evs:
        return []
    head = [
        "evaluation",
        "adaptation",
        "prevalence (%)",
        *(k.upper() if k.startswith("au") else k.replace("_", " ") for k in DIAGNOSIS_KEYS),
        "verdict",
    ]
    rows = [
        [label, (ev.get("adaptation") or {}).get("label", "raw"), f"{100 * ev['diagnosis']['prevalence']:.1f}",
         *(_ci_cell(ev["diagnosis"]["metrics"][k]) for k in DIAGNOSIS_KEYS), ev["diagnosis"]["verdict"]]
        for label, ev in evs
    ]  # fmt: skip
    for name, t in evs[0][1]["diagnosis"]["trivial"].items():
        rows.append(
            [name.replace("_", " "), "", "", *(f"{100 * t[k]:.1f}" for k in DIAGNOSIS_KEYS), "trivial"]
        )
    tables = [
        TableResult.plain(
            "diagnosis", "Zero-shot diagnosis (%, 95 % patient-level bootstrap intervals)", head, rows
        )
    ]
    subtypes = [(label, ev["diagnosis"].get("by_subtype") or []) for label, ev in evs]
    kind = {s["group"]: (s["label"] or "?")[0].upper() for _, rows in subtypes for s in rows}
    if kind:
        order = sorted(kind, key=lambda s: (kind[s], s))  # benign subtypes first
        means = [{s["group"]: s["mean"] for s in rows} for _, rows in subtypes]
        tables.append(TableResult.plain(
            "diagnosis_subtypes", "Mean p(malignant) per subtype (B benign, M malignant)",
            ["evaluation", *(f"{s} ({kind[s]})" for s in order)],
            [[label, *(m.get(s) for s in order)] for (label, _), m in zip(evs, means)],
        ))  # fmt: skip
    return tables


CALIBRATION = (
    Column("n", "images", "n", "count", paper=False),
    Column("temperature", "temperature", "temperature", "sig3", paper=False),
    *(Column(k, k.replace("_", " ").replace("ece", "ECE").replace("brier", "Brier"), k, "fraction", paper=False)
      for k in ("ece_before", "ece_after", "brier_before", "brier_after")),
)  # fmt: skip


def calibration_table(runs: Sequence[RunInfo]) -> list[TableResult]:
    """Temperature, ECE and Brier before / after calibration of every evaluation."""
    items = [
        (row_label(r, n, ev), ev["calibration"]) for r, n, ev in _evaluations(runs) if ev.get("calibration")
    ]
    note = (
        "Temperature scaling: one scalar T fitted on the run's validation split by NLL; probabilities = "
        "softmax(logits / T). It never changes a decision or a ranking metric, only what the probability "
        "means. ECE: top-label, equal-width bins; Brier: positive class (binary only)."
    )
    return (
        [runs_table("calibration", "Calibration (temperature scaling)", CALIBRATION, items, [note])]
        if items
        else []
    )
