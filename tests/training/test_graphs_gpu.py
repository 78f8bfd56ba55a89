"""Opt-in CUDA check (``-m gpu``): a whole training step replayed from a CUDA graph updates the weights
exactly as the eager step does (CMAF-Net smoke model, full objective, SAM)."""

from __future__ import annotations

import pytest
import torch

from cmafnet.analysis.profiling.steps import make_train_step
from cmafnet.analysis.profiling.suite import cmaf_parts
from cmafnet.analysis.profiling.timing import Timing
from cmafnet.config import load_config
from cmafnet.training.graphs import GraphedStep

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _run(graphed: bool, amp: str, sam: bool, batches: list, trainer_step: bool = False) -> torch.Tensor:
    cfg = load_config("smoke", ["model.head.dropout=0"])
    dev = torch.device("cuda")
    parts = cmaf_parts(cfg, dev, 64)
    torch.manual_seed(0)
    model = parts["build"]().to(dev).train()
    opt = parts["optimizer"](model, True)
    for group in opt.param_groups:
        # Adam divides by sqrt(v): a parameter whose gradient is only round-off noise (nondeterministic
        # atomics in a few CUDA backward kernels) moves by ~lr whatever the noise, so graph and eager
        # runs differ by lr there. A large eps makes the update linear in the gradient.
        group["eps"] = 1.0
    timing = Timing(dev, amp=amp)
    if trainer_step:  # train.cuda_graph's DeviceStep (AutoClip, skip logic), eager or replayed
        step = parts["device_step"](model, opt, sam, amp)
    else:
        step = make_train_step(
            model, parts["loss_fn"], opt, timing, sam_rho=0.05 if sam else None,
            sam=parts["sam"](opt) if sam else None, autocast_cache=not graphed,
        )  # fmt: skip
    if graphed:
        # the warm-up steps are real steps on the example batch: the eager run repeats them
        step = GraphedStep(step, list(batches[0]), optimizer=opt, warmup=3)
        for x, y in batches[3:]:
            step(x, y)
    else:
        for x, y in batches:
            step(x, y)
    torch.cuda.synchronize()
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


@pytest.mark.parametrize(
    "amp,sam,trainer_step",
    [
        ("none", False, False),
        ("none", True, False),
        ("bf16", True, False),
        ("none", True, True),
        ("bf16", True, True),
    ],
)
def test_graphed_step_matches_eager(amp: str, sam: bool, trainer_step: bool) -> None:
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    g = torch.Generator(device="cpu").manual_seed(1)
    first = (torch.randn(8, 3, 64, 64, generator=g).cuda(), torch.randint(0, 2, (8,), generator=g).cuda())
    rest = [
        (torch.randn(8, 3, 64, 64, generator=g).cuda(), torch.randint(0, 2, (8,), generator=g).cuda())
        for _ in range(3)
    ]
    batches = [first] * 3 + rest
    ref, got = _run(False, amp, sam, batches, trainer_step), _run(True, amp, sam, batches, trainer_step)
    start = _run(False, amp, sam, [], trainer_step)
    moved = (ref - start).norm()
    assert moved > 0
    # the same kernels in the same order: fp32 agrees to round-off (atomics reorder some sums)
    assert float((got - ref).norm() / moved) < (1e-3 if amp == "none" else 2e-2)
