"""Information monitors against closed forms, and early stopping / best-model bookkeeping."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from _training_toy import make_trainer, toy_config

from cmafnet.analysis.information import (
    MonitorAccumulator,
    attention_entropy,
    class_margins,
    gaussian_mutual_information,
    kl_to_standard_normal,
)
from cmafnet.models.output import ModelOutput


def test_kl_and_attention_entropy_closed_forms():
    mu, lv = torch.zeros(2, 5, 4), torch.zeros(2, 5, 4)
    assert torch.allclose(kl_to_standard_normal(mu, lv), torch.zeros(2))
    mu[0] = 1.0  # KL = 0.5 * sum(mu^2) = 2 per token
    assert kl_to_standard_normal(mu, lv).tolist() == pytest.approx([2.0, 0.0])
    uniform = torch.full((1, 3, 6, 10), 0.1)
    assert attention_entropy(uniform).tolist() == pytest.approx([math.log(10)] * 3, rel=1e-5)
    onehot = torch.zeros(1, 1, 2, 4)
    onehot[..., 0] = 1
    assert attention_entropy(onehot).item() == pytest.approx(0.0, abs=1e-6)


def test_class_margins():
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    s, c = class_margins(logits, torch.tensor([0, 1, 1]), 2)
    assert (s / c).tolist() == pytest.approx([2.0, (3.0 - 1.0) / 2])


def test_gaussian_mi_matches_analytic_value():
    rng = np.random.default_rng(0)
    rho = 0.8
    a = rng.standard_normal((4000, 1))
    b = rho * a + math.sqrt(1 - rho**2) * rng.standard_normal((4000, 1))
    assert gaussian_mutual_information(a, b) == pytest.approx(-0.5 * math.log(1 - rho**2), rel=0.05)
    assert gaussian_mutual_information(a, rng.standard_normal((4000, 1))) < 0.01


def test_accumulator_fusion_lower_bound_and_gate():
    acc = MonitorAccumulator(2)
    y = torch.tensor([0, 1, 0, 1])
    out = ModelOutput(logits=torch.zeros(4, 2), gate=torch.full((4, 3, 2, 2), 0.25), tau=torch.tensor([1.5]))
    acc.update(out, y)
    r = acc.result()
    # uniform predictions on balanced labels: CE = H(Y) = log 2, so the bound is 0
    assert r["mi_zfused_y_lb"] == pytest.approx(0.0, abs=1e-6) and r["val_ce"] == pytest.approx(math.log(2))
    assert r["gate_mean"] == pytest.approx(0.25) and r["gate_std"] == pytest.approx(0.0, abs=1e-6)
    assert r["tau_h0"] == pytest.approx(1.5)


def test_early_stopping_and_best_by_auprc(tmp_path):
    cfg = toy_config(
        early_stopping_patience=2,
        stages=[
            {"name": "fusion", "epochs": 10, "lr": 1e-2, "train": "fusion"},
            {"name": "end_to_end", "epochs": 1, "lr": 1e-3, "train": "all"},
        ],
    )
    tr = make_trainer(tmp_path, cfg)
    # balanced accuracy peaks at epoch 2, then two epochs without gain end the stage
    bacc = iter([0.6, 0.7, 0.65, 0.7, 0.9])
    auprc = iter([0.5, 0.6, 0.8, 0.7, 0.75])
    tr.evaluate = lambda: ({"balanced_accuracy": next(bacc), "auprc": next(auprc)}, {})
    s = tr.run()
    rows = pd.read_csv(tmp_path / "metrics.csv")
    assert list(rows["stage_name"]) == ["fusion"] * 4 + ["end_to_end"]
    assert s["best_epoch"] == 3 and s["best_val_auprc"] == pytest.approx(0.8)
    assert json.loads((tmp_path / "run.json").read_text())["best_epoch"] == 3
