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


class SAM:
    """Holds the perturbation between the two passes of one SAM step.

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
        self._e: list[tuple[nn.Parameter, Tensor]] = []  # (parameter, its unperturbed copy)

    @torch.no_grad()
    def grad_norm(self) -> Tensor:
        """The (ASAM-weighted) L2 norm of the current gradients, as a 0-d fp32 tensor."""
        norms = [((p.abs() if self.adaptive else 1.0) * p.grad).float().norm() for p in self._with_grad()]
        if not norms:
            return torch.zeros(())
        return torch.linalg.vector_norm(torch.stack(norms))

    @torch.no_grad()
    def perturb(self) -> Tensor:
        """Move every parameter to ``w + e(w)``; returns the gradient norm used (non-finite = skip)."""
        if self._e:
            raise RuntimeError("SAM.perturb called twice without restore")
        norm = self.grad_norm()
        scale = self.rho / (norm + self.eps)
        for p in self._with_grad():
            e = p.grad.float() * scale
            if self.adaptive:
                e = e * p.float().pow(2)
            self._e.append((p, p.detach().clone()))  # restore copies w back: exact, unlike w + e - e
            p.add_(e.to(p.dtype))
        return norm

    @torch.no_grad()
    def restore(self) -> None:
        """Undo :meth:`perturb` (back to exactly ``w``); safe to call when nothing is perturbed."""
        for p, w in self._e:
            p.copy_(w)
        self._e = []

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
        torch._foreach_mul_(grads, 1.0 / scaler.get_scale())


def grads_finite(params: Iterable[nn.Parameter]) -> bool:
    """True when every gradient is finite (one device sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)).item())
