"""The training step, pinned: parameters after four steps on a toy model equal those recorded with the step
implementation the package had before its training code was restructured (commit 3f9a418,
``training.step.train_step``), for plain and SAM steps, AutoClip and norm clipping, fp32, bf16 and fp16
with loss scaling, including a skipped non-finite step.

Bit for bit on the machine that recorded them; across CPUs (AVX-512 or not) the kernels sum in another
order, so values are compared to 1e-4 (fp32) / 1e-2 (bf16, its own precision). Two entries are not compared: the toy's
first conv bias sits before batch norm, so its true gradient is zero and Adam turns the rounding
noise into steps of +-lr whose sign depends on the CPU; the running mean that follows carries it."""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import pytest
import torch
from _training_toy import ToyNet, toy_config
from safetensors.torch import load_file

from cmafnet.config import ClipConfig
from cmafnet.losses.objective import Objective
from cmafnet.training.clipping import GradClipper
from cmafnet.training.optim import build_adamw, param_groups
from cmafnet.training.sam import SAM
from cmafnet.training.schedules import ScheduleValues
from cmafnet.training.stages import stage_loss
from cmafnet.training.step import TrainStep

REFERENCE = Path(__file__).parent / "assets" / "step_reference.safetensors"
CASES = {
    # name: (sam rho, adaptive, clip kind, amp, dropout, the step made non-finite)
    "plain_autoclip_fp32": (0.0, False, "autoclip", "none", 0.0, 2),
    "sam_autoclip_fp32": (0.05, False, "autoclip", "none", 0.0, 2),
    "asam_norm_bf16": (0.05, True, "norm", "bf16", 0.1, None),
    "sam_autoclip_fp16": (0.05, False, "autoclip", "fp16", 0.1, None),
}


# Zero true gradient (a bias before batch norm) and what it feeds: rounding noise only, CPU-dependent.
NOISE_ONLY = ("spatial.0.bias", "spatial.1.running_mean")


def _batches(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 2, (8,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("name", list(CASES))
def test_step_equals_the_recorded_reference(name: str) -> None:
    rho, adaptive, clip, amp, dropout, nan_step = CASES[name]
    rtol = 1e-2 if amp == "bf16" else 1e-4
    ref = {k.split(".", 1)[1]: v for k, v in load_file(str(REFERENCE)).items() if k.startswith(name + ".")}
    cfg = toy_config()
    stage = cfg.train.stages[2]  # end_to_end: everything trains, full objective
    torch.manual_seed(0)
    model = ToyNet(dropout=dropout, bn=True)
    objective = Objective(cfg.loss, cfg.regularizers, [20, 12], num_heads=1)
    groups = param_groups(model.named_parameters(), 1e-4, extra_no_decay=objective.parameters())
    params = [p for g in groups for p in g["params"]]
    opt = build_adamw(groups, 1e-2, fused=False, device=torch.device("cpu"))
    step = TrainStep(
        model, partial(stage_loss, stage=stage, objective=objective), opt, params,
        clipper=GradClipper(ClipConfig(kind=clip, history=3, percentile=50.0, max_norm=0.5)),
        sam=SAM(params, rho, adaptive) if rho else None, amp=amp,
        scaler=torch.amp.GradScaler("cpu") if amp == "fp16" else None,
    )  # fmt: skip
    model.train()
    results = []
    for i, (x, y) in enumerate(_batches()):
        if i == nan_step:
            x = x.clone()
            x[0, 0, 0, 0] = math.nan
        # the recorded loss clock; the beta ramp at its start (regularisers weighted 0); lr constant
        results.append(step.result(step(x, y, ScheduleValues(lr=1e-2, epoch=i / 4, beta_ramp=0.0))))
    assert [r.skipped for r in results] == ref["__skipped"].tolist()
    for r, loss, norm in zip(results, ref["__loss"].tolist(), ref["__grad_norm"].tolist(), strict=True):
        if not r.skipped:
            assert r.loss == pytest.approx(loss, rel=rtol) and r.grad_norm == pytest.approx(norm, rel=rtol)
    state = model.state_dict()
    for key, expected in ((k, v) for k, v in ref.items() if not k.startswith("__") and k not in NOISE_ONLY):
        assert torch.allclose(state[key], expected, rtol=rtol, atol=rtol * 0.1), f"{name}: {key} differs"
