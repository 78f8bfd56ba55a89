"""Aggregate finished runs into the paper's layout: mean ± std over seeds, ours beside the paper's.

Each table becomes ``<out>/<table>/table.md`` (human), ``table.csv`` (one line per cell, ours and
paper as numbers), ``table.json`` and ``figure.png``. Cells with fewer finished seeds than planned
say so (``n=3/5``); cells without any finished run print ``…``. Our metrics are fractions; they are
printed in the paper's unit (percent or fraction, from ``paper_numbers.json``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cmafnet.evaluation.paper import find_row, paper_table
from cmafnet.experiments.compute import (
    MACS_HEADER,
    MACS_KEY,
    MACS_NOTE,
    macs_cell,
    view_rows,
    write_compute_outputs,
)
from cmafnet.experiments.layout import (
    Cell,
    Table,
    digits_for,
    get_path,
    group_results,
    planned_counts,
    unit_scale,
)
from cmafnet.experiments.paper_tables import check_match_compute, get_table
from cmafnet.experiments.runner import load_results
from cmafnet.experiments.spec import Scale
from cmafnet.run import atomic_write_bytes, write_json

MAGS = ("40X", "100X", "200X", "400X")


def _cell(docs: list[dict], path: str | Callable[[dict], Any], planned: int, unit: str, paper: Any) -> Cell:
    vals = []
    for d in docs:
        v = path(d) if callable(path) else get_path(d, path)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
            vals.append(float(v) * (unit_scale(unit) if unit in ("percent",) else 1.0))
    return Cell(vals, planned, paper, digits_for(unit))


def _paper_row(table: str, **match: str) -> dict:
    try:
        return find_row(table, **match) or {}
    except Exception:  # the paper table may lack this row (e.g. a row we added)
        return {}


# ----------------------------------------------------------------------------------------- tables
def _rows_by_method(
    name: str,
    seeds: int,
    scale: Scale,
    out: Path,
    metrics: list[tuple[str, str, str]],
    overrides: tuple[str, ...],
    match_compute: bool = False,
) -> Table:
    """Tables 1, 6: one row per method/ablation (per view with ``match_compute``), one column per metric."""
    t = get_table(name)
    pt = paper_table(name)
    units = pt["units"]
    header = dict(zip(pt["columns"], pt["header"][1:], strict=False))
    results = load_results(name, out, seeds, scale, overrides, match_compute)
    groups, planned = group_results(results), planned_counts(results)
    label_field = "configuration" if name == "table6" else "method"
    table = Table(name, t.title, "Configuration" if name == "table6" else "Method", [])
    table.columns = [(k, header.get(k, k)) for k, _, _ in metrics]
    for row in view_rows(t, match_compute):
        prow = _paper_row(name, **{label_field: row.paper.paper_label or row.paper.name}) if row.paper else {}
        docs, n = groups[(row.key, None)], planned[(row.key, None)]
        cells = {
            key: _cell(docs, path, n, units.get(unit_key, "fraction"), prow.get(key))
            for key, path, unit_key in metrics
        }
        if match_compute:
            cells[MACS_KEY] = macs_cell(docs, n)
        table.rows.append((row.label, cells))
    if match_compute:
        table.columns.append((MACS_KEY, MACS_HEADER))
        table.ours_only = (MACS_KEY,)
        table.notes.append(MACS_NOTE)
    return table


def table1(
    seeds: int, scale: Scale, out: Path, overrides: tuple[str, ...] = (), match_compute: bool = False
) -> Table:
    m = [
        (k, f"metrics.{k}", k)
        for k in ("sensitivity", "specificity", "balanced_accuracy", "auprc", "mcc", "f1")
    ]
    m.append(("params_m", "params_m", "params_m"))
    tab = _rows_by_method("table1", seeds, scale, out, m, overrides, match_compute)
    tab.notes.append("Metrics on the IDC test split at threshold 0.5 (argmax).")
    return tab


def table6(seeds: int, scale: Scale, out: Path, overrides: tuple[str, ...] = ()) -> Table:
    m = [(k, f"metrics.{k}", k) for k in ("sensitivity", "specificity", "balanced_accuracy", "auprc")]
    tab = _rows_by_method("table6", seeds, scale, out, m, overrides)
    full = tab.rows[0][1]["sensitivity"].mean
    for label, cells in tab.rows:
        prow = _paper_row("table6", configuration=label)
        s = cells["sensitivity"].mean
        delta = [] if (s is None or full is None or label == tab.rows[0][0]) else [s - full]
        cells["delta_sensitivity"] = Cell(delta, 1, prow.get("delta_sensitivity"), 2)
    tab.columns.append(("delta_sensitivity", "Δ Sens"))
    tab.notes.append("Δ Sens: difference of mean sensitivities to the Full row (percentage points).")
    return tab


def table2(
    seeds: int, scale: Scale, out: Path, overrides: tuple[str, ...] = (), match_compute: bool = False
) -> Table:
    t = get_table("table2")
    pt = paper_table("table2")
    results = load_results("table2", out, seeds, scale, overrides, match_compute)
    groups, planned = group_results(results), planned_counts(results)
    cols = [("70:30" if c is None else c, "70:30 (original)" if c is None else c) for c in t.columns]
    tab = Table("table2", t.title, "Method", list(cols))
    macs_cols = [(f"{MACS_KEY} {k}", f"MACs {k}") for k, _ in cols] if match_compute else []
    for row in view_rows(t, match_compute):
        prow = _paper_row("table2", method=row.paper.paper_label or row.paper.name) if row.paper else {}
        cells = {
            key: _cell(
                groups[(row.key, col)],
                "metrics.sensitivity",
                planned[(row.key, col)],
                "percent",
                prow.get(key),
            )
            for (key, _), col in zip(cols, t.columns, strict=True)
        }
        for (key, _), col in zip(macs_cols, t.columns, strict=False):
            cells[key] = macs_cell(groups[(row.key, col)], planned[(row.key, col)])
        tab.rows.append((row.label, cells))
    # relative retention of CMAF-Net (last row), as in the paper
    last = tab.rows[-1][1]
    base = last["70:30"].mean
    prow = _paper_row("table2", method="Relative Retention (%)")
    ret = {
        k: Cell([] if (not base or last[k].mean is None) else [100 * last[k].mean / base], 1, prow.get(k), 1)
        for k, _ in cols
    }
    tab.rows.append(("Relative retention of CMAF-Net (%)", ret))
    tab.notes.append(f"Sensitivity (%) on the natural-ratio test split; paper caption: {pt['caption']}")
    if match_compute:
        tab.columns += macs_cols
        tab.ours_only = tuple(k for k, _ in macs_cols)
        tab.notes.append(MACS_NOTE + " 'MACs <ratio>': the training MACs of that column's runs.")
    return tab


def table3(seeds: int, scale: Scale, out: Path, overrides: tuple[str, ...] = ()) -> Table:
    t = get_table("table3")
    results = load_results("table3", out, seeds, scale, overrides)
    groups, planned = group_results(results), planned_counts(results)
    cols = [(m, m.replace("X", "×")) for m in MAGS] + [("average", "Average"), ("std_dev", "Std Dev")]
    tab = Table("table3", t.title, "Method", cols)
    for row in t.rows:
        prow = _paper_row("table3", method=row.paper_label or row.name)
        docs, n = groups[(row.key, None)], planned[(row.key, None)]
        cells = {m: _cell(docs, f"by_magnification.{m}.sensitivity", n, "percent", prow.get(m)) for m in MAGS}
        means = [cells[m].mean for m in MAGS if cells[m].mean is not None]
        cells["average"] = Cell([float(np.mean(means))] if means else [], 1, prow.get("average"))
        cells["std_dev"] = Cell(
            [float(np.std(means, ddof=1))] if len(means) > 1 else [], 1, prow.get("std_dev")
        )
        tab.rows.append((row.name, cells))
    tab.notes.append(
        "Sensitivity (%) of the IDC-trained runs applied to every BreakHis image (binary benign/malignant); "
        "the paper's Fig. 5 gives these values as sensitivities. Average / Std Dev are over magnifications."
    )
    return tab


def table4(seeds: int, scale: Scale, out: Path, overrides: tuple[str, ...] = ()) -> Table:
    t = get_table("table4")
    pt = paper_table("table4")
    units = pt["units"]
    results = load_results("table4", out, seeds, scale, overrides)
    groups, planned = group_results(results), planned_counts(results)
    keys = ("macro_f1", "weighted_f1", "balanced_accuracy", "mcc")
    tab = Table(
        "table4",
        t.title,
        "Method / magnification",
        [(k, h) for k, h in zip(keys, pt["header"][2:], strict=False)],
    )
    for row in t.rows:
        docs, n = groups[(row.key, None)], planned[(row.key, None)]
        for m in MAGS:
            prow = _paper_row("table4", method=row.paper_label or row.name, magnification=m)
            cells = {
                k: _cell(docs, f"by_magnification.{m}.{k}", n, units.get(k, "fraction"), prow.get(k))
                for k in keys
            }
            tab.rows.append((f"{row.name} {m.replace('X', '×')}", cells))
    tab.notes.append(
        "One 8-class model per method and seed on all magnifications, evaluated per magnification."
    )
    return tab


def _recall_of(doc: dict, code: str, name: str) -> float | None:
    pcr = get_path(doc, "metrics.per_class_recall")
    classes = [str(c) for c in doc.get("classes") or []]
    wanted = {code.lower(), name.lower(), name.lower().replace(" ", "_")}
    if isinstance(pcr, dict):
        for k, v in pcr.items():
            if str(k).lower() in wanted:
                return v
    elif isinstance(pcr, list) and len(pcr) == len(classes):
        for c, v in zip(classes, pcr, strict=True):
            if c.lower() in wanted:
                return v
    return None


def table5(seeds: int, scale: Scale, out: Path, overrides: tuple[str, ...] = ()) -> Table:
    t = get_table("table5")
    pt = paper_table("table5")
    results = load_results("table5", out, seeds, scale, overrides)
    groups, planned = group_results(results), planned_counts(results)
    cols = [(r.paper_label or r.name, r.name) for r in t.rows]
    tab = Table("table5", t.title, "Subtype", cols)
    for prow in pt["rows"]:
        code, sname = prow["subtype"], prow["subtype_name"]
        cells = {}
        for (key, _), row in zip(cols, t.rows, strict=True):
            cells[key] = _cell(
                groups[(row.key, None)],
                lambda d, c=code, s=sname: _recall_of(d, c, s),
                planned[(row.key, None)],
                "percent",
                prow.get(key),
            )
        tab.rows.append((f"{sname} ({code})", cells))
    tab.notes.append("Recall (%) per subtype on the BreakHis test split (all magnifications).")
    return tab


def table7(seeds: int, scale: Scale, out: Path, overrides: tuple[str, ...] = ()) -> Table:
    t = get_table("table7")
    results = load_results("table7", out, seeds, scale, overrides)
    groups, planned = group_results(results), planned_counts(results)
    cols = [
        ("convergence_epoch", "Conv. epoch"),
        ("sensitivity", "Sensitivity"),
        ("balanced_accuracy", "Balanced Acc."),
        ("stability_sd", "Stability (sd)"),
    ]
    tab = Table("table7", t.title, "Initialization", cols)
    for row in t.rows:
        prow = _paper_row("table7", initialization=row.name)
        docs, n = groups[(row.key, None)], planned[(row.key, None)]
        cells = {
            "convergence_epoch": _cell(docs, "convergence.epoch", n, "epochs", prow.get("convergence_epoch")),
            "sensitivity": _cell(docs, "metrics.sensitivity", n, "percent", prow.get("sensitivity")),
            "balanced_accuracy": _cell(
                docs, "metrics.balanced_accuracy", n, "percent", prow.get("balanced_accuracy")
            ),
        }
        stab = [
            v for v in (get_path(d, "convergence.stability") for d in docs) if isinstance(v, (int, float))
        ]
        cells["stability_sd"] = Cell([float(np.mean(stab))] if stab else [], 1, prow.get("stability_sd"))
        tab.rows.append((row.name, cells))
    tab.notes.append(
        "Conv. epoch: first epoch (over all stages) whose validation balanced accuracy reaches 90% of the final "
        "epoch's, mean ± std over seeds. Stability: std (points) of validation balanced accuracy over the last "
        "10 epochs, mean over seeds (the paper does not define its column)."
    )
    return tab


def table8(seeds: int, scale: Scale, out: Path, overrides: tuple[str, ...] = ()) -> Table:
    t = get_table("table8")
    results = load_results("table8", out, 1, scale, overrides)
    groups, planned = group_results(results), planned_counts(results)
    cols = [
        ("params_m", "Params (M)"),
        ("flops_g", "GMACs"),
        ("memory_gb", "Peak train memory (GiB)"),
        ("train_img_s", "Train img/s (recipe step)"),
        ("infer_img_s", "Infer img/s"),
        ("fps", "Batch-1 FPS"),
    ]
    tab = Table("table8", t.title, "Method", cols)
    for row in t.rows:
        prow = _paper_row("table8", method=row.name)
        docs, n = groups[(row.key, None)], planned[(row.key, None)]

        def fps(d: dict) -> float | None:
            lat = get_path(d, "bench.latency_ms")
            return 1000.0 / lat if isinstance(lat, (int, float)) and lat > 0 else None

        cells = {
            "params_m": _cell(docs, "bench.params_M", n, "millions", prow.get("params_m")),
            "flops_g": _cell(docs, "bench.gmacs", n, "fraction", prow.get("flops_g")),
            "memory_gb": _cell(docs, "bench.train_peak_GiB", n, "fraction", prow.get("memory_gb")),
            "train_img_s": _cell(
                docs,
                lambda d: get_path(d, "bench.train_sam_img_s") or get_path(d, "bench.train_img_s"),
                n,
                "millions",
                None,
            ),
            "infer_img_s": _cell(docs, "bench.infer_img_s", n, "millions", None),
            "fps": _cell(docs, fps, n, "millions", prow.get("fps")),
        }
        tab.rows.append((row.name, cells))
    first = next((d for docs in groups.values() for d in docs), {})
    dev, size, batch = first.get("device"), first.get("img_size"), first.get("batch")
    tab.notes.append(
        f"Measured on {dev or '?'} at {size} px, batch {batch} (train/infer), {get_path(first, 'bench.amp')} autocast, "
        "by cmafnet.bench. GMACs = FLOPs / 2 (the paper's 'FLOPs (G)'); "
        "the paper's FPS matches batch-1 latency (SPEC §7), compare it with our Batch-1 FPS. Train img/s is the "
        "training recipe's step: with SAM (two forward/backward passes) for CMAF-Net, plain AdamW for baselines; "
        "peak memory is that of the plain step."
    )
    return tab


AGGREGATORS: dict[str, Callable[..., Table]] = {
    "table1": table1,
    "table2": table2,
    "table3": table3,
    "table4": table4,
    "table5": table5,
    "table6": table6,
    "table7": table7,
    "table8": table8,
}


def aggregate(
    name: str,
    out: Path,
    *,
    seeds: int,
    scale: Scale,
    overrides: tuple[str, ...] = (),
    match_compute: bool = False,
) -> tuple[Table, dict[str, Path]]:
    """Build table ``name`` from the runs under ``out`` and write ``table.md/csv/json`` and ``figure.png``.

    ``match_compute`` (Tables 1, 2): both views of every baseline row with their training MACs, and
    ``compute.png`` / ``compute.json``: every finished run's balanced accuracy and AUPRC against its
    training MACs.
    """
    from cmafnet.experiments.figures import FIGURES, paper_style_figure

    extra = {"match_compute": True} if match_compute else {}
    if match_compute:
        check_match_compute(name)
    table = AGGREGATORS[name](seeds, scale, Path(out), tuple(overrides), **extra)
    folder = Path(out) / name
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": folder / "table.md", "csv": folder / "table.csv", "json": folder / "table.json"}
    atomic_write_bytes(paths["markdown"], table.markdown().encode())
    recs = table.records()
    buf = io.StringIO()
    w = csv.DictWriter(
        buf, fieldnames=["row", "column", "header", "ours_mean", "ours_std", "n", "planned", "paper"]
    )
    w.writeheader()
    w.writerows(recs)
    atomic_write_bytes(paths["csv"], buf.getvalue().encode())
    write_json(
        paths["json"], {"table": name, "title": table.title, "scale": scale, "seeds": seeds, "cells": recs}
    )
    fig = FIGURES[name](table, folder / "figure.png")
    if fig is not None:
        paths["figure"] = fig
    paper_fig = paper_style_figure(
        table, folder / {"table1": "fig2.png", "table2": "fig3.png"}.get(name, "x.png")
    )
    if paper_fig is not None:
        paths["paper_figure"] = paper_fig
    if match_compute:
        paths.update(write_compute_outputs(name, Path(out), folder, seeds, scale, tuple(overrides)))
    return table, paths
