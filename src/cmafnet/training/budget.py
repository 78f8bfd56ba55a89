"""Compute budgets (``train.budget``): a run's optimiser steps derived from a number of training MACs, or
from another run's recorded training MACs, so models can be compared at equal compute as well as at
equal epochs.

A step costs ``forward MACs per image x batch x passes x 3`` (passes: 2 with SAM, records.COST_CONVENTION),
the same for every stage under that convention. The stages keep the proportions of their configured
epochs: each gets ``f x epochs x steps per epoch`` steps with ``f`` chosen so the total hits the budget
(the last stage absorbs the rounding, so the run lands within one step's cost of it). The resolved
step counts are written into the run's config (``train.stages[i].steps``, ``train.budget`` cleared), and
what was asked for into run.json (``budget``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from cmafnet.config import Config
from cmafnet.errors import ConfigError, RunFolderError
from cmafnet.run import cost_total, read_meta
from cmafnet.training.records import step_macs, step_passes

log = logging.getLogger(__name__)


def stage_steps(stage: object, steps_per_epoch: int) -> int:
    """The optimiser steps a stage runs: its ``steps`` when set, else epochs x steps per epoch."""
    return stage.steps if stage.steps is not None else stage.epochs * steps_per_epoch


def stage_epochs(stage: object, steps_per_epoch: int) -> int:
    """Epochs a stage runs (its last one possibly cut short by ``steps``)."""
    return math.ceil(stage_steps(stage, steps_per_epoch) / max(steps_per_epoch, 1))


def epoch_steps(stage: object, epoch: int, steps_per_epoch: int) -> int:
    """Steps of epoch ``epoch`` (0-based) of ``stage``: full epochs, then what is left of its steps."""
    return max(0, min(steps_per_epoch, stage_steps(stage, steps_per_epoch) - epoch * steps_per_epoch))


def recorded_macs(run_dir: str | Path) -> float:
    """The training MACs a run folder records (run.json ``cost.total.macs``).

    Raises:
        RunFolderError: no readable run.json, or a run that recorded no cost (no step finished).
    """
    try:
        meta = read_meta(run_dir)
    except RunFolderError as err:
        raise RunFolderError(f"train.budget.match: {err}") from None
    macs = (cost_total(meta) or {}).get("macs")
    if not macs:
        raise RunFolderError(f"train.budget.match: {run_dir} records no training cost (did it train a step?)")
    if meta.get("status") != "finished":
        log.warning(
            "train.budget.match: %s is %s, not finished: matching the %.3g MACs it has spent so far",
            run_dir, meta.get("status"), macs,
        )  # fmt: skip
    return float(macs)


def resolve_budget(cfg: Config, macs_per_image: int, steps_per_epoch: int) -> tuple[Config, dict | None]:
    """The config with the budget turned into stage step counts, and run.json's ``budget`` record.

    Returns ``(cfg, None)`` unchanged without ``train.budget``.

    Raises:
        ConfigError: a budget too small for one step, or a model whose MACs could not be counted.
    """
    tc = cfg.train
    if tc.budget is None:
        return cfg, None
    target = tc.budget.macs if tc.budget.macs is not None else recorded_macs(tc.budget.match)
    per_step = step_macs(macs_per_image, tc.batch_size, step_passes(tc.sam.rho if tc.sam.enabled else 0.0))
    if per_step <= 0:
        raise ConfigError("train.budget: the model's forward MACs could not be counted")
    active = [i for i, s in enumerate(tc.stages) if stage_steps(s, steps_per_epoch) > 0]
    planned = {i: stage_steps(tc.stages[i], steps_per_epoch) for i in active}
    total_steps = target / per_step
    if total_steps < len(active) - 0.5:
        raise ConfigError(
            f"train.budget: {target:.3g} MACs buy {total_steps:.2f} steps of {per_step:.3g} MACs each; "
            f"the {len(active)} stage(s) need at least one step each"
        )
    scale = total_steps / sum(planned.values())
    steps = {i: max(1, round(planned[i] * scale)) for i in active[:-1]}
    steps[active[-1]] = max(1, round(total_steps - sum(steps.values())))  # absorbs the rounding
    out = cfg.model_copy(deep=True)
    out.train.budget = None
    for i, n in steps.items():
        out.train.stages[i].steps = n
        out.train.stages[i].epochs = math.ceil(n / steps_per_epoch)
    record = {
        "kind": "macs" if tc.budget.macs is not None else "match",
        "match": tc.budget.match,
        "target_macs": target,
        "planned_macs": sum(steps.values()) * per_step,
        "macs_per_step": per_step,
        "steps": {tc.stages[i].name: n for i, n in steps.items()},
        "epochs_as_configured": {tc.stages[i].name: tc.stages[i].epochs for i in active},
        "steps_per_epoch": steps_per_epoch,
    }
    return out, record
