"""The report's training-cost table and the demo's budget line, from run.json's cost and budget records."""

from __future__ import annotations

from pathlib import Path

from cmafnet.evaluation.report_tables import RunInfo
from cmafnet.evaluation.tables_cost import cost_line, cost_table, run_facts


def _meta(budget: dict | None, stages: dict[str, tuple[int, int]]) -> dict:
    """run.json fields: 10 steps per epoch, batch 32, 1e8 forward MACs per image; stages: name -> (steps, passes)."""
    cost = {
        name: {
            "steps": n,
            "images": 32 * n,
            "passes": p * n,
            "macs": 1e8 * 32 * n * p * 3,
            "seconds": 2.0 * n,
        }
        for name, (n, p) in stages.items()
    }
    total = {k: sum(c[k] for c in cost.values()) for k in ("steps", "images", "passes", "macs", "seconds")}
    return {
        "steps_per_epoch": 10,
        "budget": budget,
        "cost": {"stages": cost, "total": total, "device": "cpu"},
    }


def test_a_matched_run_states_its_reference_and_fractional_epochs() -> None:
    meta = _meta({"kind": "match", "match": "/x/runs/cmafnet", "target_macs": 4.4e11}, {"single": (45, 1)})
    assert cost_line(meta) == (
        "budget: cmafnet's training MACs (4.4e+11); trained 4.5 epochs, 45 steps, 4.32e+11 training MACs, 90 s"
    )
    sam = _meta(None, {"branches": (20, 2), "fusion": (10, 2), "end_to_end": (20, 2)})
    assert cost_line(sam) == (
        "budget: the configured epochs; trained 5 epochs (2+1+2), 50 steps, 2 passes per step (SAM), "
        "9.6e+11 training MACs, 100 s"
    )
    assert cost_line({"cost": None}) is None  # a run from before cost records


def test_cost_table_has_a_row_per_run_that_recorded_a_cost() -> None:
    meta = _meta({"kind": "macs", "match": None, "target_macs": 1e12}, {"s": (3, 1)})
    runs = [RunInfo(Path("a"), "a", "resnet18", run_facts(meta).cost), RunInfo(Path("b"), "b")]
    (table,) = cost_table(runs)
    assert [label for label, _ in table.rows] == ["a"]
    row = {c.header: table.rows[0][1][c.key].text() for c in table.columns}
    assert row["budget"] == "1e+12 training MACs" and row["optimiser steps"] == "3" and row["epochs"] == "0.3"
    assert row["model"] == "resnet18" and row["training MACs"] == "2.88e+10"
    assert cost_table([runs[1]]) == []
