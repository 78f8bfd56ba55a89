"""What each run cost to train and what decided it (``run.json`` ``cost`` and ``budget``): the report's
"Training cost" table and the one-line form printed by ``cmafnet demo``.

Training MACs follow the trainer's convention (``cost.convention``): forward MACs per image x images x
passes x 3 (forward + backward), a SAM step being two passes. Epochs are optimiser steps over the run's
steps per epoch, per stage, so a budget-derived stage that ends mid-epoch shows a fraction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cmafnet.evaluation.table import Column, TableResult, read_cell

if TYPE_CHECKING:
    from cmafnet.evaluation.report_tables import RunInfo


@dataclass(frozen=True)
class RunFacts:
    """What reports read from a run's ``run.json``."""

    name: str | None
    cost: dict[str, Any] | None  # budget, epochs, steps, images, passes per step, MACs, seconds, device


def budget_text(budget: dict | None) -> str:
    """How the run's length was decided: its stages' epochs, a MACs budget, or another run's MACs."""
    if not budget:
        return "the configured epochs"
    target = f"{budget.get('target_macs', 0):.3g}"
    if budget.get("kind") == "match":
        return f"{Path(str(budget.get('match'))).name}'s training MACs ({target})"
    return f"{target} training MACs"


def _epochs(x: float | None) -> str:
    return "?" if x is None else f"{x:.0f}" if abs(x - round(x)) < 0.05 else f"{x:.1f}"


def run_facts(meta: dict) -> RunFacts:
    """The one reader of ``run.json`` for reports and the demo: the run's name, and its budget and cost as
    plain numbers (None for a run that recorded no cost)."""
    cost = meta.get("cost") or {}
    total = cost.get("total") or {}
    if not total.get("steps"):
        return RunFacts(meta.get("name"), None)
    spe = meta.get("steps_per_epoch") or 0
    stages = {k: c["steps"] / spe for k, c in (cost.get("stages") or {}).items()} if spe else {}
    return RunFacts(meta.get("name"), {
        "budget": budget_text(meta.get("budget")),
        "epochs_per_stage": "+".join(_epochs(e) for e in stages.values()),
        "epochs": total["steps"] / spe if spe else None,
        "steps": total["steps"],
        "images": total.get("images"),
        "passes_per_step": total.get("passes", 0) / total["steps"],
        "macs": total.get("macs"),
        "seconds": total.get("seconds"),
        "device": cost.get("device"),
    })  # fmt: skip


def cost_line(meta: dict) -> str | None:
    """One line: the budget, then epochs, steps, training MACs and seconds (None without a cost record)."""
    s = run_facts(meta).cost
    if s is None:
        return None
    epochs = f"{_epochs(s['epochs'])} epochs"
    if "+" in s["epochs_per_stage"]:
        epochs += f" ({s['epochs_per_stage']})"
    passes = "" if s["passes_per_step"] == 1 else f", {s['passes_per_step']:.0f} passes per step (SAM)"
    return (
        f"budget: {s['budget']}; trained {epochs}, {s['steps']} steps{passes}, "
        f"{s['macs']:.3g} training MACs, {s['seconds']:.0f} s"
    )


COLUMNS = (
    Column("model", "model", "model", "text", paper=False),
    Column("budget", "budget", "budget", "text", paper=False),
    Column("epochs_per_stage", "epochs per stage", "epochs_per_stage", "text", paper=False),
    Column("epochs", "epochs", "epochs_text", "text", paper=False),
    Column("steps", "optimiser steps", "steps", "count", paper=False),
    Column("images", "training images", "images", "count", paper=False),
    Column("passes_per_step", "passes per step", "passes_per_step", "sig3", paper=False),
    Column("macs", "training MACs", "macs", "sig3", paper=False),
    Column("seconds", "seconds", "seconds", "count", paper=False),
    Column("device", "device", "device", "text", paper=False),
)


def cost_table(runs: Sequence[RunInfo]) -> list[TableResult]:
    """The "Training cost" table: one row per run that recorded a cost."""
    table = TableResult("training_cost", "Each run's budget and recorded training cost", "run", list(COLUMNS))
    table.notes.append(
        "Training MACs = forward MACs per image x training images x passes x 3 (forward + backward; a SAM step "
        "is two passes), as the run recorded them; epochs = optimiser steps / steps per epoch. Seconds: "
        "optimiser steps only (validation excluded)."
    )
    for run in runs:
        if run.cost is not None:
            doc = {**run.cost, "model": run.model, "epochs_text": _epochs(run.cost["epochs"])}
            table.rows.append((run.name, {c.key: read_cell(c, [doc]) for c in COLUMNS}))
    return [table] if table.rows else []
