"""What each run cost to train and what decided it (``run.json`` ``cost`` and ``budget``): the report's
"Training cost" table and the one-line form printed by ``cmafnet demo``.

Training MACs follow the trainer's convention (``cost.convention``): forward MACs per image x images x
passes x 3 (forward + backward), a SAM step being two passes. Epochs are optimiser steps over the run's
steps per epoch, per stage, so a budget-derived stage that ends mid-epoch shows a fraction.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cmafnet.evaluation.report_tables import RunInfo, Table

COLUMNS = [
    "run", "model", "budget", "epochs per stage", "epochs", "optimiser steps", "training images",
    "passes per step", "training MACs", "seconds", "device",
]  # fmt: skip


def budget_text(budget: dict | None) -> str:
    """How the run's length was decided: its stages' epochs, a MACs budget, or another run's MACs."""
    if not budget:
        return "the configured epochs"
    target = f"{budget.get('target_macs', 0):.3g}"
    if budget.get("kind") == "match":
        return f"{Path(str(budget.get('match'))).name}'s training MACs ({target})"
    return f"{target} training MACs"


def _epochs(x: float) -> str:
    return f"{x:.0f}" if abs(x - round(x)) < 0.05 else f"{x:.1f}"


def cost_summary(meta: dict) -> dict[str, Any] | None:
    """The run's budget and cost as plain numbers, or None for a run that recorded no cost."""
    cost = meta.get("cost") or {}
    total = cost.get("total") or {}
    if not total.get("steps"):
        return None
    spe = meta.get("steps_per_epoch") or 0
    stages = cost.get("stages") or {}
    return {
        "budget": budget_text(meta.get("budget")),
        "stage_epochs": {k: c["steps"] / spe for k, c in stages.items()} if spe else {},
        "epochs": total["steps"] / spe if spe else None,
        "steps": total["steps"],
        "images": total.get("images"),
        "passes_per_step": total.get("passes", 0) / total["steps"],
        "macs": total.get("macs"),
        "seconds": total.get("seconds"),
        "device": cost.get("device"),
    }


def cost_line(meta: dict) -> str | None:
    """One line: the budget, then epochs, steps, training MACs and seconds (None without a cost record)."""
    s = cost_summary(meta)
    if s is None:
        return None
    per_stage = "+".join(_epochs(e) for e in s["stage_epochs"].values())
    epochs = f"{_epochs(s['epochs'])} epochs" if s["epochs"] is not None else "? epochs"
    if len(s["stage_epochs"]) > 1:
        epochs += f" ({per_stage})"
    passes = "" if s["passes_per_step"] == 1 else f", {s['passes_per_step']:.0f} passes per step (SAM)"
    return (
        f"budget: {s['budget']}; trained {epochs}, {s['steps']} steps{passes}, "
        f"{s['macs']:.3g} training MACs, {s['seconds']:.0f} s"
    )


def cost_tables(runs: Sequence[RunInfo]) -> tuple[list[Table], list[dict]]:
    """The "Training cost" table (one row per run that recorded a cost) and its data for report.json."""
    rows, data = [], []
    for run in runs:
        s = cost_summary(run.meta)
        if s is None:
            continue
        model = (run.config.get("model") or {}).get("name") or run.meta.get("model")
        rows.append([
            run.name, model, s["budget"], "+".join(_epochs(e) for e in s["stage_epochs"].values()),
            _epochs(s["epochs"]) if s["epochs"] is not None else None, s["steps"], s["images"],
            f"{s['passes_per_step']:.3g}", f"{s['macs']:.3g}", f"{s['seconds']:.0f}", s["device"],
        ])  # fmt: skip
        data.append({"run": run.name, "model": model, **s})
    if not rows:
        return [], []
    note = (
        "Training MACs = forward MACs per image x training images x passes x 3 (forward + backward; a SAM step "
        "is two passes), as the run recorded them; epochs = optimiser steps / steps per epoch. Seconds: "
        "optimiser steps only (validation excluded)."
    )
    return [Table("Training cost", COLUMNS, rows, note)], data
