"""Fusion of the spatial and contextual token maps: the CMAF block (§4.3, Eq. 13) and concatenation.

``FUSIONS`` maps ``model.fusion.kind`` to a factory ``(cfg: FusionConfig) -> nn.Module``. Every
fusion module takes two ``(B, D, h, w)`` maps and returns ``(F_fused (B, D, h, w), aux)`` where
``aux`` holds the :class:`~cmafnet.models.output.ModelOutput` fields it can fill (``f_att``,
``attn``, ``tau``, ``gate``); attention maps are only materialised when ``return_aux`` is true.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmafnet.config import FusionConfig, TauInit
from cmafnet.registry import Registry

FUSIONS: Registry[Callable[[FusionConfig], nn.Module]] = Registry("fusion")

# Draws of normal(mu, sigma) below this are clamped to it: tau must be positive, and a near-zero
# temperature would make a head an argmax (and its gradient vanish) from the first step.
TAU_MIN = 0.05


def init_log_tau(spec: TauInit, heads: int, generator: torch.Generator | None = None) -> Tensor:
    """Initial ``log tau`` per head for the Table 7 schemes (``fixed`` a, ``uniform`` [a, b),
    ``normal`` (a, b) clamped to ``TAU_MIN``, ``lognormal``: ``log tau ~ N(a, b)``)."""
    out = torch.empty(heads)
    if spec.kind == "fixed":
        return out.fill_(math.log(spec.a))
    if spec.kind == "uniform":
        return out.uniform_(spec.a, spec.b, generator=generator).log_()
    if spec.kind == "normal":
        return out.normal_(spec.a, spec.b, generator=generator).clamp_(min=TAU_MIN).log_()
    return out.normal_(spec.a, spec.b, generator=generator)  # lognormal (TauInit.kind admits no other)


def _tokens(x: Tensor) -> Tensor:
    return x.flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D), a view


@FUSIONS.register("cmaf")
class CMAFBlock(nn.Module):
    """Cross-modal attention fusion: queries from F_s, keys/values from F_t, per-head temperatures.

    ``A_h = softmax(Q_h K_h^T / (sqrt(d_h) * tau_h))`` with ``tau_h = exp(log_tau_h)`` (positive by
    construction); ``F_att = proj(concat_h A_h V_h)``; gate ``g = sigmoid(conv1x1([F_att; F_s]))``,
    ``F_fused = g * F_att + (1 - g) * F_s``. Without the gate (ablation) ``F_fused = F_att + F_s``,
    the plain residual sum, so the spatial features still reach the head.
    """

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        dim, heads = cfg.dim, cfg.heads  # FusionConfig checks that heads divides dim
        self.heads = heads
        self.head_dim = dim // heads
        self.attn_dropout = cfg.attn_dropout
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        # One log-temperature per head; frozen (requires_grad=False) for "w/o temperature learning".
        self.log_tau = nn.Parameter(init_log_tau(cfg.tau_init, heads), requires_grad=cfg.learn_temperature)
        self.gate = nn.Conv2d(2 * dim, dim, kernel_size=1) if cfg.gate else None

    @property
    def tau(self) -> Tensor:
        """``(H,)`` positive temperatures."""
        return self.log_tau.exp()

    def forward(self, f_s: Tensor, f_t: Tensor, return_aux: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        b, d, h, w = f_s.shape
        hd, nh = self.head_dim, self.heads
        # (B, N_s, D) -> (B, H, N_s, d_h)
        q = self.q(self.norm_q(_tokens(f_s))).reshape(b, -1, nh, hd).transpose(1, 2)
        # (B, N_t, 2D) -> (2, B, H, N_t, d_h)
        kv = self.kv(self.norm_kv(_tokens(f_t))).reshape(b, -1, 2, nh, hd).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        # Fold 1/tau_h into the queries: (Q/tau) K^T / sqrt(d_h) == Q K^T / (sqrt(d_h) tau).
        q = q * self.log_tau.neg().exp().to(q.dtype).view(1, nh, 1, 1)
        drop = self.attn_dropout if self.training else 0.0
        aux: dict[str, Tensor] = {}
        if return_aux:  # explicit maps for the regularisers and monitors
            attn = torch.softmax((q @ k.transpose(-2, -1)) * hd**-0.5, dim=-1)  # (B, H, N_s, N_t)
            out = F.dropout(attn, p=drop, training=self.training) @ v
            aux["attn"] = attn
            aux["tau"] = self.tau
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)  # default scale 1/sqrt(d_h)
        # (B, H, N_s, d_h) -> (B, N_s, D) -> (B, D, h, w)
        out = self.proj(out.transpose(1, 2).reshape(b, h * w, d))
        f_att = out.transpose(1, 2).reshape(b, d, h, w)
        if self.gate is None:
            fused = f_att + f_s
        else:
            g = torch.sigmoid(self.gate(torch.cat((f_att, f_s), dim=1)))
            fused = g * f_att + (1 - g) * f_s
            if return_aux:
                aux["gate"] = g
        if return_aux:
            aux["f_att"] = f_att
        return fused, aux


@FUSIONS.register("concat")
class ConcatFusion(nn.Module):
    """ "Simple concatenation" ablation: ``F_fused = conv1x1([F_s; F_t])`` back to width D.

    The contextual map is average-pooled to the spatial grid if the grids differ.
    """

    def __init__(self, cfg: FusionConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(2 * cfg.dim, cfg.dim, kernel_size=1)

    def forward(self, f_s: Tensor, f_t: Tensor, return_aux: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
        if f_t.shape[-2:] != f_s.shape[-2:]:
            f_t = F.adaptive_avg_pool2d(f_t, f_s.shape[-2:])
        return self.proj(torch.cat((f_s, f_t), dim=1)), {}
