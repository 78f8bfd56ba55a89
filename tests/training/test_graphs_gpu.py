"""Opt-in CUDA checks (``-m gpu``): the trainer's stage step replayed from a CUDA graph (``train.cuda_graph``)
updates the weights as the same step run eagerly does (CMAF-Net smoke model, full objective, SAM,
AutoClip, the non-finite skip), and every replay reads that step's schedule (learning rate, loss clock,
beta ramp), not the values of the step that was captured."""

from __future__ import annotations

import pytest
import torch

from cmafnet.config import ClipConfig, LossConfig, RegularizerConfig, StageConfig, load_config
from cmafnet.losses import Objective
from cmafnet.models import create_model
from cmafnet.training import prepare_stage
from cmafnet.training.clipping import GradClipper
from cmafnet.training.graphs import GraphMode
from cmafnet.training.schedules import schedule_at
from cmafnet.training.stages import initial_roles
from cmafnet.training.step import TrainStep

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _run(graphed: bool, amp: str, sam: bool, batches: list) -> torch.Tensor:
    cfg = load_config("smoke", ["model.head.dropout=0", "regularizers.ramp_epochs=4"])
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = create_model(cfg.model).to(dev).train()
    objective = Objective(cfg.loss, cfg.regularizers, [700, 300], num_heads=cfg.model.fusion.heads).to(dev)
    # the end-to-end stage over 3 epochs of 2 steps: lr, loss clock and beta ramp change at every step
    stage = cfg.train.stages[-1].model_copy(update={"epochs": 3, "schedule": "cosine"})
    tc = cfg.train.model_copy(update={
        "amp": amp, "cuda_graph": graphed, "fused_adamw": True, "compile": False,
        "sam": cfg.train.sam.model_copy(update={"enabled": sam, "rho": 0.05}),
    })  # fmt: skip
    st = prepare_stage(model, objective, stage, tc, initial_roles(model), device=dev)
    for group in st.optimizer.param_groups:
        # Adam divides by sqrt(v): a parameter whose gradient is only round-off noise (nondeterministic
        # atomics in a few CUDA backward kernels) moves by ~lr whatever the noise, so graph and eager
        # runs differ by lr there. A large eps makes the update linear in the gradient.
        group["eps"] = 1.0
    for i, (x, y) in enumerate(batches):
        epoch, step = divmod(i, 2)
        sched = schedule_at(
            stage, cfg.regularizers, epoch=epoch, step=step, steps_per_epoch=2, ramp_epochs=float(epoch)
        )
        assert not st(x, y, sched).skipped
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


def test_replayed_step_reads_each_steps_schedule() -> None:
    """The captured step reads the learning rate, the loss clock and the beta ramp from the device scalars
    that GraphMode writes before every replay. Read back from each replay's own outputs (the beta1 term,
    A-CBFL's alpha of the minority class, the clock itself) and from the optimiser's learning rate (which
    only the captured step writes), they follow the schedule step by step instead of staying at the
    capture step's values."""
    from _training_toy import ToyNet

    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = ToyNet(dropout=0.0, bn=True).to(dev).train()
    reg = RegularizerConfig(ramp_epochs=4.0)
    objective = Objective(LossConfig(name="acbfl"), reg, [700, 300], num_heads=1).to(dev)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)

    def loss_fn(out, y, sched):
        total, terms = objective(out, y, epoch=sched.epoch, beta_ramp=sched.beta_ramp)
        # computed inside the graph from the scalars it reads
        return total, {**terms, "alpha_1": objective.loss.alpha(sched.epoch)[1], "clock": sched.epoch}

    clipper = GradClipper(ClipConfig(kind="autoclip", history=8), dev)
    graph = GraphMode(TrainStep(model, loss_fn, opt, params, clipper=clipper, graph_safe=True), warmup=2)
    stage = StageConfig(name="e2e", epochs=3, lr=1e-3, schedule="cosine", train="all")
    g = torch.Generator().manual_seed(1)
    seen = []
    for i in range(8):  # 2 eager warm-up steps, the capture (replayed once), 5 more replays
        epoch, step = divmod(i, 3)
        sched = schedule_at(stage, reg, epoch=epoch, step=step, steps_per_epoch=3, ramp_epochs=float(epoch))
        x, y = torch.randn(8, 3, 8, 8, generator=g).to(dev), torch.randint(0, 2, (8,), generator=g).to(dev)
        res = graph(x, y, sched)
        assert not res.skipped
        assert graph.captures == (1 if i >= 2 else 0) and (graph.graph is not None) == (i >= 2)
        used = (
            float(opt.param_groups[0]["lr"]),
            res.terms["clock"],
            res.terms["beta1"],
            res.terms["alpha_1"],
        )
        alpha_1 = float(objective.loss.alpha(sched.epoch)[1])
        assert used == pytest.approx((sched.lr, sched.epoch, reg.beta1 * sched.beta_ramp, alpha_1), rel=1e-5)
        seen.append(used)
    replayed = seen[2:]
    for k in range(4):  # each value changes from replay to replay: nothing is frozen at the capture
        assert len({round(u[k], 9) for u in replayed}) == len(replayed), k
