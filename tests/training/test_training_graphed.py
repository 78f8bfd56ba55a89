"""The one training step and its clipper, run eagerly on the CPU: the device-side decisions (AutoClip's
threshold, fused AdamW skipping a non-finite step) equal their definitions and the host-side decisions,
and the ``train.cuda_graph`` flow resumes exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _training_toy import ToyNet, make_trainer, resume_and_compare, toy_config

from cmafnet.config import ClipConfig
from cmafnet.errors import ConfigError
from cmafnet.training import run_stages
from cmafnet.training.clipping import GradClipper
from cmafnet.training.graphs import GraphMode, plain_optimizer_state, set_tensor_lr
from cmafnet.training.sam import SAM
from cmafnet.training.schedules import ScheduleValues
from cmafnet.training.step import TrainStep


def _ce(out, y, sched):
    loss = F.cross_entropy(out.logits.float(), y)
    return loss, {"cls": loss.detach(), "beta1": 0.5}


@pytest.mark.parametrize("kind", ["autoclip", "norm", "none"])
def test_clipper_equals_its_definition(kind: str) -> None:
    """AutoClip clips at numpy's percentile of the finite norms recorded so far (a ring of ``history``),
    with torch's clipping formula; a non-finite step records nothing; the history survives a
    state_dict round trip in recording order."""
    cfg = ClipConfig(kind=kind, history=4, percentile=30.0, max_norm=0.7)
    clipper = GradClipper(cfg)
    recorded: list[float] = []
    g = torch.Generator().manual_seed(0)
    for i in range(7):  # wraps the history of 4; step 3 is non-finite
        grads = [torch.randn(5, generator=g) * (i + 1), torch.randn(3, generator=g)]
        if i == 3:
            grads[0][0] = math.nan
        params = [torch.nn.Parameter(torch.zeros_like(t)) for t in grads]
        expected = [torch.nn.Parameter(torch.zeros_like(t)) for t in grads]
        for p, e, t in zip(params, expected, grads, strict=True):
            p.grad, e.grad = t.clone(), t.clone()
        total = torch.nn.utils.get_total_norm(grads)
        finite = torch.isfinite(total)
        clipper(params, total, finite)
        if not bool(finite):
            continue
        if kind == "autoclip":
            recorded = [*recorded, float(total)][-cfg.history :]
            threshold = float(np.percentile(np.asarray(recorded), cfg.percentile))
            torch.nn.utils.clip_grads_with_norm_(expected, threshold, total)
        elif kind == "norm":
            torch.nn.utils.clip_grads_with_norm_(expected, cfg.max_norm, total)
        for p, e in zip(params, expected, strict=True):
            torch.testing.assert_close(p.grad, e.grad, rtol=1e-6, atol=1e-7)
    assert clipper.state_dict()["history"] == pytest.approx(recorded)  # oldest first
    restored = GradClipper(cfg)
    restored.load_state_dict(clipper.state_dict())
    assert restored.state_dict()["history"] == pytest.approx(recorded)
    if kind == "autoclip":
        assert float(restored.threshold()) == pytest.approx(float(clipper.threshold()))


def _setup(sam: bool, fused: bool):
    torch.manual_seed(0)
    model = ToyNet(dropout=0.0, bn=True)
    params = list(model.parameters())
    opt = (
        torch.optim.AdamW(params, lr=1e-2, fused=True)
        if fused
        else torch.optim.AdamW(params, lr=1e-2, foreach=True)
    )
    clip = GradClipper(ClipConfig(kind="autoclip", history=8, percentile=50.0))
    return model, params, opt, clip, (SAM(params, 0.05) if sam else None)


@pytest.mark.parametrize("sam", [False, True])
def test_device_skip_equals_host_skip(sam: bool) -> None:
    """The step's two ways of skipping a non-finite update take the same updates: on the device (fused
    AdamW's found_inf, no host read: what a CUDA graph runs) and after one host read of the flag (what
    an optimiser without found_inf needs; forced here on the same fused AdamW, so round-off is equal)."""
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(5)
    ]
    batches[2][0][0, 0, 0, 0] = math.nan  # a non-finite step in the middle
    runs = []
    for on_device in (False, True):
        model, params, opt, clip, sam_ = _setup(sam, True)
        if on_device:
            set_tensor_lr(opt)  # as under train.cuda_graph
        step = TrainStep(model, _ce, opt, params, clipper=clip, sam=sam_, graph_safe=on_device)
        step.device_skip = on_device
        results = []
        for x, y in batches:
            before = {k: v.clone() for k, v in model.state_dict().items()}
            res = step.result(step(x, y, ScheduleValues(lr=1e-2, epoch=0.0, beta_ramp=1.0)))
            if res.skipped:  # weights and BatchNorm statistics untouched
                for k, v in model.state_dict().items():
                    torch.testing.assert_close(v, before[k], rtol=0, atol=0)
            results.append(res)
        runs.append((model, opt, params, results))
    (m1, o1, p1, host), (m2, o2, p2, dev) = runs
    assert [r.skipped for r in host] == [r.skipped for r in dev] == [False, False, True, False, False]
    for a, b in zip(host, dev, strict=True):
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


def test_graph_safe_step_refuses_what_a_graph_cannot_run() -> None:
    model, params, _, clip, _ = _setup(False, False)
    foreach = torch.optim.AdamW(params, lr=1e-2, foreach=True)
    with pytest.raises(ValueError, match="fused AdamW"):
        TrainStep(model, _ce, foreach, params, clipper=clip, graph_safe=True)
    fused = torch.optim.AdamW(params, lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(ValueError, match="GradScaler"):
        TrainStep(model, _ce, fused, params, clipper=clip, amp="fp16", scaler=scaler, graph_safe=True)


def test_trainer_cuda_graph_needs_cuda(tmp_path) -> None:
    cfg = toy_config(cuda_graph=True, amp="fp16")
    with pytest.raises(ConfigError, match=r"train.cuda_graph.*CUDA device.*fp16.*fused_adamw"):
        make_trainer(tmp_path, cfg)


@pytest.mark.parametrize("stop_at", [4, 14])  # mid-epoch in stage 1, mid-epoch in stage 3
def test_graph_mode_trainer_flow_resumes_exactly_on_cpu(tmp_path, monkeypatch, stop_at) -> None:
    """The trainer's train.cuda_graph path (device skip, tensor learning rate, per-epoch loss
    schedules, checkpoints) run on the CPU without capture: a stopped and resumed run ends
    bit-identical to an uninterrupted one. Capture itself is covered by the CUDA tests."""
    from cmafnet.training import graphs, stages
    from cmafnet.training.checkpoint import load_checkpoint

    monkeypatch.setattr(graphs, "check_graph_mode", lambda *a, **k: None)  # allow the CPU
    monkeypatch.setattr(GraphMode, "WARMUP", 10**9)  # every step eager: nothing to capture on a CPU

    def fused_adamw(groups, lr, *, fused, device):  # build_adamw fuses on CUDA only; torch has a CPU kernel
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)

    monkeypatch.setattr(stages, "build_adamw", fused_adamw)
    cfg = toy_config(cuda_graph=True, fused_adamw=True)
    ref = make_trainer(tmp_path / "ref", cfg)
    run_stages(ref)
    st = ref.stage_step
    assert st.graph is not None and isinstance(st.optimizer.param_groups[0]["lr"], torch.Tensor)
    part = make_trainer(tmp_path / "run", cfg, stop_after_steps=stop_at)
    assert run_stages(part)["status"] == "stopped"
    state = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert isinstance(state["optimizer"]["param_groups"][0]["lr"], float)
    resume_and_compare(ref, tmp_path / "run", cfg, state)
