"""SAM against a hand-computed reference, under bf16 and fp16 autocast, and its non-finite skips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cmafnet.config import ClipConfig
from cmafnet.models.output import ModelOutput
from cmafnet.training.clipping import GradClipper
from cmafnet.training.sam import SAM
from cmafnet.training.schedules import ScheduleValues
from cmafnet.training.step import TrainStep

RHO, LR = 0.5, 0.1


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 3))

    def forward(self, x, return_aux=False):
        out = self.net(x)
        return ModelOutput(logits=out) if return_aux else out


def _setup(seed=0):
    torch.manual_seed(seed)
    model = MLP()
    x, y = torch.randn(32, 16), torch.randint(0, 3, (32,))
    return model, x, y


def _ce(out, y, sched):
    loss = F.cross_entropy(out.logits.float(), y)
    return loss, {"total": loss.detach()}


def _step(model, x, y, *, amp="none", sam=True, loss_fn=_ce, scaler=None):
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=LR)
    clipper = GradClipper(ClipConfig(kind="none"))
    helper = SAM(params, RHO) if sam else None
    step = TrainStep(model, loss_fn, opt, params, clipper=clipper, scaler=scaler, sam=helper, amp=amp)
    return step.result(step(x, y, ScheduleValues(lr=LR, epoch=0.0, beta_ramp=1.0)))


def _reference_sam_update(model, x, y) -> list[torch.Tensor]:
    """w - lr * grad L(w + rho g/||g||), computed from scratch in fp32."""
    params = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]

    def loss_at(ps):
        out = torch.func.functional_call(model, dict(zip(names, ps, strict=True)), (x,))
        return F.cross_entropy(out, y)

    g = torch.autograd.grad(loss_at(params), params)
    norm = torch.sqrt(sum((gi**2).sum() for gi in g))
    perturbed = [p + RHO * gi / norm for p, gi in zip(params, g, strict=True)]
    g2 = torch.autograd.grad(loss_at(perturbed), perturbed)
    return [p.detach() - LR * gi for p, gi in zip(params, g2, strict=True)]


def test_sam_fp32_matches_hand_computed_reference():
    model, x, y = _setup()
    expected = _reference_sam_update(model, x, y)
    res = _step(model, x, y)
    assert not res.skipped
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.detach(), e, atol=1e-6, rtol=1e-5)


def _delta(amp, scaler=None, sam=True):
    model, x, y = _setup()
    w0 = torch.cat([p.detach().flatten() for p in model.parameters()])
    res = _step(model, x, y, amp=amp, sam=sam, scaler=scaler)
    assert not res.skipped
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - w0


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_sam_under_autocast_matches_fp32(amp):
    ref = _delta("none")
    plain = _delta("none", sam=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if amp == "fp16" else None
    got = _delta(amp, scaler=scaler)
    err = (got - ref).norm() / ref.norm()
    sam_effect = (plain - ref).norm() / ref.norm()
    # tolerance: 3% relative (bf16 keeps 8 bits of mantissa); the SAM step itself moves 3x further
    assert err < 0.03, f"{amp}: relative error {err:.4f}"
    assert sam_effect > 3 * 0.03, "test is not sensitive: SAM and plain steps too close"
    if scaler is not None:
        assert scaler.get_scale() == 2.0**10  # no overflow, no back-off


def test_skip_on_inf_in_first_pass_leaves_everything_untouched():
    model, x, y = _setup()
    w0 = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    res = _step(model, x * float("inf"), y, amp="fp16", scaler=scaler)
    assert res.skipped
    for p, w in zip(model.parameters(), w0, strict=True):
        assert torch.equal(p.detach(), w)
    assert scaler.get_scale() == 2.0**9  # backed off once


def test_skip_on_inf_in_second_pass_restores_weights():
    model, x, y = _setup()
    w0 = [p.detach().clone() for p in model.parameters()]
    calls = {"n": 0}

    def second_pass_inf(out, target, sched):
        calls["n"] += 1
        loss, terms = _ce(out, target, sched)
        return (loss * float("inf") if calls["n"] == 2 else loss), terms

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    res = _step(model, x, y, amp="fp16", loss_fn=second_pass_inf, scaler=scaler)
    assert res.skipped and calls["n"] == 2
    for p, w in zip(model.parameters(), w0, strict=True):
        assert torch.equal(p.detach(), w), "the SAM perturbation was not undone"
    assert scaler.get_scale() == 2.0**9


def test_adaptive_sam_scales_perturbation_by_weight():
    p = nn.Parameter(torch.tensor([1.0, 0.0, 2.0]))
    p.grad = torch.tensor([1.0, 1.0, 1.0])
    sam = SAM([p], rho=1.0, adaptive=True)
    sam.perturb()
    e = p.detach() - torch.tensor([1.0, 0.0, 2.0])
    assert e[1] == 0 and torch.isclose(e[2] / e[0], torch.tensor(4.0))  # e ∝ w^2 g
    sam.restore()
    assert torch.equal(p.detach(), torch.tensor([1.0, 0.0, 2.0]))
