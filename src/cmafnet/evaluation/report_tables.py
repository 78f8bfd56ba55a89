"""The tables of a report: what one or more run folders say, as rows (no drawing, no HTML).

:func:`collect_run` reads a run folder (``run.json``, ``config.yaml``, ``metrics.csv``,
``metrics_<name>.json``, ``predictions_<name>.csv``); every ``*_tables`` function turns a list of
runs into :class:`Table` objects plus the plain data behind them (for ``report.json``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cmafnet.errors import ConfigError, RunFolderError
from cmafnet.evaluation.metrics import FRACTION_METRICS, format_metric, format_metric_for
from cmafnet.evaluation.paper import format_paper_cell, paper_table, paper_value
from cmafnet.evaluation.rows import short_rule, threshold_rule
from cmafnet.evaluation.stats import aggregate_seeds, format_mean_std, mean_std
from cmafnet.run import METRICS_FILE, read_meta

log = logging.getLogger(__name__)

BINARY_COLUMNS = ("sensitivity", "specificity", "balanced_accuracy", "auprc", "auroc", "mcc", "f1", "ece")
MULTI_COLUMNS = ("macro_f1", "weighted_f1", "balanced_accuracy", "mcc", "accuracy", "ece")


@dataclass
class RunInfo:
    """What a report needs from one run folder."""

    path: Path
    name: str
    meta: dict
    config: dict
    evaluations: dict[str, dict] = field(default_factory=dict)  # name -> metrics_<name>.json
    predictions: dict[str, Path] = field(default_factory=dict)  # name -> predictions_<name>.csv
    history: Any = None  # DataFrame of metrics.csv or None


def collect_run(run_dir: str | Path) -> RunInfo:
    """Read a run folder's metadata, evaluations and training history (tolerant of missing parts)."""
    import pandas as pd

    from cmafnet.config import yaml_load

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir}: run folder not found")
    meta = read_meta(run_dir)
    cfg_path = run_dir / "config.yaml"
    try:
        config = (yaml_load(cfg_path.read_text(), str(cfg_path)) or {}) if cfg_path.exists() else {}
    except ConfigError as err:  # the run folder's own file: a fault there is the folder's
        raise RunFolderError(str(err)) from None
    info = RunInfo(path=run_dir, name=str(meta.get("name") or run_dir.name), meta=meta, config=config)
    for p in sorted(run_dir.glob("metrics_*.json")):
        try:
            info.evaluations[p.stem[len("metrics_") :]] = json.loads(p.read_text())
        except json.JSONDecodeError as err:
            log.warning("%s: unreadable (%s); skipped", p, err)
    for p in sorted(run_dir.glob("predictions_*.csv")):
        info.predictions[p.stem[len("predictions_") :]] = p
    hist = run_dir / METRICS_FILE
    if hist.exists():
        try:
            info.history = pd.read_csv(hist)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError) as err:
            log.warning("%s: unreadable (%s); no training curves", hist, err)
    return info


# ------------------------------------------------------------------------------------- tables
@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""


