"""The tables of a report: what one or more run folders say, as rows (no drawing, no HTML).

:func:`collect_run` reads a run folder (``run.json``, ``config.yaml``, ``metrics.csv``,
``metrics_<name>.json``, ``predictions_<name>.csv``); every ``*_tables`` function turns a list of
runs into :class:`Table` objects plus the plain data behind them (for ``report.json``).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cmafnet.errors import RunFolderError
from cmafnet.evaluation.metrics import FRACTION_METRICS, format_metric, format_metric_for
from cmafnet.evaluation.paper import format_paper_cell, paper_table, paper_value
from cmafnet.evaluation.stats import aggregate_seeds, format_mean_std, mcnemar, mean_std
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
    config = (yaml_load(cfg_path.read_text()) or {}) if cfg_path.exists() else {}
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
                    "percent except " + ", ".join(c for c in cols if c in FRACTION_METRICS) + " (fractions)"
                )
                tables[kind] = Table(f"Summary ({kind})", head, [], note)
            points = [(0.5, ev.get("metrics", {}))]
            if "operating_point" in ev:
                points.append((ev["operating_point"].get("value"), ev["operating_point"].get("metrics", {})))
            for thr, m in points:
                thr_txt = "argmax" if kind == "multi-class" else (f"{thr:.4f}" if thr is not None else "n/a")
                tables[kind].rows.append(
                    [run.name, name, ev.get("n"), thr_txt, *(_metric_cell(c, m.get(c)) for c in cols)]
                )
                data.setdefault(kind, []).append(
                    {"run": run.name, "evaluation": name, "threshold": thr, **{c: m.get(c) for c in cols}}
                )
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


def ci_tables(runs: Sequence[RunInfo]) -> list[Table]:
    """Bootstrap confidence intervals written by ``cmafnet evaluate`` (threshold 0.5)."""
    rows = []
    for run in runs:
        for name, ev in run.evaluations.items():
            for metric, ci in (ev.get("ci") or {}).items():
                pct = metric not in FRACTION_METRICS
                f = lambda v, pct=pct: format_metric(v, 2 if pct else 3, percent=pct)  # noqa: E731
                rows.append([run.name, name, metric, f(ci.get("point")), f(ci.get("low")), f(ci.get("high")),
                             ci.get("by"), f"{ci.get('n_valid')}/{ci.get('n_boot')}"])  # fmt: skip
    if not rows:
        return []
    cols = ["run", "evaluation", "metric", "point", "low", "high", "resampled by", "valid resamples"]
    return [Table("Bootstrap 95% confidence intervals (percentile)", cols, rows)]


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
            for label, key in (("0.5", "metrics"), ("operating", "operating_metrics")):
                vals = [(by_mag[m].get(key) or {}).get("sensitivity") for m in cols]
                if all(v is None for v in vals):
                    continue
                mean, std, _ = mean_std(vals)
                rows.append([f"{run.name} / {name} @ {label}", *(format_metric(v) for v in vals),
                             format_metric(mean), format_metric(std)])  # fmt: skip
                data.append({"run": run.name, "evaluation": name, "threshold": label, **dict(zip(cols, vals)),
                             "average": mean, "std": std})  # fmt: skip
    if not rows:
        return [], []
    for prow in paper["rows"]:
        if not prow.get("derived"):
            cells = [format_paper_cell(prow.get(m)) for m in mags]
            rows.append([f"paper: {prow['method']}", *cells, format_paper_cell(prow.get("average")),
                         format_paper_cell(prow.get("std_dev"))])  # fmt: skip
    note = "Sensitivity (%) per magnification; std over magnifications (ddof=1). Paper rows from Table 3."
    return [Table("Zero-shot BreakHis (Table 3 layout)", ["run", *mags, "average", "std"], rows, note)], data


def magnification_tables(runs: Sequence[RunInfo]) -> list[Table]:
    out = []
    for run in runs:
        for name, ev in run.evaluations.items():
            by_mag = ev.get("by_magnification")
            if not by_mag:
                continue
            cols = _columns_for(ev.get("classes") or [])
            rows = [
                [mag, e.get("n"), *(_metric_cell(c, e["metrics"].get(c)) for c in cols)]
                for mag, e in by_mag.items()
            ]
            rows.append(["overall", ev.get("n"), *(_metric_cell(c, ev["metrics"].get(c)) for c in cols)])
            out.append(
                Table(
                    f"Per magnification — {run.name} / {name} (threshold 0.5)",
                    ["magnification", "n", *cols],
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
        "Paper values as printed (mean ± std over 5 seeds); ours on this run's evaluation at threshold 0.5."
    )
    return [
        Table(
            "Ours beside the paper",
            ["run", "paper row", "metric", "paper", "ours", "ours − paper"],
            rows,
            note,
        )
    ], data


def mcnemar_tests(
    runs: Sequence[RunInfo], pairs: Sequence[tuple[str, str]] | None = None
) -> tuple[list[Table], list[dict]]:
    """Exact McNemar between every pair of runs evaluated on the same images (same ids, same labels).

    Predictions at 0.5 (binary) / argmax (multi-class), so every run is compared at the same rule.
    """
    from cmafnet.evaluation.evaluate import load_predictions

    by_name = {r.path.name: r for r in runs} | {r.name: r for r in runs}  # display or folder name
    if pairs:
        for a, b in pairs:
            for n in (a, b):
                if n not in by_name:
                    raise RunFolderError(
                        f"--compare: '{n}' is not one of the report's runs {sorted(by_name)}"
                    )
        todo = [(by_name[a], by_name[b]) for a, b in pairs]
    else:
        todo = list(itertools.combinations(runs, 2))
    rows, data = [], []
    for ra, rb in todo:
        for ev in sorted(set(ra.predictions) & set(rb.predictions)):
            da, ca = load_predictions(ra.predictions[ev])
            db, cb = load_predictions(rb.predictions[ev])
            key = "id" if "id" in da.columns and da["id"].notna().all() else "row"
            if ca != cb or len(da) != len(db) or set(da[key]) != set(db[key]):
                continue  # not the same test set
            merged = da.merge(db, on=key, suffixes=("_a", "_b"))
            if not (merged["label_a"] == merged["label_b"]).all():
                continue
            y = merged["label_a"].to_numpy()
            pa = _decide(merged, ca, "_a")
            pb = _decide(merged, cb, "_b")
            r = mcnemar(y, pa, pb)
            rows.append(
                [
                    ra.name,
                    rb.name,
                    ev,
                    r["n"],
                    format_metric(r["acc_a"]),
                    format_metric(r["acc_b"]),
                    r["b"],
                    r["c"],
                    f"{r['pvalue']:.3g}",
                ]
            )
            data.append({"run_a": ra.name, "run_b": rb.name, "evaluation": ev, **r})
    if not rows:
        return [], []
    note = "b = A right & B wrong, c = A wrong & B right; two-sided exact binomial test on b of b + c (scipy binomtest)."
    return [
        Table(
            "Exact McNemar tests (paired predictions)",
            ["run A", "run B", "evaluation", "n", "acc A (%)", "acc B (%)", "b", "c", "p-value"],
            rows,
            note,
        )
    ], data


def _decide(df: Any, classes: list[str], suffix: str) -> np.ndarray:
    probs = np.stack([df[f"prob_{c}{suffix}"].to_numpy(dtype=float) for c in classes], axis=1)
    if len(classes) == 2:
        return (probs[:, 1] >= 0.5).astype(int)
    return probs.argmax(1)
