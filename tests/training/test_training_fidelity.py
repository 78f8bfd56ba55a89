"""The trainer does what paper §4.5/§5.4 describe: gradient accumulation (128 = 2 x 64), stage-1 branches
trained as if alone, and the effective learning rate per class among the monitors."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from _training_toy import ToyNet, make_trainer, resume_and_compare, toy_config

from cmafnet.config import ClipConfig
from cmafnet.losses.acbfl import ACBFLoss
from cmafnet.losses.objective import stage1_loss
from cmafnet.training import run_stages
from cmafnet.training.checkpoint import load_checkpoint
from cmafnet.training.clipping import GradClipper
from cmafnet.training.information import MonitorAccumulator
from cmafnet.training.sam import SAM
from cmafnet.training.schedules import ScheduleValues
from cmafnet.training.stages import branch_groups
from cmafnet.training.step import TrainStep


def _ce(out, y, sched):
    loss = F.cross_entropy(out.logits.float(), y)
    return loss, {"cls": loss.detach(), "beta1": 0.5}


SCHED = ScheduleValues(lr=1e-2, epoch=0.0, beta_ramp=1.0)  # the optimisers' own lr


def _batches(n: int, b: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, 3, 8, 8, generator=g), torch.randint(0, 2, (b,), generator=g)) for _ in range(n)]


def _train(accumulate: int, sam: bool) -> tuple[list, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = ToyNet(dropout=0.0, bn=False)  # no BatchNorm: micro-batches see the same function
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2, foreach=True)
    step = TrainStep(
        model, _ce, opt, params, clipper=GradClipper(ClipConfig(kind="autoclip", history=8, percentile=50.0)),
        sam=SAM(params, 0.05) if sam else None, accumulate=accumulate,
    )  # fmt: skip
    results = [step.result(step(x, y, SCHED)) for x, y in _batches(4)]
    return results, [p.detach().clone() for p in params]


@pytest.mark.parametrize("sam", [False, True])
def test_k_micro_batches_of_b_over_k_equal_one_batch_of_b(sam: bool) -> None:
    one, w1 = _train(1, sam)
    two, w2 = _train(2, sam)
    four, w4 = _train(4, sam)
    for a, b, c in zip(one, two, four, strict=True):
        assert b.loss == pytest.approx(a.loss, rel=1e-5) and c.loss == pytest.approx(a.loss, rel=1e-5)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=1e-4) and b.terms == pytest.approx(
            a.terms, rel=1e-5
        )
    for p1, p2, p4 in zip(w1, w2, w4, strict=True):
        torch.testing.assert_close(p2, p1, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(p4, p1, rtol=1e-4, atol=1e-6)
    moved = _train(1, sam)[1]  # the check is not vacuous: training moved the weights
    torch.manual_seed(0)
    assert any(not torch.equal(a, b) for a, b in zip(moved, ToyNet(dropout=0.0, bn=False).parameters()))


def test_micro_batches_must_split_the_batch_evenly() -> None:
    from cmafnet.config import load_config
    from cmafnet.errors import ConfigError

    with pytest.raises(ConfigError, match="accumulate_steps"):
        load_config("smoke", ["train.batch_size=10", "train.accumulate_steps=3"])


def test_resume_with_accumulation_is_bit_identical(tmp_path) -> None:
    """A checkpoint falls between optimiser steps (a step runs all its micro-batches), so a run with
    accumulation stopped mid-epoch resumes exactly."""
    cfg = toy_config(accumulate_steps=2)
    ref = make_trainer(tmp_path / "ref", cfg)
    run_stages(ref)
    assert ref.stage_step.step.accumulate == 2
    part = make_trainer(tmp_path / "run", cfg, stop_after_steps=8)
    assert run_stages(part)["status"] == "stopped"
    resume_and_compare(ref, tmp_path / "run", cfg, load_checkpoint(tmp_path / "run/checkpoints/last.pt"))


def _stage1(model: ToyNet, only: str | None, per_branch: bool = True) -> TrainStep:
    """Stage 1's step (SAM + AutoClip) on both branches, or on one branch alone (``only``)."""
    named = [
        (n, p) for n, p in model.named_parameters() if n.startswith(("spatial", "contextual", "aux_heads"))
    ]
    if only:
        named = [(n, p) for n, p in named if n.startswith((only, f"aux_heads.{only}"))]
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=1e-2, foreach=True)
    return TrainStep(
        model, lambda out, y, sched: stage1_loss(out, y), opt, params,
        clipper=GradClipper(ClipConfig(kind="autoclip", history=4, percentile=10.0)),
        sam=SAM(params, 0.05), groups=branch_groups(model, named) if only is None and per_branch else None,
    )  # fmt: skip


