"""Learning-rate schedules per stage, as plain functions of the step (nanoGPT ``get_lr`` style).

Each returns the multiplier of the stage's base lr at optimiser step ``step`` of ``total`` steps.
The schedule state is therefore just (stage, step): the checkpoint stores those, nothing else.
"""

from __future__ import annotations

import math

CYCLIC_FLOOR = 0.1  # triangular cycles run between 0.1 * lr and lr (docs/decisions/training.md)


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


def constant(step: int, total: int) -> float:
    return 1.0


def lr_factor(name: str, step: int, total: int, *, warmup: int = 0, cycles: int = 1) -> float:
    """Dispatch on the schedule name of a :class:`~cmafnet.config.StageConfig`."""
    if name == "cosine":
        return cosine(step, total)
    if name == "warmup_cosine":
        return warmup_cosine(step, total, warmup)
    if name == "cyclic":
        return cyclic(step, total, cycles)
    if name == "constant":
        return constant(step, total)
    raise ValueError(f"unknown lr schedule '{name}'")
