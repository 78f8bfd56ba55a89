"""Build a paper table from its runs' results: one generic aggregation over the table's declared columns.

:func:`aggregate` turns a :class:`~cmafnet.experiments.spec.TableDef` and its runs' typed results into a
:class:`~cmafnet.evaluation.table.TableResult`: mean ± std over seeds beside the paper's cell, ``n=3/5``
when seeds are missing, ``…`` when none has finished, ``invalid: ...`` when a result file cannot be read.
:func:`write_table` writes ``<out>/<table>/table.md|csv|json`` and ``figure.png``. Our metrics are
fractions; each column prints them in its unit (percent or fraction, as the paper does).
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cmafnet.data.datasets import BreakHis
from cmafnet.evaluation.paper import find_row
from cmafnet.evaluation.table import Cell, Column, TableResult, derive_cells, read_cell
from cmafnet.experiments.compute import (
    EXTRACTION_NOTE,
    MACS_NOTE,
    compute_columns,
    view_rows,
    write_compute_outputs,
)
from cmafnet.experiments.paper_tables import MAGS, ZERO_SHOT_ADAPTATIONS, check_match_compute, get_table
from cmafnet.experiments.results import Invalid, ResultDoc
from cmafnet.experiments.runner import Result, load_results
from cmafnet.experiments.spec import RunSpec, Scale, TableDef
from cmafnet.run import atomic_write_bytes, write_json

NOT_RUN_NOTE = "… = no finished run yet; (n=k/m) = k of m seeds finished."


@dataclass(frozen=True)
class Line:
    """One printed row: its label, whose runs it reads, what fills ``{mag}`` / ``{cls}``, the paper's row."""

    label: str
    row: str | None  # run row key (None: each column names its own, Table 5)
    fill: Mapping[str, str]
    paper: Mapping[str, str] | None  # fields that find the paper's row (None: the paper has none)


def lines_of(table: TableDef, match_compute: bool = False) -> list[Line]:
    """The printed rows: one per row (both views with ``match_compute``), per row and magnification, or
    per BreakHis subtype."""
    if table.lines == "class":
        names = {c: f.replace("_", " ").title() for c, f in BreakHis.SUBTYPE_FOLDERS.items()}
        return [Line(f"{names[c]} ({c})", None, {"cls": c}, {"subtype": c}) for c in BreakHis.SUBTYPES]
    out = []
    for v in view_rows(table, match_compute):
        paper = {table.paper_key: v.paper.paper_label or v.paper.name} if v.paper else None
        if table.lines == "magnification":
            out += [
                Line(
                    f"{v.label} {m.replace('X', '×')}",
                    v.key,
                    {"mag": m},
                    paper and {**paper, "magnification": m},
                )
                for m in MAGS
            ]
        elif table.lines == "adaptation":  # Table 3: the raw zero-shot line, then one per adaptation
            out.append(Line(v.label, v.key, {"adapt": ""}, paper))
            out += [
                Line(f"{v.label} + {a}", v.key, {"adapt": f"adapted.{a}."}, None)
                for a in ZERO_SHOT_ADAPTATIONS
            ]
        else:
            out.append(Line(v.label, v.key, {}, paper))
    if table.lines == "adaptation" and out:  # the trivial rows, read from the first row's runs (same images)
        out += [Line(f"{t.replace('_', ' ').capitalize()} (trivial)", out[0].row, {"adapt": f"trivial.{t}."}, None)
                for t in ("everything_malignant", "everything_benign")]  # fmt: skip
    return out


def _cell(column: Column, line: Line, results: list[Result], paper: Mapping) -> Cell:
    docs = [r for r in results if isinstance(r, ResultDoc)]
    bad = next((r.short for r in results if isinstance(r, Invalid)), None)
    value = paper.get(column.key) if column.paper else None
    return read_cell(column, docs, planned=len(results), paper=value, fill=line.fill, invalid=bad)


