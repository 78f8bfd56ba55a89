"""Opt-in CUDA checks (``-m gpu``): mixed precision, fused AdamW, channels_last and compile on a GPU."""

from __future__ import annotations

import pytest
import torch
from _training_toy import ToyNet, make_trainer, toy_config

from cmafnet.config import ClipConfig
from cmafnet.training import run_stages
from cmafnet.training.clipping import GradClipper
from cmafnet.training.sam import SAM
from cmafnet.training.schedules import ScheduleValues
from cmafnet.training.step import TrainStep

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _ce(out, y, sched):
    loss = torch.nn.functional.cross_entropy(out.logits.float(), y)
    return loss, {"total": loss.detach()}


def _delta(amp: str) -> torch.Tensor:
    torch.manual_seed(0)
    model = ToyNet(dropout=0.0, bn=False).cuda()
    x, y = torch.randn(64, 3, 8, 8, device="cuda"), torch.randint(0, 2, (64,), device="cuda")
    params = list(model.parameters())
    w0 = torch.cat([p.detach().flatten() for p in params])
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10) if amp == "fp16" else None
    step = TrainStep(
        model, _ce, torch.optim.SGD(params, lr=0.1), params, clipper=GradClipper(ClipConfig(kind="none"), "cuda"),
        scaler=scaler, sam=SAM(params, 0.5), amp=amp,
    )  # fmt: skip
    assert not step.result(step(x, y, ScheduleValues(lr=0.1, epoch=0.0, beta_ramp=1.0))).skipped
    return torch.cat([p.detach().flatten() for p in params]) - w0


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_sam_cuda_autocast_matches_fp32(amp):
    torch.backends.cuda.matmul.allow_tf32 = False
    ref, got = _delta("none"), _delta(amp)
    assert float((got - ref).norm() / ref.norm()) < 0.03


@pytest.mark.parametrize("amp,compile_", [("bf16", False), ("fp16", False), ("bf16", True)])
def test_trainer_on_cuda(tmp_path, amp, compile_):
    cfg = toy_config(amp=amp, channels_last=True, fused_adamw=True, compile=compile_, device="cuda",
                     stages=[{"name": "all", "epochs": 2, "lr": 1e-2, "train": "all"}])  # fmt: skip
    tr = make_trainer(tmp_path, cfg, device="cuda")
    s = run_stages(tr)
    assert (
        s["status"] == "finished" and s["nonfinite_steps"] <= 2
    )  # fp16 may skip while calibrating the scale
    assert all(torch.isfinite(v).all() for v in tr.model.state_dict().values() if v.is_floating_point())


@pytest.mark.parametrize("compile_", [False, True])
def test_trainer_cuda_graph_replays_what_the_eager_device_step_computes(tmp_path, monkeypatch, compile_):
    """A full 3-stage toy run with train.cuda_graph (warm-up, a capture per stage, replays following the
    per-step schedules, SAM, AutoClip) ends with the weights of the same run never captured."""
    from cmafnet.training import graphs, stages

    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = toy_config(amp="none", fused_adamw=True, cuda_graph=True, compile=compile_, device="cuda")

    real_adamw = stages.build_adamw

    def adamw_linear(groups, lr, *, fused, device):
        # eps 1: the update is linear in the gradient, so round-off noise in a near-zero gradient
        # (the conv bias before BatchNorm) is not blown up to a step of ~lr by Adam's normalisation
        opt = real_adamw(groups, lr, fused=fused, device=device)
        for g in opt.param_groups:
            g["eps"] = 1.0
        return opt

    monkeypatch.setattr(stages, "build_adamw", adamw_linear)

    def run(out, warmup):
        monkeypatch.setattr(graphs.GraphMode, "WARMUP", warmup)
        tr = make_trainer(out, cfg, device="cuda", model_kw={"dropout": 0.0})
        s = run_stages(tr)
        assert s["status"] == "finished" and s["nonfinite_steps"] == 0
        return tr, torch.cat([p.detach().flatten() for p in tr.model.parameters()])

    tr, got = run(tmp_path / "graph", 2)
    assert tr.stage_step.graph.captures >= 1  # the last stage: 2 epochs of 3 steps, 2 warm-up steps
    _, ref = run(tmp_path / "eager", 10**9)  # every step the same TrainStep, eagerly
    assert torch.isfinite(got).all()
    assert float((got - ref).norm() / ref.norm()) < 1e-4
