"""Schedules as data: the learning rate, the loss clock (A-CBFL alpha, LDAM DRW) and the beta ramp are pure
functions of the position, computed by the loop before every step and passed into it; the step writes the
learning rate and hands the values to the loss, eagerly and under ``train.cuda_graph`` (its device scalars,
here on the CPU without capture; the capture itself is checked in test_graphs_gpu.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _training_toy import ToyNet, make_trainer, toy_config

from cmafnet.config import ClipConfig, RegularizerConfig, StageConfig
from cmafnet.losses.objective import Objective
from cmafnet.training import run_stages
from cmafnet.training.clipping import GradClipper
from cmafnet.training.graphs import GraphMode
from cmafnet.training.sam import SAM
from cmafnet.training.schedules import ScheduleValues, lr_factor, schedule_at
from cmafnet.training.step import TrainStep


def test_schedule_at_is_a_pure_function_of_the_position() -> None:
    stage = StageConfig(
        name="fusion", epochs=3, lr=1e-3, schedule="warmup_cosine", warmup_epochs=1, train="fusion"
    )
    reg = RegularizerConfig(ramp_epochs=2.0)
    spe = 4
    seen = []
    for epoch in range(3):
        for step in range(spe):
            v = schedule_at(stage, reg, epoch=epoch, step=step, steps_per_epoch=spe, ramp_epochs=1.0 + epoch)
            k = epoch * spe + step  # the step within the stage
            assert v.lr == pytest.approx(1e-3 * lr_factor("warmup_cosine", k, 12, warmup=4))
            assert v.epoch == pytest.approx(k / spe)
            assert v.beta_ramp == pytest.approx(min(1.0, (1.0 + k / spe) / 2.0))
            # the same position gives the same values: nothing is carried from one call to the next
            assert v == schedule_at(
                stage, reg, epoch=epoch, step=step, steps_per_epoch=spe, ramp_epochs=1.0 + epoch
            )
            seen.append(v)
    assert len({v.lr for v in seen}) == 12 and len({v.epoch for v in seen}) == 12
    assert len({v.beta_ramp for v in seen[:4]}) == 4  # the ramp moves within an epoch
    # a fixed beta schedule is 1 from the start; a branches stage does not advance the ramp clock
    fixed = RegularizerConfig(beta_schedule="fixed")
    assert schedule_at(stage, fixed, epoch=0, step=0, steps_per_epoch=spe, ramp_epochs=0.0).beta_ramp == 1.0
    branches = stage.model_copy(update={"train": "branches"})
    assert schedule_at(branches, reg, epoch=0, step=3, steps_per_epoch=spe, ramp_epochs=0.5).beta_ramp == 0.25
    # a stage cut short by train.budget (steps): the lr schedule spans its steps
    cut = stage.model_copy(update={"steps": 6})
    assert schedule_at(cut, reg, epoch=1, step=1, steps_per_epoch=spe, ramp_epochs=0.0).lr == pytest.approx(
        1e-3 * lr_factor("warmup_cosine", 5, 6, warmup=4)
    )


def _allow_graph_mode_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's train.cuda_graph path on the CPU: every step eager, on the graph's device scalars."""
    from cmafnet.training import graphs, stages

    monkeypatch.setattr(graphs, "check_graph_mode", lambda *a, **k: None)
    monkeypatch.setattr(GraphMode, "WARMUP", 10**9)

    def fused_adamw(groups, lr, *, fused, device):  # build_adamw fuses on CUDA only; torch has a CPU kernel
        return torch.optim.AdamW(groups, lr=lr, fused=True)

    monkeypatch.setattr(stages, "build_adamw", fused_adamw)


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_the_loop_passes_every_step_its_schedule(tmp_path, monkeypatch, cuda_graph: bool) -> None:
    """Over a 3-stage toy run (3 steps per epoch, 2 epochs per stage) the objective receives, at every
    step, the loss clock and beta ramp of that global step, and the optimiser steps with that step's
    learning rate: mid-epoch changes included, as numbers (eager) or as device scalars (graph mode)."""
    if cuda_graph:
        _allow_graph_mode_on_cpu(monkeypatch)
    cfg = toy_config(sam={"enabled": False}, cuda_graph=cuda_graph, fused_adamw=cuda_graph)
    received: list[tuple[float, float]] = []  # (epoch, beta_ramp) per objective call
    lrs: list[float] = []  # the optimiser's learning rate after each step
    real_forward, real_step = Objective.forward, TrainStep.__call__

    def forward(self, out, target, *, epoch, beta_ramp, use_regularizers=True):
        assert isinstance(epoch, torch.Tensor) == cuda_graph  # device scalars under train.cuda_graph
        received.append((float(epoch), float(beta_ramp)))
        return real_forward(
            self, out, target, epoch=epoch, beta_ramp=beta_ramp, use_regularizers=use_regularizers
        )

    def step(self, x, y, sched, after_forward=None):
        packed = real_step(self, x, y, sched, after_forward)
        lrs.append(float(self.optimizer.param_groups[0]["lr"]))
        return packed

    monkeypatch.setattr(Objective, "forward", forward)
    monkeypatch.setattr(TrainStep, "__call__", step)
    tr = make_trainer(tmp_path, cfg)
    assert run_stages(tr)["global_step"] == 18
    spe, reg = 3, cfg.regularizers
    expected_lr, expected_loss = [], []
    for g in range(18):  # the global step
        index, k = divmod(g, 6)  # the stage and the step within it
        stage = cfg.train.stages[index]
        total, warmup = 6, round(stage.warmup_epochs * spe)
        expected_lr.append(
            stage.lr * lr_factor(stage.schedule, k, total, warmup=warmup, cycles=stage.cyclic_cycles)
        )
        if stage.loss == "objective":  # stages 2 and 3; the ramp clock starts with stage 2
            ramp = (g - 6) / spe
            expected_loss.append((k / spe, min(1.0, ramp / reg.ramp_epochs)))
    assert lrs == pytest.approx(expected_lr, rel=1e-6)
    assert len(received) == len(expected_loss) == 12
    for got, want in zip(zip(*received, strict=True), zip(*expected_loss, strict=True), strict=True):
        assert list(got) == pytest.approx(list(want), rel=1e-6, abs=1e-7)  # the loss clock, the beta ramp
    assert len(set(received[:3])) == 3 and len(set(lrs[6:9])) == 3  # they change within an epoch


def test_after_forward_runs_once_when_the_first_forward_is_queued() -> None:
    """The prefetch hook is an argument of the step: it runs once per step, after the first forward pass
    and before its loss, also with SAM's second pass and with micro-batches."""
    events: list[str] = []
    model = ToyNet(dropout=0.0, bn=False)
    model.register_forward_hook(lambda *a: events.append("forward"))
    params = list(model.parameters())

    def loss_fn(out, y, sched):
        events.append("loss")
        loss = F.cross_entropy(out.logits.float(), y)
        return loss, {"total": loss.detach()}

    step = TrainStep(
        model, loss_fn, torch.optim.SGD(params, lr=0.1), params, clipper=GradClipper(ClipConfig(kind="none")),
        sam=SAM(params, 0.05), accumulate=2,
    )  # fmt: skip
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 2, (8,))
    step(x, y, ScheduleValues(lr=0.1, epoch=0.0, beta_ramp=1.0), after_forward=lambda: events.append("hook"))
    assert events == ["forward", "hook", "loss"] + ["forward", "loss"] * 3  # 2 micro-batches x 2 passes
