"""The one table type: cells over runs (mean ± std, point [CI], not run, undefined, invalid), declared
columns read from documents, derived columns, and the Markdown / HTML / record forms."""

from __future__ import annotations

import numpy as np
import pytest

from cmafnet.evaluation.table import Cell, Column, TableResult, derive_cells, read_cell
from cmafnet.experiments.results import ResultDoc

SENS = Column("sensitivity", "Sensitivity (%)", "metrics.sensitivity", ci="ci.sensitivity")


def test_cells_print_like_the_paper_or_as_compact_intervals() -> None:
    seeds = [{"metrics": {"sensitivity": v}} for v in (0.9492, 0.9412, 0.9572)]
    assert read_cell(SENS, seeds).text() == "94.92 ± 0.80"  # sample std (ddof=1), percent
    assert read_cell(SENS, seeds[:1], planned=2).text() == "94.92 (n=1/2)"
    assert read_cell(SENS, [], planned=5).text() == "…"  # nothing finished yet
    assert read_cell(SENS, [{"metrics": {"sensitivity": None}}]).text() == "n/a"  # finished, undefined
    one = {"metrics": {"sensitivity": 0.9333}, "ci": {"sensitivity": {"low": 0.8333, "high": 1.0}}}
    assert read_cell(SENS, [one]).text() == "93.3 [83.3, 100]"
    auprc = Column("auprc", "AUPRC", "metrics.auprc", "fraction", ci="ci.auprc")
    doc = {"metrics": {"auprc": 0.93214}, "ci": {"auprc": {"low": 0.8712, "high": 0.98}}}
    assert read_cell(auprc, [doc]).text() == "0.932 [0.871, 0.98]"
    assert read_cell(SENS, seeds, invalid="seed1/result_test.json not readable JSON").text() == (
        "invalid: seed1/result_test.json not readable JSON"
    )
    macs = Cell([1.234e12, 1.5e12], "sig3", docs=2, planned=2)
    assert macs.text() == "1.37e+12 ± 1.9e+11"


def test_columns_read_typed_documents_alternatives_and_transforms() -> None:
    docs = [
        ResultDoc(bench={"train_img_s": 100.0, "latency_ms": 4.0}),
        ResultDoc(bench={"train_sam_img_s": 60.0, "train_img_s": 120.0, "latency_ms": 5.0}),
    ]
    rate = Column("train", "Train img/s", "bench.train_sam_img_s|bench.train_img_s", "number")
    assert read_cell(rate, docs).values == [100.0, 60.0]  # the first path that has a value
    fps = Column("fps", "FPS", "bench.latency_ms", "number", fn=lambda ms: 1000 / ms)
    assert read_cell(fps, docs).values == [250.0, 200.0]
    mag = Column("f1", "F1", "by_magnification.{mag}.macro_f1", "fraction")
    doc = ResultDoc(by_magnification={"40X": {"macro_f1": 0.5}, "100X": {"macro_f1": 0.25}})
    assert read_cell(mag, [doc], fill={"mag": "100X"}).values == [0.25]
    text = Column("device", "device", "device", "text")
    assert read_cell(text, [{"device": "cpu"}]).text() == "cpu" and read_cell(text, [{}]).text() == "n/a"


def test_derived_columns_and_rendering() -> None:
    mags = ("40X", "100X", "200X")
    cols = [
        *(Column(m, m, f"m.{m}") for m in mags),
        Column("average", "Average", derive="mean", of=mags),
        Column("std_dev", "Std Dev", derive="std", of=mags, paper=False),
        Column("delta", "Δ", derive="delta_first", of=("40X",)),
    ]
    table = TableResult("t", "t: title", "Method", cols, notes=["a note"])
    first = None
    for label, vals in (("A", (0.9, 0.8, 0.7)), ("B", (0.5, 0.6, 0.4))):
        doc = {"m": dict(zip(mags, vals, strict=True))}
        cells = {c.key: read_cell(c, [doc], paper={"40X": 91.5}.get(c.key)) for c in cols if not c.derive}
        derive_cells(cols, cells, first, {"average": 80.0})
        first = first or cells
        table.rows.append((label, cells))
    a, b = (cells for _, cells in table.rows)
    assert a["average"].text() == "80.00" and a["std_dev"].text() == f"{np.std([90, 80, 70], ddof=1):.2f}"
    assert a["delta"].text() == "-" and b["delta"].mean == pytest.approx(-40.0)
    md = table.markdown()
    assert "| Method | 40X (ours) | 40X (paper) |" in md and "| Std Dev | Δ (ours) |" in md
    assert "| A | 90.00 | 91.5 |" in md and "| 80.00 | 80 |" in md and "- a note" in md
    assert "<th>40X (ours)</th>" in table.html() and "<td>B</td>" in table.html()
    rec = next(r for r in table.records() if (r["row"], r["column"]) == ("A", "40X"))
    assert rec["ours_mean"] == pytest.approx(90.0) and rec["paper"] == 91.5 and rec["n"] == 1
