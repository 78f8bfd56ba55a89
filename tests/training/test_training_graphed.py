"""The graph-capturable training step (``train.cuda_graph``), run eagerly on the CPU: it must compute
exactly what the eager step with host decisions computes (clipping, SAM, skipping non-finite steps)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _training_toy import ToyNet, make_trainer, resume_and_compare, toy_config

from cmafnet.config import ClipConfig
from cmafnet.errors import ConfigError
from cmafnet.training.clipping import GradClipper
from cmafnet.training.graphed import (
    DeviceClipper,
    DeviceStep,
    GraphMode,
    plain_optimizer_state,
    set_tensor_lr,
)
from cmafnet.training.sam import SAM
from cmafnet.training.step import train_step


def _ce(out, y):
    loss = F.cross_entropy(out.logits.float(), y)
    return loss, {"cls": loss.detach(), "beta1": 0.5}


@pytest.mark.parametrize("kind", ["autoclip", "norm", "none"])
def test_device_clipper_equals_host_clipper(kind: str) -> None:
    cfg = ClipConfig(kind=kind, history=4, percentile=30.0, max_norm=0.7)
    host, dev = GradClipper(cfg), DeviceClipper(cfg, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    for i in range(7):  # wraps the history of 4; step 3 is non-finite
        grads = [torch.randn(5, generator=g) * (i + 1), torch.randn(3, generator=g)]
        if i == 3:
            grads[0][0] = math.nan
        pa = [torch.nn.Parameter(torch.zeros_like(t)) for t in grads]
        pb = [torch.nn.Parameter(torch.zeros_like(t)) for t in grads]
        for p, t in zip(pa + pb, grads + grads, strict=True):
            p.grad = t.clone()
        total = host(pa)
        finite = torch.isfinite(total)
        dev(pb, torch.nn.utils.get_total_norm([p.grad for p in pb]), finite)
        if bool(finite):
            for a, b in zip(pa, pb, strict=True):
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    assert dev.state_dict()["history"] == pytest.approx(host.state_dict()["history"])  # same order
    restored = DeviceClipper(cfg, torch.device("cpu"))
    restored.load_state_dict(host.state_dict())
    assert restored.state_dict()["history"] == pytest.approx(host.state_dict()["history"])


def _setup(sam: bool):
    torch.manual_seed(0)
    model = ToyNet(dropout=0.0, bn=True)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
    clip = ClipConfig(kind="autoclip", history=8, percentile=50.0)
    return model, params, opt, clip, (SAM(params, 0.05) if sam else None)


@pytest.mark.parametrize("sam", [False, True])
def test_device_step_equals_eager_step_and_skips_nonfinite(sam: bool) -> None:
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(5)
    ]
    batches[2][0][0, 0, 0, 0] = math.nan  # a non-finite step in the middle

    m1, p1, o1, clip, sam1 = _setup(sam)
    host_clip = GradClipper(clip)
    eager = [train_step(m1, x, y, _ce, o1, p1, clipper=host_clip, sam=sam1, amp="none") for x, y in batches]

    m2, p2, o2, _, sam2 = _setup(sam)
    set_tensor_lr(o2)
    step = DeviceStep(m2, _ce, o2, p2, clipper=DeviceClipper(clip, torch.device("cpu")), sam=sam2, amp="none")
    dev = []
    for x, y in batches:
        before = {k: v.clone() for k, v in m2.state_dict().items()}
        res = step.result(step(x, y))
        if res.skipped:  # weights, BatchNorm statistics (and the optimiser's step count) untouched
            for k, v in m2.state_dict().items():
                torch.testing.assert_close(v, before[k], rtol=0, atol=0)
        dev.append(res)

    assert [r.skipped for r in eager] == [r.skipped for r in dev] == [False, False, True, False, False]
    for a, b in zip(eager, dev, strict=True):
        if not a.skipped:
            assert b.loss == pytest.approx(a.loss, rel=1e-5)
            assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-5)
            assert b.terms == pytest.approx(a.terms, rel=1e-5)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert o2.state[p2[0]]["step"] == o1.state[p1[0]]["step"] == 4  # the skipped step is not counted
    # a checkpoint of the tensor-lr optimiser loads into an eager (foreach) one
    sd = plain_optimizer_state(o2.state_dict())
    assert isinstance(sd["param_groups"][0]["lr"], float)


def test_device_step_refuses_what_it_cannot_do() -> None:
    model, params, _, clip, _ = _setup(False)
    foreach = torch.optim.AdamW(params, lr=1e-2, foreach=True)
    with pytest.raises(ValueError, match="fused AdamW"):
        DeviceStep(model, _ce, foreach, params, clipper=DeviceClipper(clip, torch.device("cpu")))
    fused = torch.optim.AdamW(params, lr=1e-2, fused=True)
    with pytest.raises(ValueError, match="fp16"):
        DeviceStep(model, _ce, fused, params, clipper=DeviceClipper(clip, torch.device("cpu")), amp="fp16")


def test_trainer_cuda_graph_needs_cuda(tmp_path) -> None:
    cfg = toy_config(cuda_graph=True, amp="fp16")
    with pytest.raises(ConfigError, match=r"train.cuda_graph.*CUDA device.*fp16.*fused_adamw"):
        make_trainer(tmp_path, cfg)


@pytest.mark.parametrize("stop_at", [4, 14])  # mid-epoch in stage 1, mid-epoch in stage 3
def test_graph_mode_trainer_flow_resumes_exactly_on_cpu(tmp_path, monkeypatch, stop_at) -> None:
    """The trainer's train.cuda_graph path (device step, tensor learning rate, device AutoClip,
    per-epoch loss functions, checkpoints) run on the CPU without capture: a stopped and resumed run
    ends bit-identical to an uninterrupted one. Capture itself is covered by the CUDA tests."""

    from cmafnet.training import loop
    from cmafnet.training.checkpoint import load_checkpoint

    monkeypatch.setattr(loop, "check_graph_mode", lambda *a, **k: None)  # allow the CPU
    monkeypatch.setattr(GraphMode, "WARMUP", 10**9)  # every step eager: nothing to capture on a CPU

    def fused_adamw(groups, lr, *, fused, device):  # build_adamw fuses on CUDA only; torch has a CPU kernel
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)

    monkeypatch.setattr(loop, "build_adamw", fused_adamw)
    cfg = toy_config(cuda_graph=True, fused_adamw=True)
    ref = make_trainer(tmp_path / "ref", cfg)
    ref.run()
    assert ref.graph is not None and isinstance(ref.optimizer.param_groups[0]["lr"], torch.Tensor)
    part = make_trainer(tmp_path / "run", cfg, stop_after_steps=stop_at)
    assert part.run()["status"] == "stopped"
    state = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert isinstance(state["optimizer"]["param_groups"][0]["lr"], float)
    resume_and_compare(ref, tmp_path / "run", cfg, state)
