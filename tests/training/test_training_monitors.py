"""Information monitors against closed forms and against the objective's own terms, and early stopping /
best-model bookkeeping."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
from _training_toy import make_trainer, toy_config

from cmafnet.config import load_config
from cmafnet.losses import Objective
from cmafnet.losses.regularizers import attention_entropy, attention_entropy_nats, gaussian_kl_per_sample
from cmafnet.models import create_model
from cmafnet.models.output import ModelOutput
from cmafnet.training import run_stages
from cmafnet.training.information import MonitorAccumulator, class_margins


def test_kl_and_attention_entropy_closed_forms():
    mu, lv = torch.zeros(2, 5, 4), torch.zeros(2, 5, 4)
    assert torch.allclose(gaussian_kl_per_sample(mu, lv), torch.zeros(2))
    mu[0] = 1.0  # KL = 0.5 * sum(mu^2) = 2 per token
    assert gaussian_kl_per_sample(mu, lv).tolist() == pytest.approx([2.0, 0.0])
    uniform = torch.full((1, 3, 6, 10), 0.1)
    assert attention_entropy_nats(uniform).tolist() == pytest.approx([math.log(10)] * 3, rel=1e-5)
    onehot = torch.zeros(1, 1, 2, 4)
    onehot[..., 0] = 1
    assert attention_entropy_nats(onehot).item() == pytest.approx(0.0, abs=1e-6)


def test_class_margins():
    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    s, c = class_margins(logits, torch.tensor([0, 1, 1]), 2)
    assert (s / c).tolist() == pytest.approx([2.0, (3.0 - 1.0) / 2])


def test_monitors_measure_what_the_objective_penalises():
    """On one batch the logged I(Z;X) bounds, I(Z_s;Z_t) and attention entropies are the objective's
    own KL, redundancy and (normalised) entropy terms: one definition each, not look-alikes."""
    cfg = load_config("smoke")
    torch.manual_seed(0)
    model = create_model(cfg.model, img_size=64).eval()
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    with torch.no_grad():
        out = model(torch.randn(6, 3, 64, 64), return_aux=True)
    objective = Objective(cfg.loss, cfg.regularizers, [3, 3], num_heads=cfg.model.fusion.heads)
    terms = objective.regularizer_terms(out, use_kl=True, use_redundancy=True)
    acc = MonitorAccumulator(2)
    acc.update(out, y)
    r = acc.result()
    assert r["mi_zs_x"] == pytest.approx(float(terms["kl_s"]), rel=1e-5)
    assert r["mi_zt_x"] == pytest.approx(float(terms["kl_t"]), rel=1e-5)
    assert r["mi_zs_zt"] == pytest.approx(float(terms["redundancy"]), rel=1e-5) and r["mi_zs_zt"] > 0
    heads = cfg.model.fusion.heads
    logged = [r[f"attn_entropy_h{h}"] / math.log(out.attn.shape[-1]) for h in range(heads)]
    assert logged == pytest.approx(attention_entropy(out.attn).tolist(), rel=1e-5)
    weights = objective.entropy_reg.weights.detach()
    assert float(terms["attn_entropy"].detach()) == pytest.approx(
        float((weights * torch.tensor(logged)).sum()), rel=1e-5
    )


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


def test_early_stopping_and_best_by_auprc(tmp_path, monkeypatch):
    from cmafnet.training import epoch

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
    monkeypatch.setattr(
        epoch, "validate", lambda *a, **k: ({"balanced_accuracy": next(bacc), "auprc": next(auprc)}, {})
    )
    s = run_stages(tr)
    rows = pd.read_csv(tmp_path / "metrics.csv")
    assert list(rows["stage_name"]) == ["fusion"] * 4 + ["end_to_end"]
    assert s["best_epoch"] == 3 and s["best_val_auprc"] == pytest.approx(0.8)
    assert json.loads((tmp_path / "run.json").read_text())["best_epoch"] == 3
