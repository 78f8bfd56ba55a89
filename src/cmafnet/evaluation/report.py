"""One self-contained report over one or more run folders: HTML, Markdown and JSON.

``write_report(run_dirs, out_dir)`` reads what training and ``cmafnet evaluate`` left in each run
folder (``run.json``, ``config.yaml``, ``metrics.csv``, ``metrics_<name>.json``,
``predictions_<name>.csv``) and writes::

    report.html   every figure embedded as a base64 PNG data: URI, inline CSS, no external URL
    report.md     the same tables; figures as PNG files in figures/
    report.json   the numbers behind every table (for scripts)

Sections: summary metrics (0.5 and operating threshold), mean ± std across the given runs, the
paper's numbers beside ours where a run matches a paper row, ROC/PR curves, confusion matrices,
per-magnification results, training curves, per-head attention entropy / temperature (Fig. 4),
exact McNemar tests between runs evaluated on the same images, and extra tables / figures passed
in by experiments.

A run is matched to a paper row by ``run.json`` ``"paper": {"table": "table1", "row": "<method>"}``
(written by the experiment runners); a CMAF-Net run evaluated on an IDC test split without that key
is shown beside Table 1's "CMAF-Net (Ours)".
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import itertools
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cmafnet.errors import RunFolderError
from cmafnet.evaluation import plots
from cmafnet.evaluation.metrics import FRACTION_METRICS, format_metric, format_metric_for
from cmafnet.evaluation.paper import format_paper_cell, paper_table, paper_value
from cmafnet.evaluation.stats import aggregate_seeds, format_mean_std, mcnemar, mean_std
from cmafnet.run import METRICS_FILE, atomic_write_bytes, read_meta, write_json

log = logging.getLogger(__name__)

BINARY_COLUMNS = ("sensitivity", "specificity", "balanced_accuracy", "auprc", "auroc", "mcc", "f1", "ece")
MULTI_COLUMNS = ("macro_f1", "weighted_f1", "balanced_accuracy", "mcc", "accuracy", "ece")

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;line-height:1.4;padding:0 1em}
h1{border-bottom:2px solid #345;padding-bottom:.2em}h2{margin-top:1.8em;color:#234}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.88em}
th,td{border:1px solid #ccc;padding:.25em .55em;text-align:right}th{background:#eef2f6}
td:first-child,th:first-child{text-align:left}tr:nth-child(even) td{background:#fafafa}
img{max-width:100%;border:1px solid #ddd;margin:.4em 0}.note{color:#555;font-size:.9em}
figure{margin:1em 0}figcaption{font-size:.9em;color:#444}
"""


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


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def _table_from_any(title: str, data: Any) -> Table:
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
    groups: dict[tuple[str, tuple[str, ...]], list[dict]] = {}
    for r in runs:  # only runs with the same evaluation name and the same classes are pooled
        for name, ev in r.evaluations.items():
            groups.setdefault((name, tuple(ev.get("classes") or [])), []).append(ev)
    for (name, classes), evs in sorted(groups.items()):
        if len(evs) < 2:
            continue
        cols = _columns_for(classes)
        key = name if sum(k[0] == name for k in groups) == 1 else f"{name} [{', '.join(classes)}]"
        data[key] = aggregate_seeds([e.get("metrics", {}) for e in evs], keys=list(cols))
        row = [key, len(evs)]
        for c in cols:
            v = [e.get("metrics", {}).get(c) for e in evs]
            row.append(
                format_mean_std(v, 3 if c in FRACTION_METRICS else 2, percent=c not in FRACTION_METRICS)
            )
        tables.append(Table(f"Mean ± std across runs — {key}", ["evaluation", "runs", *cols], [row]))
    return tables, data


def _paper_match(run: RunInfo) -> tuple[str, str] | None:
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


