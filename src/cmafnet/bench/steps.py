"""The references' plain training step, and where a training step's time goes (its parts timed alone).

Nothing here knows about CMAF-Net: the breakdown takes a model, a ``loss_fn(model, x, y)`` and an
optimiser, so the same code splits CMAF-Net's step (the trainer's objective and AdamW) and the naive
reference's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmafnet.bench.timing import Timing, time_per_step

LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]
# objective_fn(model, x, y) -> run: builds one model output (called under no_grad) and returns a
# closure computing the loss from it alone, differentiable in that output's tensors
ObjectiveFn = Callable[[nn.Module, Tensor, Tensor], Callable[[], Tensor]]


def cross_entropy_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The baselines' training loss (plain cross-entropy on ``model(x)``)."""
    return F.cross_entropy(model(x), y)


def make_optimizer(model: nn.Module, *, lr: float = 1e-4, weight_decay: float = 1e-4, fused: bool = True):
    """AdamW over the trainable parameters; ``fused`` uses the single-kernel implementation.

    Weight-decay grouping does not change the cost of a step, so the bench uses one group.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if fused:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def plain_ce_step(
    model: nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer, timing: Timing
) -> Callable[[Tensor, Tensor], Tensor]:
    """The references' training step: forward + loss under autocast, backward, AdamW (a GradScaler
    with fp16). This is how the anchors were measured; CMAF-Net is timed through the trainer's own step
    (:func:`cmafnet.bench.suite.trainer_parts`), never through this one."""
    scaler = torch.amp.GradScaler(timing.device.type) if timing.amp == "fp16" else None

    def step(x: Tensor, y: Tensor) -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        with timing.autocast():
            loss = loss_fn(model, x, y)
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        return loss.detach()

    return step


def step_breakdown(
    model: nn.Module,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    timing: Timing,
    objective_fn: ObjectiveFn | None = None,
) -> dict[str, float]:
    """Where a training step's time goes, in ms per step (each part timed on its own, train mode).

    ``forward_backward_ce``: plain ``model(x)`` + cross-entropy + backward (the model alone);
    ``forward_backward_loss``: ``loss_fn`` (for CMAF-Net: ``return_aux=True`` + the objective) +
    backward, so the difference is what the auxiliary outputs and regularisers cost;
    ``objective_forward_backward`` (with ``objective_fn``): the loss alone, forward + backward, on
    one fixed model output whose tensors are leaves, i.e. the regularisers without the model;
    ``<branch>_forward_backward``: each branch (``model.spatial`` / ``model.contextual`` when the
    model has them) alone; ``optimizer_step``: the AdamW update alone.
    """
    inner = getattr(model, "_orig_mod", model)  # a compiled model's branches are the eager ones
    model.train()

    def fwd_bwd(fn: Callable[[], Tensor]) -> Callable[[], None]:
        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            with timing.autocast():
                out = fn()
            out.backward()

        return run

    def branch_scalar(branch: nn.Module) -> Tensor:
        out = branch(x)
        out = out[-1] if isinstance(out, (list, tuple)) else out  # timm features_only gives a list
        return out.float().mean()

    parts = {
        "forward_backward_ce": time_per_step(fwd_bwd(lambda: F.cross_entropy(model(x), y)), timing),
        "forward_backward_loss": time_per_step(fwd_bwd(lambda: loss_fn(model, x, y)), timing),
    }
    if objective_fn is not None:
        with torch.no_grad(), timing.autocast():
            objective_only = objective_fn(model, x, y)
        parts["objective_forward_backward"] = time_per_step(fwd_bwd(objective_only), timing)
    for name in ("spatial", "contextual"):
        branch = getattr(inner, name, None)
        if isinstance(branch, nn.Module):
            parts[f"{name}_forward_backward"] = time_per_step(
                fwd_bwd(lambda b=branch: branch_scalar(b)), timing
            )
    fwd_bwd(lambda: loss_fn(model, x, y))()  # gradients for every parameter the optimiser holds
    parts["optimizer_step"] = time_per_step(optimizer.step, timing)
    optimizer.zero_grad(set_to_none=True)
    return {k: v * 1e3 for k, v in parts.items()}
