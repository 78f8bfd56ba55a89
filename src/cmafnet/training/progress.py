"""What a training run works on and where it stands: the data contract, the resumable position, and the
run context the stage runner and the epoch functions share."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cmafnet.config import Config, TrainConfig
from cmafnet.training import distributed as distr
from cmafnet.training.records import RunRecords

# A loader factory: (train, epoch, start_batch) -> iterable of (x_uint8 (B,3,H,W), y (B,), idx (B,)) on the
# device: the training split (shuffled per epoch, whole batches of train.batch_size, from batch
# start_batch on) or the validation split (in order, train.eval_batch_size).
LoaderFactory = Callable[[bool, int, int], Iterable]
Callback = Callable[["TrainRun"], bool | None]  # called after every step; True = save a checkpoint and stop


@dataclass
class TrainData:
    """Everything the loop needs from the data side (built by ``fit`` or by a test)."""

    make_loader: LoaderFactory
    train_idx: np.ndarray
    val_idx: np.ndarray
    labels: np.ndarray  # (N,) targets of the whole store
    classes: list[str]
    preprocess_train: Callable[[torch.Tensor], torch.Tensor]
    preprocess_eval: Callable[[torch.Tensor], torch.Tensor]
    meta: dict = field(default_factory=dict)  # store_hash, split_hash, stain_reference, ...

    @property
    def class_counts(self) -> list[int]:
        return np.bincount(self.labels[self.train_idx], minlength=len(self.classes)).tolist()


@dataclass
class Progress:
    """The resumable position of a run and its book-keeping (plain types: goes into checkpoints)."""

    stage: int = 0
    epoch: int = 0  # epoch within the stage being run
    step_in_epoch: int = 0  # optimiser steps done in that epoch
    global_step: int = 0
    global_epoch: int = 0  # completed epochs, all stages
    ramp_epochs: float = 0.0  # completed epochs on the beta-ramp clock (stage 2 onwards)
    best_metric: float = -math.inf
    best_epoch: int = -1
    es_best: float = -math.inf
    es_bad_epochs: int = 0
    nonfinite_total: int = 0
    nonfinite_run: int = 0  # consecutive
    epoch_sums: dict = field(default_factory=dict)  # running sums of the current epoch's terms
    epoch_count: int = 0
    lr: float = 0.0  # of the last step (logged)
    # training time of the current epoch (steps with their data path; validation excluded) and the
    # steps it covers
    epoch_train_s: float = 0.0
    epoch_timed_steps: int = 0
    # what each stage has cost so far: {name: {steps, images, passes, macs, seconds}} (records.COST_KEYS)
    stage_cost: dict = field(default_factory=dict)
    macs_per_image: int = 0  # forward MACs of one image (models.complexity): the unit of the cost records
    extraction: dict = field(default_factory=dict)  # a probe's feature extraction cost (training.probe_data)


@dataclass
class TrainRun:
    """One training run: what it trains, on what, where it writes, and where it stands.

    Built by :func:`cmafnet.training.fit.fit` (or by a test) and driven by
    :func:`cmafnet.training.fit.run_stages`; the epoch functions of :mod:`cmafnet.training.epoch` read
    and advance it. ``p`` and ``rows`` are what a checkpoint restores.
    """

    cfg: Config
    model: nn.Module
    objective: nn.Module
    data: TrainData
    out: Path
    info: distr.DistInfo
    roles: dict[str, list[nn.Parameter]]
    steps_per_epoch: int
    records: RunRecords
    scaler: torch.amp.GradScaler | None = None
    show_progress: bool = True
    prefetch: bool = True  # on CUDA, prepare batch i + 1 on a side stream during step i (same results)
    stop_after_steps: int | None = None
    callbacks: list[Callback] = field(default_factory=list)
    p: Progress = field(default_factory=Progress)
    rows: list[dict] = field(default_factory=list)
    stop_signal: int | None = None  # set by the SIGINT/SIGTERM handler
    resume_state: dict | None = None  # a checkpoint whose stage-specific parts load on stage entry
    stage_step: Any = None  # the StageStep of the stage being run
    last_save_step: int = 0  # global step of the last checkpoint (periodic checkpoints)
    last_save_time: float = 0.0  # time.monotonic() of it

    @property
    def tc(self) -> TrainConfig:
        return self.cfg.train

    @property
    def device(self) -> torch.device:
        return self.info.device
