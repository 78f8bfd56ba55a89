"""Gradient clipping: AutoClip (Seetharaman et al., 2020), NFNet AGC (Brock et al., 2021), plain norm.

AutoClip keeps the history of total gradient norms and clips at its ``percentile``-th value, so the
threshold follows the scale of the gradients instead of being a guessed constant. The history is part
of the checkpoint so a resumed run clips exactly like an uninterrupted one.

One implementation for every step: nothing here reads a device value on the host, so the eager step
and the step captured in a CUDA graph (``train.cuda_graph``) run the same code. The history is a
float64 ring buffer on the device (NaN marks an empty slot) and the threshold is numpy's
``percentile`` (linear interpolation) of the recorded norms, computed with device operations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cmafnet.config import ClipConfig


class GradClipper:
    """Clip gradients in place according to a :class:`~cmafnet.config.ClipConfig`.

    ``clipper(params, total, finite)`` takes the total gradient norm before clipping (a 0-d tensor)
    and whether the step is finite (a 0-d bool tensor). A non-finite step records nothing in the
    AutoClip history (the step will be skipped; its gradients are discarded anyway).

    Args:
        cfg: the ``train.clip`` section.
        device: where the history lives (the parameters' device).
    """

    def __init__(self, cfg: ClipConfig, device: torch.device | str = "cpu"):
        self.cfg = cfg
        # float64, like the Python floats numpy's percentile would see: the same threshold
        self.history = torch.full((cfg.history,), math.nan, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.long, device=device)  # norms recorded so far

    def __call__(self, params: Sequence[nn.Parameter], total: Tensor, finite: Tensor) -> None:
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            return
        kind = self.cfg.kind
        if kind == "autoclip":
            slot = (self.count % self.cfg.history).reshape(1)
            old = self.history.index_select(0, slot)
            self.history.index_copy_(0, slot, torch.where(finite, total.double().reshape(1), old))
            self.count.add_(finite.long())
            self._clip(with_grad, self.threshold(), total)
        elif kind == "norm":
            self._clip(with_grad, torch.full_like(total, self.cfg.max_norm), total)
        elif kind == "agc":
            from timm.utils import adaptive_clip_grad

            adaptive_clip_grad(with_grad, clip_factor=self.cfg.agc_clip)

    def threshold(self) -> Tensor:
        """``np.percentile(history, percentile)`` of the recorded norms (float32, on the device).

        Written out because ``torch.nanquantile`` and ``clip_grads_with_norm_`` (which calls
        ``float(max_norm)``) would read back to the host.
        """
        n = self.count.clamp(max=self.cfg.history)  # recorded norms in the buffer
        ordered = torch.sort(self.history).values  # NaN (empty slots) sort last
        pos = (n - 1).clamp(min=0).double() * (self.cfg.percentile / 100.0)
        lo = pos.floor().long()
        hi = torch.minimum(lo + 1, (n - 1).clamp(min=0))
        a, b = ordered.gather(0, lo.reshape(1)), ordered.gather(0, hi.reshape(1))
        t = pos - lo
        # numpy's linear interpolation, both branches as it writes them (the same rounding)
        value = torch.where(t >= 0.5, b - (b - a) * (1 - t), a + (b - a) * t)
        return value.reshape(()).float()

    @staticmethod
    def _clip(params: list[nn.Parameter], max_norm: Tensor, total: Tensor) -> None:
        """Scale gradients by ``min(1, max_norm / (total + 1e-6))``: torch's clipping formula, in its
        operation order (a Python float divided by a tensor is ``reciprocal(tensor) * float``)."""
        coef = ((total + 1e-6).reciprocal() * max_norm).clamp(max=1.0)
        torch._foreach_mul_([p.grad for p in params], coef.to(params[0].grad.dtype))

    def state_dict(self) -> dict:
        """The history in recording order (oldest first), as plain floats."""
        n, h = int(self.count), self.cfg.history
        vals = self.history.tolist()
        if n >= h:
            start = n % h
            vals = vals[start:] + vals[:start]
        return {"history": [v for v in vals if not math.isnan(v)]}

    def load_state_dict(self, state: dict) -> None:
        vals = [float(v) for v in state["history"]][-self.cfg.history :]
        self.history.fill_(math.nan)
        if vals:
            self.history[: len(vals)] = torch.tensor(vals, dtype=torch.float64, device=self.history.device)
        self.count.fill_(len(vals))
