"""Training engine: three-stage schedule, SAM under mixed precision, adaptive clipping, exact resume,
DDP and the per-epoch monitors (docs/decisions/training.md). The entry point is :func:`fit`; :func:`prepare_stage` builds
the optimiser update a stage runs (the one :mod:`cmafnet.bench` times)."""

from __future__ import annotations

from cmafnet.training.data import prepare_data
from cmafnet.training.fit import build_run, fit, prepare_objective, run_stages
from cmafnet.training.progress import Progress, TrainData, TrainRun
from cmafnet.training.stages import StageStep, prepare_stage
from cmafnet.training.step import StepResult, TrainStep

__all__ = [
    "Progress", "StageStep", "StepResult", "TrainData", "TrainRun", "TrainStep", "build_run", "fit",
    "prepare_data", "prepare_objective", "prepare_stage", "run_stages",
]  # fmt: skip
