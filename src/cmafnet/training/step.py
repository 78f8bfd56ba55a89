"""One optimiser update: autocast forward, (SAM) backward passes, clipping, non-finite skip.

The order of operations under a ``GradScaler`` (fp16) is the delicate part::

    pass 1   scaled backward -> unscale by hand -> finite? -> SAM perturb (w + e)
    pass 2   scaled backward at w + e -> restore w -> scaler.unscale_ -> clip -> finite? -> step
    scaler.update()   (backs the scale off when either pass overflowed)

Both passes skip consistently: a non-finite gradient in either pass leaves the weights, the
optimiser moments and the clipping history untouched and counts as one skipped step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cmafnet.training.clipping import GradClipper
from cmafnet.training.sam import SAM, unscale_grads

LossFn = Callable[[object, Tensor], tuple[Tensor, dict]]


@dataclass
class StepResult:
    skipped: bool
    loss: float  # the loss of pass 1 (NaN when skipped because of it)
    terms: dict[str, float]
    grad_norm: float  # total norm before clipping (pass 2 with SAM)


def autocast_context(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for the device type; a no-op context for ``amp: none``."""
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def sdpa_context(backend: str) -> contextlib.AbstractContextManager:
    """Restrict ``scaled_dot_product_attention`` to one backend; ``auto`` lets torch choose."""
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kinds = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    return sdpa_kernel(kinds[backend])


def _to_floats(loss: Tensor, terms: dict, *extra: Tensor) -> tuple[float, dict[str, float], list[float]]:
    """The loss, every term and the ``extra`` 0-d tensors (gradient norms) as Python floats, with
    one device sync for all of them (not one per value)."""
    keys = list(terms)
    vals = [loss.detach().float().reshape(())]
    vals += [torch.as_tensor(terms[k], dtype=torch.float32, device=loss.device).reshape(()) for k in keys]
    vals += [e.detach().float().reshape(()).to(loss.device) for e in extra]
    out = torch.stack(vals).tolist()
    n = 1 + len(keys)
    return out[0], dict(zip(keys, out[1:n], strict=True)), out[n:]


def _total_grad_norm(params: list[nn.Parameter]) -> Tensor:
    """Total L2 norm of the gradients (a 0-d tensor, no sync; the same value the clipper computes).

    Non-finite exactly when some gradient is non-finite: the finiteness check of a step.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)


def _agree(flag: bool, device: torch.device) -> bool:
    """With DDP, a step is skipped on every rank when it must be skipped on any."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def train_step(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    params: list[nn.Parameter],
    *,
    clipper: GradClipper,
    scaler: torch.amp.GradScaler | None = None,
    sam: SAM | None = None,
    amp: str = "none",
    sdpa_backend: str = "auto",
) -> StepResult:
    """One update of ``params`` on the batch ``(x, y)``; see the module docstring for the order.

    Args:
        model: the module to call (possibly DDP-wrapped or compiled); called as
            ``model(x, return_aux=True)`` and the output passed to ``loss_fn(out, y)``.
        params: the trainable parameters (what ``optimizer`` updates).
        scaler: an enabled GradScaler for fp16, else ``None``.
        sam: the SAM helper, or ``None`` for a plain step.
    """
    device = x.device
    use_scaler = scaler is not None and scaler.is_enabled()

    def forward_backward() -> tuple[Tensor, dict]:
        with autocast_context(device, amp), sdpa_context(sdpa_backend):
            out = model(x, return_aux=True)
            loss, terms = loss_fn(out, y)
        (scaler.scale(loss) if use_scaler else loss).backward()
        return loss, terms

    # A skipped step must not leave its trace in BatchNorm running statistics either.
    buffers = [b for b in model.buffers() if b.numel()]
    # One multi-tensor copy instead of a clone per buffer (BatchNorm has three per layer).
    saved = [torch.empty_like(b) for b in buffers]
    if buffers:
        with torch.no_grad():
            torch._foreach_copy_(saved, buffers)

    def skip(norm: float) -> StepResult:
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            if buffers:
                torch._foreach_copy_(buffers, saved)
        return StepResult(True, loss_value, term_values, norm)

    optimizer.zero_grad(set_to_none=True)
    loss, terms = forward_backward()
    use_sam = sam is not None and sam.rho > 0

    # Host syncs per step: one here (loss, terms and, with SAM, the pass-1 gradient norm, fetched
    # together), one for the pass-2 norm with SAM, and the clipper's own (AutoClip needs the norm
    # on the host). Nothing else in the step reads a device value.
    if use_sam:
        unscale_grads(params, scaler)
        grad_norm1 = _total_grad_norm(params)
        # SAM's direction uses its own (ASAM-weighted) norm; for plain SAM it is the same value.
        sam_norm = sam.grad_norm() if sam.adaptive else grad_norm1
        loss_value, term_values, (norm1_value,) = _to_floats(loss, terms, grad_norm1)
        loss_finite = math.isfinite(loss_value)
        bad = _agree(not (loss_finite and math.isfinite(norm1_value)), device)
        if bad:
            if use_scaler:  # no unscale_ was recorded: back the scale off explicitly
                scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
            return skip(float("nan"))
        sam.perturb(sam_norm)
        optimizer.zero_grad(set_to_none=True)
        try:
            forward_backward()
        finally:
            sam.restore()  # back to w, keeping the gradient taken at w + e
        if use_scaler:
            scaler.unscale_(optimizer)
        norm_value = float(_total_grad_norm(params))
    else:
        if use_scaler:
            scaler.unscale_(optimizer)
        loss_value, term_values, (norm_value,) = _to_floats(loss, terms, _total_grad_norm(params))
        loss_finite = math.isfinite(loss_value)

    # A non-finite loss or gradient skips the step before the clipper sees it (its history and
    # the gradients stay untouched).
    bad = _agree(not (loss_finite and math.isfinite(norm_value)), device)
    if bad:
        if use_scaler:
            scaler.update()  # sees the inf recorded by unscale_ (or none: then the scale stays)
        return skip(norm_value)
    clipper(params)  # clips in place; its pre-clipping norm is ``norm_value`` (same gradients)
    if use_scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return StepResult(False, loss_value, term_values, norm_value)
