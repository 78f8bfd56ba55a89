"""One self-contained report over one or more run folders: HTML, Markdown and JSON.

``write_report(run_dirs, out_dir)`` reads what training and ``cmafnet evaluate`` left in each run
folder (``run.json``, ``config.yaml``, ``metrics.csv``, ``metrics_<name>.json``,
``predictions_<name>.csv``) and writes::

    report.html   every figure embedded as a base64 PNG data: URI, inline CSS, no external URL
    report.md     the same tables; figures as PNG files in figures/
    report.json   every run's evaluations and every table's cells (for scripts)

It leads with the comparison (every run's ROC and precision-recall curves in one figure each, then
one row per run at its operating threshold and at 0.5); the sections follow in :func:`_sections`.
The tables are :class:`~cmafnet.evaluation.table.TableResult` objects built in
:mod:`cmafnet.evaluation.report_tables`, as ``cmafnet experiment`` builds its paper tables.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cmafnet.evaluation import plots
from cmafnet.evaluation.report_tables import (
    RunInfo,
    calibration_table,
    collect_run,
    comparison_tables,
    diagnosis_tables,
    magnification_tables,
    zero_shot_table,
)
from cmafnet.evaluation.table import TableResult
from cmafnet.evaluation.tables_cost import cost_table
from cmafnet.evaluation.tables_stats import mcnemar_tests
from cmafnet.run import atomic_write_bytes, write_json

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1320px;
color:#222;line-height:1.4;padding:0 1em}
h1{border-bottom:2px solid #345;padding-bottom:.2em}h2{margin-top:1.8em;color:#234}
table{border-collapse:collapse;margin:.6em 0 1.2em;font-size:.8em}
th,td{border:1px solid #ccc;padding:.25em .45em;text-align:right}th{background:#eef2f6}td{white-space:nowrap}
td:first-child,th:first-child{text-align:left}tr:nth-child(even) td{background:#fafafa}
img{max-width:100%;border:1px solid #ddd;margin:.4em 0}.note{color:#555;font-size:.9em;margin:.2em 0}
figure{margin:1em 0;display:inline-block;vertical-align:top}figcaption{font-size:.9em;color:#444}
"""
Figures = list[tuple[str, bytes]]


# ------------------------------------------------------------------------------------ figures
def curve_figures(runs: Sequence[RunInfo]) -> Figures:
    """One ROC and one precision-recall figure per evaluation name, each with every run's curve."""
    by_eval: dict[str, dict[str, tuple[Any, Any]]] = {}
    for run in runs:
        for ev, (df, classes) in run.predictions.items():
            if len(classes) == 2:
                label = run.name if ev == "test" else f"{run.name} / {ev}"
                y, p = df["label"].to_numpy(), df[f"prob_{classes[1]}"].to_numpy(dtype=float)
                by_eval.setdefault(ev, {})[label] = (y, p)
    figs = []
    for ev, curves in by_eval.items():
        for kind, name in (("roc", "ROC"), ("pr", "Precision-recall")):
            title = f"{name} curves on '{ev}': every run"
            figs.append((title, plots.figure_png(plots.plot_curves(curves, kind, title))))
    return figs


def diagnosis_figures(runs: Sequence[RunInfo]) -> Figures:
    """The score-distribution figure each zero-shot diagnosis wrote (per subtype and magnification)."""
    figs = []
    for r in runs:
        for ev_name, ev in r.evaluations.items():
            path = Path((ev.get("diagnosis") or {}).get("figure") or "")
            if not path.is_file():  # a run folder moved since: the figure sits beside its metrics
                path = r.path / path.name
            if path.suffix == ".png" and path.is_file():
                figs.append(
                    (f"{r.name} / {ev_name}: p(malignant) per subtype and magnification", path.read_bytes())
                )
    return figs


def run_figures(run: RunInfo) -> Figures:
    """(caption, PNG) for one run: confusion matrices, reliability, training curves, attention heads."""
    figs = []
    for ev_name, ev in run.evaluations.items():
        m, classes = ev.get("metrics", {}), ev.get("classes") or []
        if "confusion" not in m:
            continue
        if len(classes) == 2:
            # Fig. 5 style: overall plus each magnification, all at the operating threshold if any.
            op = ev.get("operating_point") or {}
            key = "operating_metrics" if op else "metrics"
            panels = [(f"{ev_name} (all)", (op.get("metrics") or m)["confusion"])]
            panels += [
                (mag, (e.get(key) or e["metrics"])["confusion"])
                for mag, e in (ev.get("by_magnification") or {}).items()
            ]
            t = f"threshold {op['value']:.3f}" if op else "threshold 0.5"
            fig = plots.plot_confusion(panels, classes, title=f"{run.name} / {ev_name} ({t})")
            caption = f"confusion matrices, {ev_name}, {t} (Fig. 5 style)"
        else:
            fig = plots.plot_confusion([(f"{run.name} / {ev_name}", m["confusion"])], classes, normalize=True)
            caption = f"normalised confusion matrix, {ev_name} (Fig. 6 style)"
        figs.append((f"{run.name}: {caption}", plots.figure_png(fig)))
    for caption, fig in (
        ("reliability diagrams before and after temperature scaling", reliability_figure(run)),
        ("training curves (metrics.csv)", plots.plot_training_curves(run.history, title=run.name)),
        ("per-head attention entropy and temperature (Fig. 4)", plots.plot_attention_heads(run.history, title=run.name)),
    ):  # fmt: skip
        if fig is not None:
            figs.append((f"{run.name}: {caption}", plots.figure_png(fig)))
    return figs


