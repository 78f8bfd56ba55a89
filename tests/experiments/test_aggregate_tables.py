"""Aggregation of the declared tables from fake result documents (no training)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from cmafnet.evaluation.table import Column
from cmafnet.experiments.aggregate import aggregate, write_table
from cmafnet.experiments.paper_tables import TABLES, expand
from cmafnet.experiments.results import Invalid, ResultDoc
from cmafnet.experiments.runner import Context, run_table
from cmafnet.experiments.spec import RunSpec
from cmafnet.run import write_meta

MAG_KEYS = ("40X", "100X", "200X", "400X")
SUBTYPES = ["A", "F", "PT", "TA", "DC", "LC", "MC", "PC"]


def _finish(spec: RunSpec, run_dir: Path, ctx: Context, resume: bool) -> None:
    write_meta(run_dir, {"status": "finished"})


def _value(spec: RunSpec, k: int) -> float:
    return 0.5 + 0.01 * k + 0.001 * spec.seed + 0.05 * (spec.row == "cmafnet")


def _eval(spec: RunSpec, run_dir: Path, ctx: Context) -> dict:
    by_mag = {
        m: {"sensitivity": _value(spec, k), "macro_f1": _value(spec, k), "weighted_f1": 0.7,
            "balanced_accuracy": 0.6, "mcc": 0.4}
        for k, m in enumerate(MAG_KEYS)
    }  # fmt: skip
    recall = {c: _value(spec, k) for k, c in enumerate(SUBTYPES)}
    return {
        "metrics": {"sensitivity": _value(spec, 0), "balanced_accuracy": 0.8, "per_class_recall": recall},
        "classes": SUBTYPES,
        "by_magnification": by_mag,
        "convergence": {"epoch": 3 + spec.seed, "stability": 1.0},
        # zero-shot (Table 3): one adaptation, with its own diagnosis
        "diagnosis": {"verdict": "inverted (ranks benign above malignant)"},
        "adapted": {
            "TTA d4": {
                "metrics": {"auroc": 0.6},
                "diagnosis": {"verdict": "discriminates"},
                "by_magnification": {m: {"sensitivity": 0.9} for m in MAG_KEYS},
            }
        },
        "trivial": {
            "everything_malignant": {
                "metrics": {"auroc": 0.5, "specificity": 0.0},
                "by_magnification": {m: {"sensitivity": 1.0} for m in MAG_KEYS},
                "diagnosis": {"verdict": "trivial"},
            }
        },
    }


def _profile(spec: RunSpec, run_dir: Path, ctx: Context) -> dict:
    return {"spec": spec.to_dict(), "device": "fake", "bench": {"params_M": 10.0, "gmacs": 1.5,
            "train_peak_GiB": 2.0, "train_img_s": 100.0, "infer_img_s": 400.0, "latency_ms": 5.0}}  # fmt: skip


@pytest.fixture
def ctx(tmp_path: Path) -> Context:
    (tmp_path / "s").mkdir()
    return Context(out=tmp_path / "o", store=tmp_path / "s", breakhis_store=tmp_path / "s", scale="smoke")


def _run(name: str, ctx: Context, seeds: int = 2):
    run_table(name, ctx, seeds=seeds, train_fn=_finish, eval_fn=_eval, profile_fn=_profile)
    return write_table(name, ctx.out, seeds=seeds, scale="smoke")


def _row(md: str, label: str) -> list[str]:
    line = next(x for x in md.splitlines() if x.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_table3_per_magnification_average_and_std(ctx: Context) -> None:
    _table, paths = _run("table3", ctx)
    cells = _row(paths["markdown"].read_text(), "ResNet-50")
    # seeds 0 and 1 differ by 0.001 -> 0.1 points; 40X mean = 50.05
    assert cells[1] == "50.05 ± 0.07" and cells[2] == "87.34 ± 1.2"
    means = [50.05, 51.05, 52.05, 53.05]
    assert cells[9] == f"{np.mean(means):.2f}" and cells[11] == f"{np.std(means, ddof=1):.2f}"
    assert cells[-1] == "inverted (ranks benign above malignant)"
    # one line per test-time adaptation under each raw row, read from the run's `adapted` results
    tta = _row(paths["markdown"].read_text(), "ResNet-50 + TTA d4")
    assert tta[1] == "90.00 ± 0.00" and tta[-2] == "60.00 ± 0.00" and tta[-1] == "discriminates"
    assert _row(paths["markdown"].read_text(), "ResNet-50 + AdaBN balanced")[1] == "n/a"  # not in the results
    trivial = _row(paths["markdown"].read_text(), "Everything malignant (trivial)")
    assert trivial[1].startswith("100.00") and trivial[-4].startswith("0.00") and trivial[-1] == "trivial"


def test_table4_rows_are_method_by_magnification(ctx: Context) -> None:
    table, paths = _run("table4", ctx)
    assert len(table.rows) == 5 * 4
    cells = _row(paths["markdown"].read_text(), "ViT-S/16 400×")
    assert cells[1].startswith("53.05") and cells[2] == "76.78 ± 1.6"  # paper label 'ViT S/16' matched


def test_table5_per_class_recall(ctx: Context) -> None:
    table, paths = _run("table5", ctx)
    assert table.rows[0][0] == "Adenosis (A)" and len(table.rows) == 8
    cells = _row(paths["markdown"].read_text(), "Phyllodes Tumor (PT)")
    assert cells[1].startswith("52.05") and cells[2] == "66.06"  # ResNet-50 ours, paper
    assert cells[5].startswith("57.05")  # CMAF-Net


def test_table7_convergence_epoch(ctx: Context) -> None:
    _table, paths = _run("table7", ctx, seeds=3)
    cells = _row(paths["markdown"].read_text(), "LogNormal(0, 0.1)")
    assert cells[1] == "4.00 ± 1.00" and cells[2] == "54 ± 2.3"


def test_table8_efficiency(ctx: Context) -> None:
    _table, paths = _run("table8", ctx)
    cells = _row(paths["markdown"].read_text(), "TransFuse")
    assert cells[1] == "10.00" and cells[2] == "34.2"
    assert cells[-2] == "200.00"  # batch-1 FPS = 1000 / 5 ms
    assert paths["figure"].exists()


def test_table2_retention_with_zero_original_sensitivity(ctx: Context) -> None:
    """A collapsed CMAF-Net (sensitivity 0 at 70:30, seen in a GPU smoke run) must not crash aggregation."""

    def zero(spec: RunSpec, run_dir: Path, c: Context) -> dict:
        return {"metrics": {"sensitivity": 0.0}}

    run_table("table2", ctx, seeds=1, only=["cmafnet*"], train_fn=_finish, eval_fn=zero)
    _table, paths = write_table("table2", ctx.out, seeds=1, scale="smoke")
    cells = _row(paths["markdown"].read_text(), "Relative retention of CMAF-Net (%)")
    assert cells[1] == "n/a" and cells[2] == "100"  # finished, but undefined: not "…" (not run yet)
    assert _row(paths["markdown"].read_text(), "CMAF-Net")[1] == "0.00"


def test_a_table_declared_as_data_aggregates_typed_results() -> None:
    """Columns as data, fake results with known mean and std, an unreadable result and an unfinished run."""
    base = TABLES["table6"]
    table = replace(base, rows=base.rows[:2], columns=(
        Column("sensitivity", "Sensitivity", "metrics.sensitivity"),
        Column("params", "Params (M)", "params_m", "number", paper=False),
        Column("delta_sensitivity", "Δ Sens", derive="delta_first", of=("sensitivity",)),
    ))  # fmt: skip
    specs = [s for s in expand("table6", 3, "smoke") if s.row in {r.key for r in table.rows}]
    full = [ResultDoc(metrics={"sensitivity": v}, params_m=1.5) for v in (0.90, 0.92, 0.94)]
    bad = Invalid(Path("/o/runs/cmafnet__no_contextual/seed1/result_test.json"), "not readable JSON (line 1)")
    other = [ResultDoc(metrics={"sensitivity": 0.8}), bad, None]
    result = aggregate(table, list(zip(specs, [*full, *other], strict=True)))
    (_, a), (label, b) = result.rows
    assert a["sensitivity"].text() == "92.00 ± 2.00" and a["sensitivity"].paper == 94.92
    assert a["params"].text() == "1.50 ± 0.00" and a["delta_sensitivity"].text() == "-"
    assert label == "w/o Contextual branch (CNN only)"
    for key in ("sensitivity", "delta_sensitivity"):  # never a mean over the readable seeds only
        assert b[key].text() == "invalid: seed1/result_test.json not readable JSON"
    assert b["params"].text() == "invalid: seed1/result_test.json not readable JSON"
    assert result.invalid == [f"{bad.path}: not readable JSON (line 1)"]
    md = result.markdown()
    assert f"- invalid: {bad.path}: not readable JSON (line 1)" in md and "… = no finished run yet" in md
    # nothing finished yet: every cell says so; one seed of three: marked
    waiting = aggregate(table, [(s, None) for s in specs])
    assert {c.text() for _, cells in waiting.rows for k, c in cells.items() if k != "delta_sensitivity"} == {
        "…"
    }
    partial = aggregate(table, list(zip(specs, [full[0], None, None, *other[:1], None, None], strict=True)))
    assert partial.rows[0][1]["sensitivity"].text() == "90.00 (n=1/3)"
    assert partial.rows[1][1]["delta_sensitivity"].text() == "-10.00"
