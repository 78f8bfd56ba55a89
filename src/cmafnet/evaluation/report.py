"""One self-contained report over one or more run folders: HTML, Markdown and JSON.

``write_report(run_dirs, out_dir)`` reads what training and ``cmafnet evaluate`` left in each run
folder (``run.json``, ``config.yaml``, ``metrics.csv``, ``metrics_<name>.json``,
``predictions_<name>.csv``) and writes::

    report.html   every figure embedded as a base64 PNG data: URI, inline CSS, no external URL
    report.md     the same tables; figures as PNG files in figures/
    report.json   the numbers behind every table (for scripts)

Sections: summary metrics (0.5 and operating threshold), each run's training cost and budget, mean ±
std across the given runs, the paper's numbers beside ours where a run matches a paper row, ROC/PR
curves, confusion matrices, per-magnification results, training curves, per-head attention entropy
/ temperature (Fig. 4), exact McNemar tests between runs evaluated on the same images, and extra
tables / figures passed in by experiments.

The tables are built in :mod:`cmafnet.evaluation.report_tables`; this module draws and writes.

A run is matched to a paper row by ``run.json`` ``"paper": {"table": "table1", "row": "<method>"}``
(written by the experiment runners); a CMAF-Net run evaluated on an IDC test split without that key
is shown beside Table 1's "CMAF-Net (Ours)".
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cmafnet.errors import RunFolderError
from cmafnet.evaluation import plots
from cmafnet.evaluation.report_tables import (
    RunInfo,
    Table,
    as_table,
    calibration_tables,
    collect_run,
    fmt_cell,
    magnification_tables,
    paper_comparison,
    seed_aggregate,
    summary_tables,
    zero_shot_tables,
)
from cmafnet.evaluation.stats import mean_std
from cmafnet.evaluation.tables_cost import cost_tables
from cmafnet.evaluation.tables_stats import ci_tables, mcnemar_tests
from cmafnet.run import atomic_write_bytes, write_json

log = logging.getLogger(__name__)

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
    fig = reliability_figure(run)
    if fig is not None:
        figs.append(
            (f"{run.name}: reliability diagrams before and after temperature scaling", plots.figure_png(fig))
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


def reliability_figure(run: RunInfo) -> Any:
    """Reliability diagrams of a run's evaluations whose predictions hold the raw logits (or None).

    Binary: the positive class; multi-class: the top label (the event "argmax is right").
    """
    from scipy.special import softmax

    from cmafnet.evaluation.evaluate import load_predictions

    curves = {}
    for ev_name, path in run.predictions.items():
        try:
            df, classes = load_predictions(path)
        except RunFolderError:
            continue
        if not all(f"logit_{c}" in df.columns for c in classes) or len(df) == 0:
            continue
        y = df["label"].to_numpy(dtype=int)
        p1 = df[[f"prob_{c}" for c in classes]].to_numpy(dtype=float)
        p0 = softmax(df[[f"logit_{c}" for c in classes]].to_numpy(dtype=float), axis=1)
        if len(classes) == 2:
            curves[ev_name] = ((y == 1).astype(int), p0[:, 1], p1[:, 1])
        else:
            correct = (p1.argmax(1) == y).astype(int)  # argmax is the same at any temperature
            curves[ev_name] = (correct, p0.max(1), p1.max(1))
    return plots.plot_reliability(curves, title=run.name) if curves else None


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
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(fmt_cell(v))}</td>" for v in r) + "</tr>" for r in t.rows
    )
    note = f'<p class="note">{html.escape(t.note)}</p>' if t.note else ""
    return f"<h3>{html.escape(t.title)}</h3><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{note}"


def _md_table(t: Table) -> str:
    def cell(v: Any) -> str:
        return fmt_cell(v).replace("|", "\\|")

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
    extra_section: str = "Experiment",
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
        extra_section: heading of the extra tables and figures ("<extra_section> tables" / "figures").

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
    cost_table, cost_data = cost_tables(runs)
    if cost_table:
        sections.append(("Training cost", cost_table, []))
    cal_tables = calibration_tables(runs)
    if cal_tables:
        sections.append(("Calibration", cal_tables, []))
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
        sections.append((f"{extra_section} tables", [as_table(k, v) for k, v in extra_tables.items()], []))
    if extra_figures:
        sections.append((f"{extra_section} figures", [], [(k, _as_png(v)) for k, v in extra_figures.items()]))
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
            "training_cost": cost_data,
            "across_runs": agg_data,
            "paper_comparison": paper_data,
            "zero_shot": zs_data,
            "mcnemar": mc_data,
            "extra_tables": {
                k: {"columns": t.columns, "rows": t.rows}
                for k, t in ((k, as_table(k, v)) for k, v in (extra_tables or {}).items())
            },
            "figures": fig_index,
        },
    )
    return html_path
