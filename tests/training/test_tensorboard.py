"""``train.tensorboard``: a tiny run writes its epoch rows as TensorBoard scalars that read back."""

from __future__ import annotations

import math

import pandas as pd
import pytest
from _training_toy import make_trainer, toy_config

from cmafnet.training import run_stages

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def test_tensorboard_scalars_match_metrics_csv(tmp_path) -> None:
    run_stages(make_trainer(tmp_path, toy_config(tensorboard=True)))
    rows = pd.read_csv(tmp_path / "metrics.csv")
    assert len(rows) == 6  # 3 stages x 2 epochs
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = event_accumulator.EventAccumulator(str(events[0]), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train_loss", "val_balanced_accuracy", "val_auprc", "lr"} <= tags
    assert not {"epoch", "stage", "stage_name"} & tags  # the step and the labels are not scalars
    for tag in ("train_loss", "val_auprc", "lr"):
        scalars = acc.Scalars(tag)
        # one point per epoch, at the global (1-based) epoch, with the metrics.csv value (float32)
        assert [s.step for s in scalars] == list(rows["epoch"]), tag
        for s, expected in zip(scalars, rows[tag]):
            assert math.isclose(s.value, expected, rel_tol=1e-6, abs_tol=1e-7), (tag, s.step)
