"""The schedules of a training step, as plain functions of its position (nanoGPT ``get_lr`` style).

:func:`schedule_at` gives the :class:`ScheduleValues` of one optimiser step: the learning rate, the
classification loss's clock (A-CBFL alpha(t), LDAM's DRW) and the beta ramp. The loop computes them
before every step and passes them in; the step and the losses keep no schedule state, and a step
captured in a CUDA graph reads them from device scalars written before each replay
(:class:`~cmafnet.training.graphs.GraphMode`). The position, and so every schedule, is in the
checkpoint (docs/decisions/training.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from cmafnet.config import RegularizerConfig, StageConfig
from cmafnet.losses.regularizers import ramp_weight
from cmafnet.training.budget import stage_steps

CYCLIC_FLOOR = 0.1  # triangular cycles run between 0.1 * lr and lr (docs/decisions/training.md)


@dataclass(frozen=True)
class ScheduleValues:
    """What the schedules give one optimiser step (floats, or 0-d device tensors in a captured step)."""

    lr: float | Tensor  # the learning rate of every parameter group
    epoch: float | Tensor  # the loss clock: fractional epoch within the stage (A-CBFL alpha, LDAM DRW)
    beta_ramp: float | Tensor  # in [0, 1]: beta_i = regularizers.beta_i * beta_ramp


def cosine(step: int, total: int) -> float:
    """Half cosine from 1 to 0 over the stage."""
    t = min(step / max(total, 1), 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * t))


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Linear warm-up from ~0 to 1 over ``warmup`` steps, then cosine to 0 over the rest."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return cosine(step - warmup, max(total - warmup, 1))


def cyclic(step: int, total: int, cycles: int) -> float:
    """Triangular cycles (Smith, 2017): ``cycles`` times up from the floor to 1 and back."""
    length = max(total / max(cycles, 1), 1.0)
    phase = (step % length) / length  # in [0, 1)
    tri = 1.0 - abs(2.0 * phase - 1.0)  # 0 -> 1 -> 0
    return CYCLIC_FLOOR + (1.0 - CYCLIC_FLOOR) * tri


def lr_factor(name: str, step: int, total: int, *, warmup: int = 0, cycles: int = 1) -> float:
    """The multiplier of the stage's base lr at optimiser step ``step`` of ``total`` (schedule ``name``)."""
    if name == "cosine":
        return cosine(step, total)
    if name == "warmup_cosine":
        return warmup_cosine(step, total, warmup)
    if name == "cyclic":
        return cyclic(step, total, cycles)
    if name == "constant":
        return 1.0
    raise ValueError(f"unknown lr schedule '{name}'")


def uses_ramp(stage: StageConfig) -> bool:
    """The beta ramp clock runs from the first stage that trains the fusion (stage 2 onwards)."""
    return stage.train != "branches"


def beta_ramp(epochs_into_ramp: float, reg: RegularizerConfig) -> float:
    """The beta ramp at ``epochs_into_ramp``: 0 -> 1 linearly over ``regularizers.ramp_epochs``, or 1
    when ``beta_schedule`` is ``fixed``."""
    return ramp_weight(1.0, epochs_into_ramp, schedule=reg.beta_schedule, ramp_epochs=reg.ramp_epochs)


def schedule_at(
    stage: StageConfig,
    reg: RegularizerConfig,
    *,
    epoch: int,
    step: int,
    steps_per_epoch: int,
    ramp_epochs: float,
) -> ScheduleValues:
    """The schedules at step ``step`` (0-based) of epoch ``epoch`` of ``stage``.

    Args:
        stage: the stage (its lr, lr schedule, warm-up, cycles, step count, kind).
        reg: the ``regularizers`` section (the beta schedule).
        epoch: the epoch within the stage.
        step: optimiser steps already done in that epoch.
        steps_per_epoch: optimiser steps of a full epoch.
        ramp_epochs: epochs completed on the beta-ramp clock before this epoch (it counts the epochs
            of every stage that :func:`uses_ramp`; a ``branches`` stage leaves it where it is).
    """
    frac = step / steps_per_epoch
    warmup = round(stage.warmup_epochs * steps_per_epoch)
    total = stage_steps(stage, steps_per_epoch)
    factor = lr_factor(stage.schedule, epoch * steps_per_epoch + step, total, warmup=warmup,
                       cycles=stage.cyclic_cycles)  # fmt: skip
    ramp = ramp_epochs + frac if uses_ramp(stage) else ramp_epochs
    return ScheduleValues(lr=stage.lr * factor, epoch=epoch + frac, beta_ramp=beta_ramp(ramp, reg))
