"""Sharpness-Aware Minimisation (Foret et al., 2021), written out so it composes with autocast,
``GradScaler``, gradient clipping and DDP instead of hiding the two passes inside ``optimizer.step``.

One SAM update::

    loss(w).backward()            # pass 1: g = grad L(w)
    sam.perturb()                 # w <- w + e(w),  e = rho * g / ||g||   (ASAM: rho * w^2 g / ||w g||)
    zero_grad(); loss(w + e).backward()   # pass 2: grad L(w + e)
    sam.restore()                 # back to w, keeping the pass-2 gradient
    base_optimizer.step()

The perturbation needs the *unscaled* gradient of pass 1; the caller unscales it (``unscale_grads``)
before ``perturb`` (the direction is scale-invariant, the finiteness check is not).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn


def _as_float(ts: list[Tensor]) -> list[Tensor]:
    """The tensors in float32 (the same objects when they already are: no copy, no kernel)."""
    return [t if t.dtype == torch.float32 else t.float() for t in ts]


class SAM:
    """Holds the perturbation between the two passes of one SAM step.

    Every per-parameter operation (norm, perturbation, save, restore) is a ``torch._foreach_*``
    call over the whole parameter list, so a SAM step adds a handful of kernel launches instead
    of a few per parameter tensor (CMAF-Net has hundreds), and nothing syncs with the host.

    Args:
        params: the trainable parameters (those the base optimiser updates).
        rho: neighbourhood radius.
        adaptive: ASAM (Kwon et al., 2021): scale the perturbation element-wise by ``|w|``.
        eps: guards the division by the gradient norm.
    """

    def __init__(
        self, params: Iterable[nn.Parameter], rho: float = 0.05, adaptive: bool = False, eps: float = 1e-12
    ):
        if rho < 0:
            raise ValueError(f"SAM rho must be >= 0, got {rho}")
        self.params = [p for p in params if p.requires_grad]
        self.rho, self.adaptive, self.eps = rho, adaptive, eps
        # The perturbed parameters and their unperturbed copies (restore copies w back: exact,
        # unlike w + e - e).
        self._perturbed: list[nn.Parameter] = []
        self._saved: list[Tensor] = []

    @torch.no_grad()
    def grad_norm(self) -> Tensor:
        """The (ASAM-weighted) L2 norm of the current gradients, as a 0-d fp32 tensor."""
        params = self._with_grad()
        if not params:
            return torch.zeros(())
        grads = _as_float([p.grad for p in params])
        if self.adaptive:
            # |w| * g, element-wise, in fp32 (new tensors: the gradients are left as they are).
            grads = torch._foreach_mul(torch._foreach_abs(_as_float([p.detach() for p in params])), grads)
        # one _foreach_norm (a few kernels for any number of tensors), then the norm of the norms
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))

    @torch.no_grad()
    def perturb(self, norm: Tensor | None = None) -> Tensor:
        """Move every parameter to ``w + e(w)``; returns the gradient norm used (non-finite = skip).

        Args:
            norm: the value of :meth:`grad_norm` for the current gradients when the caller already
                computed it (e.g. for its finiteness check); computed here when ``None``.
        """
        if self._perturbed:
            raise RuntimeError("SAM.perturb called twice without restore")
        if norm is None:
            norm = self.grad_norm()
        params = self._with_grad()
        if not params:
            return norm
        weights = [p.detach() for p in params]
        saved = [torch.empty_like(w) for w in weights]
        torch._foreach_copy_(saved, weights)
        self._perturbed, self._saved = params, saved
        scale = self.rho / (norm + self.eps)  # 0-d tensor: stays on the device
        e = torch._foreach_mul(_as_float([p.grad for p in params]), scale.to(params[0].grad.device))
        if self.adaptive:
            w32 = _as_float(weights)
            torch._foreach_mul_(e, torch._foreach_mul(w32, w32))  # e * w^2
        e = [ei if ei.dtype == w.dtype else ei.to(w.dtype) for ei, w in zip(e, weights, strict=True)]
        torch._foreach_add_(weights, e)
        return norm

    @torch.no_grad()
    def restore(self) -> None:
        """Undo :meth:`perturb` (back to exactly ``w``); safe to call when nothing is perturbed."""
        if self._perturbed:
            torch._foreach_copy_([p.detach() for p in self._perturbed], self._saved)
        self._perturbed, self._saved = [], []

    def _with_grad(self) -> list[nn.Parameter]:
        return [p for p in self.params if p.grad is not None]


@torch.no_grad()
def unscale_grads(params: Iterable[nn.Parameter], scaler: torch.amp.GradScaler | None) -> None:
    """Divide gradients by the loss scale in place (pass 1 of SAM only: ``GradScaler.unscale_``
    may be called once per update and is kept for pass 2)."""
    if scaler is None or not scaler.is_enabled():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        # scaler.scale(1) is the scale as a device tensor (get_scale() would read it on the host:
        # a sync); the scale is a power of two, so its reciprocal is exact.
        inv = scaler.scale(torch.ones((), dtype=torch.float32, device=grads[0].device)).reciprocal()
        torch._foreach_mul_(grads, inv)