# ------------------------------------------------------------------------------------ figures
def run_figures(run: RunInfo) -> list[tuple[str, bytes]]:
    """(caption, PNG) for one run: ROC/PR, confusion matrices, training curves, attention heads."""
    from cmafnet.evaluation.evaluate import load_predictions

    figs: list[tuple[str, bytes]] = []
    curves = {}
    for ev_name, path in run.predictions.items():
        try:
            df, classes = load_predictions(path)
        except RunFolderError as err:
            log.warning("%s", err)
            continue
        if len(classes) == 2:
            curves[ev_name] = (df["label"].to_numpy(), df[f"prob_{classes[1]}"].to_numpy(dtype=float))
    if curves:
        figs.append(
            (f"{run.name}: ROC and precision-recall curves", plots.figure_png(plots.plot_roc_pr(curves)))
        )
    for ev_name, ev in run.evaluations.items():
        m = ev.get("metrics", {})
        classes = ev.get("classes") or []
        if "confusion" not in m:
            continue
        if len(classes) == 2:
            # Fig. 5 style: overall plus each magnification, all at the operating threshold if any.
            thr = ev.get("operating_point") or {}
            key = "operating_metrics" if thr else "metrics"
            panels = [(f"{ev_name} (all)", (thr.get("metrics") or m)["confusion"])]
            for mag, e in (ev.get("by_magnification") or {}).items():
                panels.append((mag, (e.get(key) or e["metrics"])["confusion"]))
            t = f"threshold {thr['value']:.3f}" if thr else "threshold 0.5"
            fig = plots.plot_confusion_panel(panels, classes, title=f"{run.name} / {ev_name} ({t})")
            figs.append(
                (f"{run.name}: confusion matrices, {ev_name}, {t} (Fig. 5 style)", plots.figure_png(fig))
            )
        else:
            fig = plots.plot_confusion(
                m["confusion"], classes, normalize=True, title=f"{run.name} / {ev_name}"
            )
            figs.append(
                (f"{run.name}: normalised confusion matrix, {ev_name} (Fig. 6 style)", plots.figure_png(fig))
            )
    fig = plots.plot_training_curves(run.history, title=run.name)
    if fig is not None:
        figs.append((f"{run.name}: training curves (metrics.csv)", plots.figure_png(fig)))
    fig = plots.plot_attention_heads(run.history, title=run.name)
    if fig is not None:
        figs.append(
            (f"{run.name}: per-head attention entropy and temperature (Fig. 4)", plots.figure_png(fig))
        )
    return figs


def method_label(run: RunInfo) -> str:
    """A run's method for cross-run figures: the paper row it reproduces, else model (+ loss)."""
    tag = run.meta.get("paper")
    if isinstance(tag, Mapping) and tag.get("row"):
        return str(tag["row"])
    model = (run.config.get("model") or {}).get("name") or run.meta.get("model") or run.name
    loss = (run.config.get("loss") or {}).get("name")
    return f"{model} + {loss}" if loss else str(model)


def cross_run_figures(runs: Sequence[RunInfo], evaluation: str = "test") -> list[tuple[str, bytes]]:
    """Fig. 2 (method comparison) and Fig. 3 (imbalance degradation) when the runs allow them.

    Runs are grouped by :func:`method_label`; seeds of one method give mean ± std error bars.
    Fig. 2 needs at least two methods with a binary ``evaluation``; Fig. 3 a method trained at two
    or more imbalance ratios (``run.json`` ``imbalance``; ``None`` = the natural ratio).
    """
    by_method: dict[str, dict[str, list[dict]]] = {}
    for r in runs:
        ev = r.evaluations.get(evaluation)
        if not ev or len(ev.get("classes") or []) != 2:
            continue
        ratio = str(r.meta.get("imbalance") or "natural")
        by_method.setdefault(method_label(r), {}).setdefault(ratio, []).append(ev.get("metrics", {}))
    figs = []
    keys = ("sensitivity", "balanced_accuracy", "auprc")
    natural = {m: d["natural"] for m, d in by_method.items() if "natural" in d}
    if len(natural) >= 2:
        table = {}
        for m, ms in natural.items():
            table[m] = {}
            for k in keys:
                mean, std, _ = mean_std([x.get(k) for x in ms])
                table[m][k] = (mean, std)
        fig = plots.plot_method_comparison(table, keys)
        figs.append(
            (f"Method comparison on {evaluation} (Fig. 2 style; mean ± std over runs)", plots.figure_png(fig))
        )
    degr = {m: d for m, d in by_method.items() if len(d) >= 2}
    if degr:

        def order(ratio: str) -> float:  # natural first, then by minority share, decreasing
            if ratio == "natural":
                return -1.0
            a, b = (float(x) for x in ratio.split(":"))
            return a / (a + b)

        table = {
            m: {r: mean_std([x.get("sensitivity") for x in d[r]])[:2] for r in sorted(d, key=order)}
            for m, d in degr.items()
        }
        fig = plots.plot_imbalance_degradation(table, "sensitivity")
        figs.append(
            (f"Sensitivity vs training imbalance on {evaluation} (Fig. 3 style)", plots.figure_png(fig))
        )
    return figs


def _as_png(fig: Any) -> bytes:
    if isinstance(fig, bytes):
        return fig
    if isinstance(fig, (str, Path)):
        return Path(fig).read_bytes()
    return plots.figure_png(fig)


# ------------------------------------------------------------------------------------ writers
def _html_table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in t.columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in t.rows)
    note = f'<p class="note">{html.escape(t.note)}</p>' if t.note else ""
    return f"<h3>{html.escape(t.title)}</h3><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"


def _md_table(t: Table) -> str:
    def cell(v: Any) -> str:
        return _fmt(v).replace("|", "\\|")

    lines = [f"### {t.title}", "", "| " + " | ".join(cell(c) for c in t.columns) + " |"]
    lines.append("|" + "|".join("---" for _ in t.columns) + "|")
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in t.rows]
    if t.note:
        lines += ["", f"_{t.note}_"]
    return "\n".join(lines) + "\n"