def fmt_cell(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def as_table(title: str, data: Any) -> Table:
    """A :class:`Table` from a DataFrame, a list of dicts, or ``(columns, rows)``."""
    if isinstance(data, Table):
        return data
    if hasattr(data, "to_dict") and hasattr(data, "columns"):
        cols = [str(c) for c in data.columns]
        return Table(title, cols, [list(r) for r in data.itertuples(index=False)])
    if isinstance(data, Sequence) and data and isinstance(data[0], Mapping):
        cols: list[str] = []
        for r in data:
            cols += [c for c in r if c not in cols]
        return Table(title, cols, [[r.get(c) for c in cols] for r in data])
    if isinstance(data, tuple) and len(data) == 2:
        return Table(title, list(data[0]), [list(r) for r in data[1]])
    raise TypeError(f"extra table '{title}': expected a DataFrame, list of dicts or (columns, rows)")


def _columns_for(classes: Sequence[str]) -> tuple[str, ...]:
    return BINARY_COLUMNS if len(classes) == 2 else MULTI_COLUMNS


def _metric_cell(key: str, value: Any) -> str:
    return format_metric_for(key, value)


def summary_tables(runs: Sequence[RunInfo]) -> tuple[list[Table], dict]:
    """One table per evaluation kind (binary / multi-class): a row per run x evaluation."""
    data: dict[str, list[dict]] = {}
    tables: dict[str, Table] = {}
    for run in runs:
        for name, ev in run.evaluations.items():
            classes = ev.get("classes") or []
            cols = _columns_for(classes)
            kind = "binary" if len(classes) == 2 else "multi-class"
            if kind not in tables:
                head = ["run", "evaluation", "n", "threshold", *cols]
                note = (
                    "percent except " + ", ".join(c for c in cols if c in FRACTION_METRICS) + " (fractions). "
                    + ("Threshold: 'op t' = the run's operating threshold t, the highest whose validation "
                       "sensitivity reaches the target (chosen on calibrated validation probabilities); "
                       "'0.5' = the untuned default." if kind == "binary" else "Decisions by argmax.")
                )  # fmt: skip
                tables[kind] = Table(f"Summary ({kind})", head, [], note)
            binary = kind == "binary"
            points = [(0.5 if binary else None, None, ev.get("metrics", {}))]
            if "operating_point" in ev:
                op = ev["operating_point"]
                points.insert(0, (op.get("value"), op, op.get("metrics", {})))  # operating point first
            for thr, op, m in points:
                tables[kind].rows.append(
                    [run.name, ev_label(name, ev), ev.get("n"), short_rule(op, binary),
                     *(_metric_cell(c, m.get(c)) for c in cols)]
                )  # fmt: skip
                data.setdefault(kind, []).append(
                    {"run": run.name, "evaluation": name, "threshold": thr, "rule": threshold_rule(op, binary),
                     **{c: m.get(c) for c in cols}}
                )  # fmt: skip
            if kind == "multi-class":
                recall = ev.get("metrics", {}).get("per_class_recall") or {}
                t = Table(
                    f"Per-class recall (%) — {run.name} / {name}",
                    ["class", "support", "recall"],
                    [
                        [c, (ev["metrics"].get("support") or {}).get(c), format_metric(r)]
                        for c, r in recall.items()
                    ],
                )
                tables[f"recall:{run.name}:{name}"] = t
    return list(tables.values()), data


def ev_label(name: str, ev: dict) -> str:
    """An evaluation's name with its scale mode when it is not the plain squeeze."""
    scale = ev.get("scale") or {}
    return f"{name} (scale-matched)" if scale.get("mode") == "match" else name


def calibration_tables(runs: Sequence[RunInfo]) -> list[Table]:
    """Temperature, ECE and Brier before / after calibration of every evaluation."""
    rows = []
    for run in runs:
        for name, ev in run.evaluations.items():
            cal = ev.get("calibration")
            if not cal:
                continue
            f = lambda v: format_metric(v, 3, percent=False)  # noqa: E731
            rows.append([run.name, ev_label(name, ev), cal.get("n"), f"{cal.get('temperature', 1.0):.4g}",
                         f(cal.get("ece_before")), f(cal.get("ece_after")), f(cal.get("brier_before")),
                         f(cal.get("brier_after"))])  # fmt: skip
    if not rows:
        return []
    cols = ["run", "evaluation", "n", "temperature", "ECE before", "ECE after", "Brier before", "Brier after"]
    note = (
        "Temperature scaling: one scalar T fitted on the run's validation split by NLL; probabilities = "
        "softmax(logits / T). It never changes a decision or a ranking metric, only what the probability means. "
        "ECE: top-label, equal-width bins; Brier: positive class (binary only)."
    )
    return [Table("Calibration (temperature scaling)", cols, rows, note)]


def zero_shot_tables(runs: Sequence[RunInfo]) -> tuple[list[Table], list[dict]]:
    """Table 3 layout: zero-shot sensitivity per magnification, average and std (ddof=1), paper beside.

    Table 3 does not name its metric; Fig. 5 and Section 6.4 quote its CMAF-Net values as
    sensitivity, so sensitivity is shown (see docs/decisions/evaluation.md).
    """
    paper = paper_table("table3")
    mags = ["40X", "100X", "200X", "400X"]
    rows, data = [], []
    for run in runs:
        for name, ev in run.evaluations.items():
            by_mag = ev.get("by_magnification") or {}
            if not ev.get("zero_shot") or not by_mag:
                continue
            cols = [m for m in mags if m in by_mag] + [m for m in by_mag if m not in mags]
            mode = "scale-matched" if (ev.get("scale") or {}).get("mode") == "match" else "squeezed"
            op = ev.get("operating_point")
            for label, key in ((short_rule(op), "operating_metrics"), ("0.5", "metrics")):
                vals = [(by_mag[m].get(key) or {}).get("sensitivity") for m in cols]
                if all(v is None for v in vals):
                    continue
                counts = [by_mag[m].get("n") for m in cols]
                mean, std, _ = mean_std(vals)
                cells = [f"{format_metric(v)} (n={c})" for v, c in zip(vals, counts)]
                rows.append(
                    [f"{run.name} / {mode} @ {label}", *cells, format_metric(mean), format_metric(std)]
                )
                data.append({"run": run.name, "evaluation": name, "scale": mode, "threshold": label,
                             **dict(zip(cols, vals)), "n": dict(zip(cols, counts)), "average": mean, "std": std})  # fmt: skip
    if not rows:
        return [], []
    for prow in paper["rows"]:
        if not prow.get("derived"):
            cells = [format_paper_cell(prow.get(m)) for m in mags]
            rows.append([f"paper: {prow['method']}", *cells, format_paper_cell(prow.get("average")),
                         format_paper_cell(prow.get("std_dev"))])  # fmt: skip
    note = (
        "Sensitivity (%) per magnification (n = images evaluated); std over magnifications (ddof=1). "
        "'squeezed' resizes each whole image into the model input; 'scale-matched' resamples it to the "
        "training microns per pixel and tiles it with the training patch size (images smaller than half a "
        "patch at that scale are excluded). Paper rows from Table 3."
    )
    return [Table("Zero-shot BreakHis (Table 3 layout)", ["run", *mags, "average", "std"], rows, note)], data


def magnification_tables(runs: Sequence[RunInfo]) -> list[Table]:
    out = []
    for run in runs:
        for name, ev in run.evaluations.items():
            by_mag = ev.get("by_magnification")
            if not by_mag:
                continue
            classes = ev.get("classes") or []
            cols = _columns_for(classes)
            op = ev.get("operating_point") if len(classes) == 2 else None
            rows = []
            overall = {
                "n": ev.get("n"),
                "metrics": ev.get("metrics", {}),
                "operating_metrics": (op or {}).get("metrics"),
            }
            for mag, e in [*by_mag.items(), ("overall", overall)]:
                points = [(short_rule(op), e.get("operating_metrics"))] if op else []
                points.append((short_rule(None, len(classes) == 2), e.get("metrics")))
                for rule, m in points:
                    rows.append([mag, e.get("n"), rule, *(_metric_cell(c, (m or {}).get(c)) for c in cols)])
            out.append(
                Table(
                    f"Per magnification — {run.name} / {ev_label(name, ev)}",
                    ["magnification", "n", "threshold", *cols],
                    rows,
                )
            )
    return out


def seed_aggregate(runs: Sequence[RunInfo]) -> tuple[list[Table], dict]:
    """Mean ± std (ddof=1) per evaluation name over every run that has it (e.g. 5 seeds)."""
    tables, data = [], {}
    groups: dict[tuple[str, str, tuple[str, ...]], list[dict]] = {}
    for r in runs:
        # Pool only runs that differ by their seed alone (same resolved config otherwise), with the
        # same evaluation name and classes: a mean over two different models would mean nothing.
        recipe = _recipe_key(r.config)
        model = (r.config.get("model") or {}).get("name", r.meta.get("model", "?"))
        for name, ev in r.evaluations.items():
            groups.setdefault((f"{model} {recipe}", name, tuple(ev.get("classes") or [])), []).append(ev)
    for (recipe, name, classes), evs in sorted(groups.items()):
        if len(evs) < 2:
            continue
        cols = _columns_for(classes)
        key = f"{recipe.split()[0]} / {name}"
        if sum(k[0].split()[0] == recipe.split()[0] and k[1] == name for k in groups) > 1:
            key += f" [{recipe.split()[1]}, {', '.join(classes)}]"
        data[key] = aggregate_seeds([e.get("metrics", {}) for e in evs], keys=list(cols))
        row = [key, len(evs)]
        for c in cols:
            v = [e.get("metrics", {}).get(c) for e in evs]
            row.append(
                format_mean_std(v, 3 if c in FRACTION_METRICS else 2, percent=c not in FRACTION_METRICS)
            )
        tables.append(Table(f"Mean ± std across runs — {key}", ["evaluation", "runs", *cols], [row]))
    return tables, data


def _recipe_key(config: Mapping) -> str:
    """A short hash of a run's resolved config without its seed (runs that are seeds of one recipe)."""
    cfg = json.loads(json.dumps(config, default=str))
    (cfg.get("train") or {}).pop("seed", None)
    (cfg.get("train") or {}).pop("device", None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:8]


def _paper_match(run: RunInfo) -> tuple[str, str] | None:
    if run.meta.get("synthetic"):  # generated data: a comparison with the paper would mislead
        return None
    tag = run.meta.get("paper")
    if isinstance(tag, Mapping) and tag.get("table") and tag.get("row"):
        return str(tag["table"]), str(tag["row"])
    model = (run.config.get("model") or {}).get("name", run.meta.get("model"))
    test = run.evaluations.get("test") or {}
    if (
        model == "cmafnet"
        and run.meta.get("dataset") in (None, "idc")
        and len(test.get("classes") or []) == 2
    ):
        return "table1", "CMAF-Net (Ours)"
    return None


def paper_comparison(runs: Sequence[RunInfo]) -> tuple[list[Table], list[dict]]:
    """Ours beside the paper's for runs that match a paper row (Tables 1, 6 style metrics)."""
    rows, data = [], []
    for run in runs:
        match = _paper_match(run)
        if match is None:
            continue
        table_name, row_name = match
        try:
            table = paper_table(table_name)
        except Exception as err:  # unknown table name in run.json
            log.warning("%s: %s", run.path, err)
            continue
        key = next(
            (k for k in ("method", "configuration", "initialization", "subtype") if k in table["rows"][0]),
            "method",
        )
        prow = next((r for r in table["rows"] if str(r.get(key, "")).lower() == row_name.lower()), None)
        ev_name = "test" if "test" in run.evaluations else next(iter(run.evaluations), None)
        if prow is None or ev_name is None:
            continue
        ours = run.evaluations[ev_name].get("metrics", {})
        for col in table["columns"]:
            if col not in ours:
                continue
            unit = table["units"].get(col, "percent")
            theirs = paper_value(prow.get(col), unit)
            mine = ours.get(col)
            delta = None if (theirs is None or mine is None) else mine - theirs
            pct = unit == "percent"
            rows.append([
                run.name, f"{table_name}: {row_name}", col, format_paper_cell(prow.get(col)),
                format_metric(mine, 2 if pct else 3, percent=pct), format_metric(delta, 2 if pct else 3, percent=pct),
            ])  # fmt: skip
            data.append(
                {
                    "run": run.name,
                    "table": table_name,
                    "row": row_name,
                    "metric": col,
                    "paper": theirs,
                    "ours": mine,
                }
            )
    if not rows:
        return [], []
    note = (
        "Paper values as printed (mean ± std over 5 seeds); ours on this run's evaluation at threshold 0.5 "
        "(the paper does not say which threshold its numbers use)."
    )
    return [
        Table(
            "Ours beside the paper",
            ["run", "paper row", "metric", "paper", "ours", "ours − paper"],
            rows,
            note,
        )
    ], data
