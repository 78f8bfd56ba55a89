"""What the training loop works on and where it stands: the data contract and the resumable position."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from cmafnet.training.loop import Trainer

# A loader factory: (indices, batch_size, shuffle, drop_last, epoch, start_batch) -> iterable of
# (x_uint8 (B,3,H,W), y (B,), idx (B,)) on the device.
LoaderFactory = Callable[[np.ndarray, int, bool, bool, int, int], Iterable]
Callback = Callable[["Trainer"], bool | None]  # return True to save a checkpoint and stop


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