def reliability_figure(run: RunInfo) -> Any:
    """Reliability diagrams of a run's evaluations whose predictions hold the raw logits (or None).

    Binary: the positive class; multi-class: the top label (the event "argmax is right").
    """
    from scipy.special import softmax

    curves = {}
    for ev_name, (df, classes) in run.predictions.items():
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


# ------------------------------------------------------------------------------------ writers
def _sections(
    runs: Sequence[RunInfo], compare: Sequence[tuple[str, str]] | None
) -> tuple[list[tuple[str, list[TableResult], Figures]], list[dict]]:
    mc_tables, mc_data = mcnemar_tests(runs, compare)
    sections = [
        ("Comparison", comparison_tables(runs), curve_figures(runs)),
        ("Statistical tests", mc_tables, []),
        ("Calibration", calibration_table(runs), []),
        ("Training cost", cost_table(runs), []),
        ("Per magnification", magnification_tables(runs), []),
        ("Zero-shot", zero_shot_table(runs), []),
        ("Zero-shot diagnosis", diagnosis_tables(runs), diagnosis_figures(runs)),
        *((f"Figures — {r.name}", [], run_figures(r)) for r in runs),
    ]
    return [s for s in sections if s[1] or s[2]], mc_data


def write_report(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    title: str = "cmafnet report",
    compare: Sequence[tuple[str, str]] | None = None,
    notes: Sequence[str] = (),
    extra_sections: Sequence[tuple[str, list[TableResult], Figures]] = (),
) -> Path:
    """Write ``report.html`` (self-contained), ``report.md`` (+ ``figures/``) and ``report.json``.

    Args:
        run_dirs: run folders.
        out_dir: output folder.
        title: report title.
        compare: run-name pairs for McNemar; default every pair evaluated on the same images.
        notes: paragraphs shown under the title.
        extra_sections: (heading, tables, figures) shown before the runs' sections (a cohort's slides).

    Returns:
        Path of ``report.html``.
    """
    from cmafnet import __version__

    out = Path(out_dir)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    runs = [collect_run(d) for d in run_dirs]
    seen: dict[str, int] = {}
    for r in runs:  # unique display names
        seen[r.name] = seen.get(r.name, -1) + 1
        r.name = f"{r.name}#{seen[r.name]}" if seen[r.name] else r.name
    run_sections, mc_data = _sections(runs, compare)
    sections = [*extra_sections, *run_sections]
    created = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    run_lines = [
        f"{r.name}: {r.path} (model {r.model or '?'}, evaluations: "
        f"{', '.join(r.evaluations) or 'none — run cmafnet evaluate'})"
        for r in runs
    ]
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='note'>cmafnet {html.escape(__version__)}, {created}</p>",
        *(f"<p>{html.escape(n)}</p>" for n in notes),
        "<h2>Runs</h2><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in run_lines) + "</ul>",
    ]
    md = [
        f"# {title}",
        "",
        f"cmafnet {__version__}, {created}",
        "",
        *(f"{n}\n" for n in notes),
        "## Runs",
        "",
    ]
    md += [f"- {x}" for x in run_lines] + [""]
    fig_index: list[dict] = []
    for sec_title, tables, figs in sections:
        parts.append(f"<h2>{html.escape(sec_title)}</h2>")
        md += [f"## {sec_title}", ""]
        for caption, png in figs:
            fname = f"figures/fig{len(fig_index):02d}.png"
            atomic_write_bytes(out / fname, png)
            b64 = base64.b64encode(png).decode("ascii")
            parts.append(
                f"<figure><img alt='{html.escape(caption, quote=True)}' src='data:image/png;base64,{b64}'>"
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )
            md += [f"![{caption}]({fname})", ""]
            fig_index.append({"caption": caption, "file": fname})
        parts += [t.html() for t in tables]
        md += [t.markdown(level=3) for t in tables]
    parts.append("</body></html>")
    html_path = out / "report.html"
    atomic_write_bytes(html_path, "\n".join(parts).encode("utf-8"))
    atomic_write_bytes(out / "report.md", "\n".join(md).encode("utf-8"))
    write_json(out / "report.json", {
        "title": title, "created": created, "version": __version__,
        "runs": [{"name": r.name, "path": str(r.path), "evaluations": r.evaluations} for r in runs],
        "tables": {t.name: {"title": t.title, "cells": t.records()} for _, ts, _ in sections for t in ts},
        "mcnemar": mc_data, "figures": fig_index,
    })  # fmt: skip
    return html_path
