"""Opt-in CUDA check (``-m gpu``): the trainer's stage step replayed from a CUDA graph (``train.cuda_graph``)
updates the weights as the same step run eagerly does (CMAF-Net smoke model, full objective, SAM,
AutoClip, the non-finite skip)."""

from __future__ import annotations

import pytest
import torch

from cmafnet.config import load_config
from cmafnet.losses import Objective
from cmafnet.models import create_model
from cmafnet.training import prepare_stage
from cmafnet.training.stages import initial_roles

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _run(graphed: bool, amp: str, sam: bool, batches: list) -> torch.Tensor:
    cfg = load_config("smoke", ["model.head.dropout=0"])
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = create_model(cfg.model).to(dev).train()
    objective = Objective(cfg.loss, cfg.regularizers, [700, 300], num_heads=cfg.model.fusion.heads).to(dev)
    objective.set_beta_progress(float(cfg.regularizers.ramp_epochs) + 1.0)
    tc = cfg.train.model_copy(update={
        "amp": amp, "cuda_graph": graphed, "fused_adamw": True, "compile": False,
        "sam": cfg.train.sam.model_copy(update={"enabled": sam, "rho": 0.05}),
    })  # fmt: skip
    st = prepare_stage(model, objective, cfg.train.stages[-1], tc, initial_roles(model), device=dev)
    for group in st.optimizer.param_groups:
        # Adam divides by sqrt(v): a parameter whose gradient is only round-off noise (nondeterministic
        # atomics in a few CUDA backward kernels) moves by ~lr whatever the noise, so graph and eager
        # runs differ by lr there. A large eps makes the update linear in the gradient.
        group["eps"] = 1.0
    for x, y in batches:
        assert not st(x, y).skipped
    if graphed and batches:
        assert st.graph is not None and st.graph.captures == 1
    torch.cuda.synchronize()
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


@pytest.mark.parametrize("amp,sam", [("none", False), ("none", True), ("bf16", True)])
def test_graphed_stage_step_matches_eager(amp: str, sam: bool) -> None:
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    g = torch.Generator(device="cpu").manual_seed(1)
    batches = [
        (torch.randn(8, 3, 64, 64, generator=g).cuda(), torch.randint(0, 2, (8,), generator=g).cuda())
        for _ in range(5)
    ]  # 2 warm-up steps, a capture, 2 replays
    ref, got = _run(False, amp, sam, batches), _run(True, amp, sam, batches)
    start = _run(False, amp, sam, [])
    moved = (ref - start).norm()
    assert moved > 0
    # the same kernels in the same order: fp32 agrees to round-off (atomics reorder some sums)
    assert float((got - ref).norm() / moved) < (1e-3 if amp == "none" else 2e-2)
