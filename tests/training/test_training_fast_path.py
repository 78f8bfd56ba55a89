"""The GPU fast path of the training step: foreach SAM, foreach AdamW, few host syncs per step."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _dispatch_count import count_ops
from cmafnet.config import ClipConfig
from cmafnet.models.output import ModelOutput
from cmafnet.training.clipping import GradClipper
from cmafnet.training.optim import build_adamw, param_groups
from cmafnet.training.sam import SAM, unscale_grads
from cmafnet.training.schedules import ScheduleValues
from cmafnet.training.step import TrainStep


class Deep(nn.Module):
    """``depth`` linear layers (2 parameter tensors each)."""

    def __init__(self, depth: int = 6, width: int = 8):
        super().__init__()
        self.layers = nn.Sequential(
            *[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)]
        )
        self.head = nn.Linear(width, 3)

    def forward(self, x, return_aux=False):
        out = self.head(self.layers(x))
        return ModelOutput(logits=out) if return_aux else out


def _with_grads(seed: int = 0, depth: int = 6) -> Deep:
    torch.manual_seed(seed)
    model = Deep(depth)
    F.cross_entropy(model(torch.randn(16, 8)), torch.randint(0, 3, (16,))).backward()
    model.layers[0][0].bias.grad = None  # a parameter without gradient is left alone
    return model


def _reference_perturb(model: nn.Module, rho: float, adaptive: bool) -> None:
    """The per-parameter SAM perturbation (the loop the foreach version replaced)."""
    ps = [p for p in model.parameters() if p.grad is not None]
    with torch.no_grad():
        norm = torch.linalg.vector_norm(
            torch.stack([((p.abs() if adaptive else 1.0) * p.grad).float().norm() for p in ps])
        )
        scale = rho / (norm + 1e-12)
        for p in ps:
            e = p.grad.float() * scale
            if adaptive:
                e = e * p.float().pow(2)
            p.add_(e.to(p.dtype))


@pytest.mark.parametrize("adaptive", [False, True])
def test_foreach_sam_is_bitwise_the_per_parameter_loop_and_restores_exactly(adaptive: bool) -> None:
    model = _with_grads()
    ref = copy.deepcopy(model)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        q.grad = None if p.grad is None else p.grad.clone()
    w0 = [p.detach().clone() for p in model.parameters()]
    sam = SAM(model.parameters(), rho=0.3, adaptive=adaptive)
    sam.perturb()
    _reference_perturb(ref, 0.3, adaptive)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not torch.equal(model.head.weight, w0[-2])  # the perturbation did move the weights
    sam.restore()
    for p, w in zip(model.parameters(), w0, strict=True):
        assert torch.equal(p.detach().view(torch.int32), w.view(torch.int32))  # bit-exact, -0.0 too
    sam.restore()  # a second restore is a no-op
    sam.perturb()  # and the helper is reusable
    sam.restore()


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_kernel_count_does_not_grow_with_the_number_of_parameter_tensors(adaptive: bool) -> None:
    def compute_ops(depth: int) -> int:
        model = _with_grads(depth=depth)
        sam = SAM(model.parameters(), rho=0.1, adaptive=adaptive)
        with count_ops() as c:
            sam.perturb()
            sam.restore()
        assert c.syncs == 0
        # allocation and views launch no kernel; everything else must be a multi-tensor op.
        free = ("aten.empty_like", "aten.detach", "aten.alias")
        return sum(not op.startswith(free) for op in c.ops)

    small, large = compute_ops(2), compute_ops(20)
    assert small == large, (small, large)


def _step(model: nn.Module, *, sam: bool, loss_fn=None, clip: str = "none", fused: bool = False):
    torch.manual_seed(1)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    params = list(model.parameters())

    def ce(out, target, sched):
        loss = F.cross_entropy(out.logits.float(), target)
        return loss, {"cls": loss.detach(), "total": loss.detach()}

    clipper = GradClipper(ClipConfig(kind=clip, history=10))
    opt = torch.optim.AdamW(params, lr=0.1, fused=True) if fused else torch.optim.SGD(params, lr=0.1)
    step = TrainStep(
        model, loss_fn or ce, opt, params, clipper=clipper, sam=SAM(params, rho=0.1) if sam else None
    )
    return step.result(step(x, y, ScheduleValues(lr=0.1, epoch=0.0, beta_ramp=1.0))), clipper


@pytest.mark.parametrize("sam", [False, True])
@pytest.mark.parametrize(("fused", "max_syncs"), [(False, 2), (True, 1)])
def test_train_step_reads_the_device_once_or_twice(sam: bool, fused: bool, max_syncs: int) -> None:
    """One read for loss + terms + gradient norm + skip flag, SAM or not; an optimiser that cannot skip
    a non-finite update on the device (not fused) adds the read of the skip flag. AutoClip's history
    lives on the device, and the per-parameter loops used to add a read each."""
    model = Deep()
    with count_ops() as c:
        res, _ = _step(model, sam=sam, fused=fused, clip="autoclip")
    assert not res.skipped
    assert c.syncs <= max_syncs, c.syncs
    assert set(res.terms) == {"cls", "total"} and res.grad_norm > 0


def test_nonfinite_loss_with_finite_gradients_skips_before_the_clipper() -> None:
    model = Deep()
    w0 = [p.detach().clone() for p in model.parameters()]

    def inf_loss(out, target, sched):
        loss = F.cross_entropy(out.logits.float(), target) + torch.tensor(float("inf"))  # grads stay finite
        return loss, {"total": loss.detach()}

    for sam in (False, True):
        res, clipper = _step(model, sam=sam, loss_fn=inf_loss, clip="autoclip")
        assert res.skipped
        assert clipper.state_dict()["history"] == []  # the clipping history is untouched
        for p, w in zip(model.parameters(), w0, strict=True):
            assert torch.equal(p.detach(), w)


def test_adamw_uses_foreach_off_cuda_and_matches_the_per_parameter_update() -> None:
    torch.manual_seed(0)
    model = Deep(depth=3)
    ref = copy.deepcopy(model)
    opt = build_adamw(
        param_groups(model.named_parameters(), 0.05), 1e-2, fused=True, device=torch.device("cpu")
    )
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]
    ref_opt = torch.optim.AdamW(param_groups(ref.named_parameters(), 0.05), lr=1e-2, foreach=False)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    for m, o in ((model, opt), (ref, ref_opt)):
        for _ in range(3):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_unscale_grads_divides_by_the_scale_without_reading_it_on_the_host() -> None:
    model = _with_grads()
    expected = [p.grad / 1024.0 for p in model.parameters() if p.grad is not None]
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))  # the scaler creates its scale tensor on first use
    with count_ops() as c:
        unscale_grads(model.parameters(), scaler)
    assert c.syncs == 0
    got = [p.grad for p in model.parameters() if p.grad is not None]
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)


def test_skipped_step_restores_batchnorm_buffers_of_every_dtype() -> None:
    class BNNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bn = nn.BatchNorm1d(8)
            self.head = nn.Linear(8, 3)

        def forward(self, x, return_aux=False):
            out = self.head(self.bn(x))
            return ModelOutput(logits=out) if return_aux else out

    model = BNNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def nan_loss(out, target, sched):
        loss = F.cross_entropy(out.logits.float(), target) * float("nan")
        return loss, {"total": loss.detach()}

    for sam in (False, True):
        res, _ = _step(model, sam=sam, loss_fn=nan_loss)
        assert res.skipped
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k  # running_mean/var (fp32), num_batches_tracked (int64)
    res, _ = _step(model, sam=False)  # a good step does update them (the check above can fail)
    assert not res.skipped and model.bn.num_batches_tracked.item() == 1
    assert not torch.equal(model.bn.running_mean, before["bn.running_mean"])