def write_report(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    title: str = "cmafnet report",
    extra_tables: Mapping[str, Any] | None = None,
    extra_figures: Mapping[str, Any] | None = None,
    compare: Sequence[tuple[str, str]] | None = None,
    notes: Sequence[str] = (),
) -> Path:
    """Write ``report.html`` (self-contained), ``report.md`` (+ ``figures/``) and ``report.json``.

    Args:
        run_dirs: run folders (may be empty when only extra tables / figures are reported).
        out_dir: output folder.
        title: report title.
        extra_tables: ``{title: DataFrame | list of dicts | (columns, rows)}`` from experiments.
        extra_figures: ``{caption: Figure | PNG bytes | PNG path}``.
        compare: run-name pairs for McNemar; default every pair evaluated on the same images.
        notes: paragraphs shown under the title.

    Returns:
        Path of ``report.html``.
    """
    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    runs = [collect_run(d) for d in run_dirs]
    seen: dict[str, int] = {}
    for r in runs:  # unique display names
        if r.name in seen:
            seen[r.name] += 1
            r.name = f"{r.name}#{seen[r.name]}"
        else:
            seen[r.name] = 0

    sections: list[tuple[str, list[Table], list[tuple[str, bytes]]]] = []
    summary, summary_data = summary_tables(runs)
    sections.append(("Metrics", summary + magnification_tables(runs) + ci_tables(runs), []))
    agg_tables, agg_data = seed_aggregate(runs)
    if agg_tables:
        sections.append(("Mean ± std across runs (seeds)", agg_tables, []))
    paper_tables, paper_data = paper_comparison(runs)
    zs_tables, zs_data = zero_shot_tables(runs)
    paper_tables += zs_tables
    if paper_tables:
        sections.append(("Comparison with the paper", paper_tables, []))
    mc_tables, mc_data = mcnemar_tests(runs, compare)
    if mc_tables:
        sections.append(("Statistical tests", mc_tables, []))
    if extra_tables:
        sections.append(("Experiment tables", [_table_from_any(k, v) for k, v in extra_tables.items()], []))
    if extra_figures:
        sections.append(("Experiment figures", [], [(k, _as_png(v)) for k, v in extra_figures.items()]))
    cross = cross_run_figures(runs)
    if cross:
        sections.append(("Across runs", [], cross))
    for r in runs:
        figs = run_figures(r)
        if figs:
            sections.append((f"Figures — {r.name}", [], figs))

    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    from cmafnet import __version__

    run_lines = [
        f"{r.name}: {r.path} (model {(r.config.get('model') or {}).get('name', '?')}, "
        f"evaluations: {', '.join(r.evaluations) or 'none — run cmafnet evaluate'})"
        for r in runs
    ]

    # HTML
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='note'>cmafnet {html.escape(__version__)}, {created}</p>",
    ]
    parts += [f"<p>{html.escape(n)}</p>" for n in notes]
    if run_lines:
        parts.append("<h2>Runs</h2><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in run_lines) + "</ul>")
    md = [f"# {title}", "", f"cmafnet {__version__}, {created}", ""] + [f"{n}\n" for n in notes]
    if run_lines:
        md += ["## Runs", ""] + [f"- {x}" for x in run_lines] + [""]
    fig_index: list[dict] = []
    for sec_title, tables, figs in sections:
        parts.append(f"<h2>{html.escape(sec_title)}</h2>")
        md += [f"## {sec_title}", ""]
        for t in tables:
            parts.append(_html_table(t))
            md.append(_md_table(t))
        for caption, png in figs:
            k = len(fig_index)
            fname = f"figures/fig{k:02d}.png"
            atomic_write_bytes(out / fname, png)
            b64 = base64.b64encode(png).decode("ascii")
            parts.append(
                f"<figure><img alt='{html.escape(caption, quote=True)}' src='data:image/png;base64,{b64}'>"
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
            md += [f"![{caption}]({fname})", ""]
            fig_index.append({"caption": caption, "file": fname})
    parts.append("</body></html>")
    html_path = out / "report.html"
    atomic_write_bytes(html_path, "\n".join(parts).encode("utf-8"))
    atomic_write_bytes(out / "report.md", "\n".join(md).encode("utf-8"))
    write_json(
        out / "report.json",
        {
            "title": title,
            "created": created,
            "version": __version__,
            "runs": [
                {"name": r.name, "path": str(r.path), "meta": r.meta, "evaluations": r.evaluations}
                for r in runs
            ],
            "summary": summary_data,
            "across_runs": agg_data,
            "paper_comparison": paper_data,
            "zero_shot": zs_data,
            "mcnemar": mc_data,
            "extra_tables": {
                k: {"columns": t.columns, "rows": t.rows}
                for k, t in ((k, _table_from_any(k, v)) for k, v in (extra_tables or {}).items())
            },
            "figures": fig_index,
        },
    )
    return html_path