def test_stage1_updates_each_branch_as_if_it_were_trained_alone() -> None:
    """SAM's radius and the clipping use each branch's own gradient norm: both branches trained together
    end where each ends when trained alone. One joint norm would couple them (also checked)."""
    batches = _batches(4)

    def run(only: str | None, per_branch: bool = True) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = ToyNet(dropout=0.0, bn=True)
        step = _stage1(model, only, per_branch)
        for x, y in batches:
            assert not step.result(step(x, y, SCHED)).skipped
        return {k: v.clone() for k, v in model.state_dict().items()}

    together, joint = run(None), run(None, per_branch=False)  # joint: one norm for both branches
    assert len(_stage1(ToyNet(), None).groups) == 2
    for branch in ("spatial", "contextual"):
        alone = run(branch)
        keys = [k for k in together if k.startswith((branch, f"aux_heads.{branch}"))]
        assert keys
        for k in keys:
            torch.testing.assert_close(together[k], alone[k], rtol=1e-6, atol=1e-7)
        assert any(
            not torch.allclose(joint[k], alone[k], rtol=1e-4, atol=1e-6) for k in keys if "weight" in k
        )


def test_acbfl_sample_weights_are_alpha_times_the_focal_factor() -> None:
    loss = ACBFLoss([90, 10], margin=False, entropy_weight=0.0)
    logits, target = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([0, 1, 1])
    p_true = logits.softmax(1)[torch.arange(3), target]
    expected = loss.alpha(3.0)[target] * (1 - p_true) ** loss.gamma[target]
    torch.testing.assert_close(loss.sample_weights(logits, target, epoch=3.0), expected)
    # the loss is exactly sum(weight * -log p) / B
    torch.testing.assert_close(loss(logits, target, epoch=3.0), (expected * -p_true.log()).mean())


def test_effective_learning_rate_per_class_is_logged_per_epoch(tmp_path) -> None:
    acc = MonitorAccumulator(2, loss_weights=lambda logits, y: torch.tensor([1.0, 3.0, 5.0]))
    acc.update(
        type(
            "Out",
            (),
            {
                "logits": torch.zeros(3, 2),
                **dict.fromkeys(
                    ("mu_s", "logvar_s", "mu_t", "logvar_t", "attn", "tau", "gate", "z_s", "z_t")
                ),
            },
        )(),
        torch.tensor([0, 1, 1]),
    )
    r = acc.result()
    assert r["loss_weight_c0"] == pytest.approx(1.0) and r["loss_weight_c1"] == pytest.approx(4.0)
    tr = make_trainer(tmp_path, toy_config())
    run_stages(tr)
    rows = pd.read_csv(tmp_path / "metrics.csv")
    assert {"eff_lr_c0", "eff_lr_c1", "loss_weight_c0", "loss_weight_c1"} <= set(rows.columns)
    for c in (0, 1):
        assert rows[f"eff_lr_c{c}"].to_numpy() == pytest.approx(
            (rows["lr"] * rows[f"loss_weight_c{c}"]).to_numpy()
        )
    assert (rows["loss_weight_c1"] > 0).all() and rows["eff_lr_c0"].ne(rows["lr"]).any()  # A-CBFL reweighs
