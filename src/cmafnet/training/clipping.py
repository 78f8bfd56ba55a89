"""Gradient clipping: AutoClip (Seetharaman et al., 2020), NFNet AGC (Brock et al., 2021), plain norm.

AutoClip keeps the history of total gradient norms and clips at its ``percentile``-th value, so the
threshold follows the scale of the gradients instead of being a guessed constant. The history is part
of the checkpoint so a resumed run clips exactly like an uninterrupted one.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from cmafnet.config import ClipConfig


class GradClipper:
    """Clip gradients in place according to a :class:`~cmafnet.config.ClipConfig`.

    ``__call__`` expects unscaled gradients and returns the total gradient norm *before* clipping
    (a 0-d tensor; non-finite means the step must be skipped, and then nothing is recorded).
    """

    def __init__(self, cfg: ClipConfig):
        self.cfg = cfg
        self.history: deque[float] = deque(maxlen=cfg.history)

    def __call__(self, params: Sequence[nn.Parameter]) -> Tensor:
        with_grad = [p for p in params if p.grad is not None]
        grads = [p.grad for p in with_grad]
        if not grads:
            return torch.zeros(())
        total = torch.nn.utils.get_total_norm(grads)
        norm = float(total)  # one sync: needed for the finite check and the AutoClip history anyway
        if not np.isfinite(norm):
            return total
        kind = self.cfg.kind
        if kind == "autoclip":
            self.history.append(norm)
            threshold = float(np.percentile(np.asarray(self.history), self.cfg.percentile))
            torch.nn.utils.clip_grads_with_norm_(with_grad, threshold, total)
        elif kind == "norm":
            torch.nn.utils.clip_grads_with_norm_(with_grad, self.cfg.max_norm, total)
        elif kind == "agc":
            from timm.utils import adaptive_clip_grad

            adaptive_clip_grad(with_grad, clip_factor=self.cfg.agc_clip)
        return total

    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.history = deque((float(x) for x in state["history"]), maxlen=self.cfg.history)