def aggregate(
    table: TableDef,
    results: list[tuple[RunSpec, Result]],
    match_compute: bool = False,
    foundation: bool = False,
) -> TableResult:
    """The table from its runs' results (``runner.load_results``): one cell per line and column;
    ``match_compute`` / ``foundation`` (probe rows) add the recorded training MACs."""
    groups: dict[tuple[str, str | None], list[Result]] = defaultdict(list)
    for spec, res in results:
        groups[(spec.row, spec.column)].append(res)
    columns = [*table.columns, *(compute_columns(table, foundation) if match_compute or foundation else ())]
    out = TableResult(table.name, f"{table.name}: {table.title}", table.row_header, columns)
    first = None
    for line in lines_of(table, match_compute):
        prow = (find_row(table.name, **line.paper) or {}) if line.paper else {}
        cells = {
            c.key: _cell(c, line, groups[(c.row or line.row, c.ratio)], prow) for c in columns if not c.derive
        }
        derive_cells(columns, cells, first, prow)
        first = cells if first is None else first
        out.rows.append((line.label, cells))
    if table.retention_of is not None:
        out.rows.append(_retention(table, out))
    fields = _note_fields([r for _, r in results if isinstance(r, ResultDoc)])
    out.notes += [n.format(**fields) for n in table.notes] + [
        NOT_RUN_NOTE,
        *([MACS_NOTE] if match_compute or foundation else []),
        *([EXTRACTION_NOTE] if foundation else []),
    ]
    out.invalid = list(dict.fromkeys(r.line for _, r in results if isinstance(r, Invalid)))
    return out


def _retention(table: TableDef, out: TableResult) -> tuple[str, dict[str, Cell]]:
    """Table 2's last row: a row's sensitivity per ratio as a percentage of its first ratio's."""
    row = next(r for r in table.rows if r.key == table.retention_of)
    cells = dict(next(c for label, c in out.rows if label == row.name))
    paper = find_row(table.name, method="Relative Retention (%)") or {}
    base = cells[table.columns[0].key].mean
    ret = {}
    for c in table.columns:
        m = cells[c.key].mean
        ret[c.key] = Cell([100 * m / base] if base and m is not None else [], "number", cells[c.key].docs,
                          1, paper.get(c.key))  # fmt: skip
    return f"Relative retention of {row.name} (%)", ret


def _note_fields(docs: list[ResultDoc]) -> dict[str, str]:
    """What a table's notes may name about the runs (Table 8: the device and settings it was measured at)."""
    d = docs[0] if docs else ResultDoc()
    amp = (d.bench or {}).get("amp")
    return {k: "?" if v is None else str(v) for k, v in
            {"device": d.device, "img_size": d.img_size, "batch": d.batch, "amp": amp}.items()}  # fmt: skip


def write_table(
    name: str,
    out: Path,
    *,
    seeds: int,
    scale: Scale,
    overrides: tuple[str, ...] = (),
    match_compute: bool = False,
    foundation: tuple[str, ...] = (),
) -> tuple[TableResult, dict[str, Path]]:
    """Aggregate table ``name`` from the runs under ``out``; write ``table.md/csv/json`` and ``figure.png``.

    ``match_compute`` (Tables 1, 2): both views of every baseline row with their training MACs, and
    ``compute.png`` / ``compute.json``: every finished run's balanced accuracy and AUPRC against its
    training MACs. ``foundation``: the probe rows of these catalogue models (Tables 1 and 3), with the
    training and extraction MACs of every row.
    """
    from cmafnet.evaluation.plots import table_figure

    if match_compute:
        check_match_compute(name)
    table = get_table(name, foundation)
    results = load_results(
        name, Path(out), seeds if table.seeded else 1, scale, tuple(overrides), match_compute, foundation
    )
    result = aggregate(table, results, match_compute, bool(foundation))
    folder = Path(out) / name
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": folder / "table.md", "csv": folder / "table.csv", "json": folder / "table.json"}
    atomic_write_bytes(paths["markdown"], result.markdown().encode())
    recs = result.records()
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(recs[0]) if recs else ["row"])
    w.writeheader()
    w.writerows(recs)
    atomic_write_bytes(paths["csv"], buf.getvalue().encode())
    write_json(
        paths["json"], {"table": name, "title": table.title, "scale": scale, "seeds": seeds, "cells": recs}
    )
    f = table.figure
    rows = [line.label for line in lines_of(table, match_compute)]  # not Table 2's retention row
    paths["figure"] = table_figure(result, f.kind, f.keys, folder / "figure.png", rows=rows, ylabel=f.ylabel,
                                   xlabel=f.xlabel)  # fmt: skip
    if match_compute:
        paths.update(write_compute_outputs(name, results, folder, scale))
    return result, paths
