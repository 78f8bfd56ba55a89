"""Training steps to time: forward + loss under autocast, backward, (SAM), AdamW; and their parts.

Nothing here knows about CMAF-Net: a step is built from a model, a ``loss_fn(model, x, y)`` and an
optimiser, so the same code times CMAF-Net with its objective and a timm baseline with
cross-entropy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmafnet.analysis.profiling.timing import Timing, time_per_step

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


def make_train_step(
    model: nn.Module,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    timing: Timing,
    *,
    sam_rho: float | None = None,
    sam: Any = None,
    autocast_cache: bool = True,
) -> Callable[[Tensor, Tensor], Tensor]:
    """One optimiser step on a batch: forward + loss under autocast, backward, (SAM), AdamW.

    With ``sam_rho`` the step is SAM (Foret et al., 2021): after the first backward the weights move
    by ``rho * g / ||g||``, a second forward/backward at the perturbed weights gives the gradient the
    optimiser uses, and the weights move back before ``optimizer.step()``. ``sam`` may be an object
    with ``perturb()`` / ``restore()`` (``cmafnet.training.sam.SAM``); without it an inline version
    with ``torch._foreach`` kernels is used. fp16 uses a GradScaler; ``g / ||g||`` does not depend on
    the loss scale, so the inline version needs no unscale before the perturbation.
    ``autocast_cache=False`` re-casts the weights at every use (required inside a CUDA graph).
    """
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    scaler = torch.amp.GradScaler(timing.device.type) if timing.amp == "fp16" else None

    def loss_of(x: Tensor, y: Tensor) -> Tensor:
        with timing.autocast(cache_enabled=autocast_cache):
            return loss_fn(model, x, y)

    def backward(loss: Tensor) -> None:
        (scaler.scale(loss) if scaler else loss).backward()

    @torch.no_grad()
    def inline_perturb() -> list[Tensor]:
        with_grad = [p for p in params if p.grad is not None]
        grads = [p.grad for p in with_grad]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        eps = torch._foreach_mul(grads, sam_rho / (norm + 1e-12))
        torch._foreach_add_(with_grad, eps)  # w + e(w)
        return [with_grad, eps]

    def step(x: Tensor, y: Tensor) -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(x, y)
        backward(loss)
        if sam_rho:
            if sam is not None:
                if scaler:  # the project's SAM wants the true gradient (its contract)
                    with torch.no_grad():
                        torch._foreach_mul_(
                            [p.grad for p in params if p.grad is not None], 1 / scaler.get_scale()
                        )
                sam.perturb()
            else:
                moved, eps = inline_perturb()
            optimizer.zero_grad(set_to_none=True)
            backward(loss_of(x, y))
            if sam is not None:
                sam.restore()
            else:
                with torch.no_grad():
                    torch._foreach_sub_(moved, eps)  # back to w
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
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
