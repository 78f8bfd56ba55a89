"""Training engine: three-stage schedule, SAM under mixed precision, adaptive clipping, exact resume,
DDP and the per-epoch monitors (SPEC §3). The entry point is :func:`fit`."""

from __future__ import annotations

from cmafnet.training.fit import fit, prepare_data
from cmafnet.training.loop import Progress, TrainData, Trainer

__all__ = ["Progress", "TrainData", "Trainer", "fit", "prepare_data"]
