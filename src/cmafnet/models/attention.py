"""Attention kernels: exact (SDPA) and Nystrom (landmark) softmax attention, plus a self-attention layer.

The kernels take per-head tensors ``q, k, v`` of shape ``(B, heads, N, d_h)`` and a ``scale`` that
multiplies the logits (``1/sqrt(d_h)`` for the standard softmax attention), and return
``(B, heads, N_q, d_h)``. ``ATTENTION`` names them for configs (``contextual.attention``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmafnet.registry import Registry

AttentionKernel = Callable[..., Tensor]
ATTENTION: Registry[AttentionKernel] = Registry("attention")


@ATTENTION.register("full")
def full_attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, dropout: float = 0.0, **_: object
) -> Tensor:
    """Exact softmax attention through ``F.scaled_dot_product_attention`` (flash / efficient kernels)."""
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale)


def _landmarks(x: Tensor, m: int) -> Tensor:
    """Segment means of the token axis: ``(B, h, N, d) -> (B, h, m, d)``.

    ``adaptive_avg_pool1d`` handles N not divisible by m (uneven segments) and is the identity when
    ``m == N``, which is what makes Nystrom attention exact in that case.
    """
    b, h, n, d = x.shape
    if m == n:
        return x
    # (B*h, d, N) -> pool over tokens -> (B*h, d, m) -> (B, h, m, d)
    pooled = F.adaptive_avg_pool1d(x.reshape(b * h, n, d).transpose(1, 2), m)
    return pooled.transpose(1, 2).reshape(b, h, m, d)


@ATTENTION.register("nystrom")
def nystrom_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    num_landmarks: int = 16,
    dropout: float = 0.0,
    **_: object,
) -> Tensor:
    """Nystrom approximation of softmax attention (Xiong et al., AAAI 2021, "Nystromformer").

    ``softmax(QK^T) V ~= softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T) V`` with landmarks
    ``Q~, K~`` the segment means of the queries and keys. Cost is O(N m) instead of O(N^2). The
    pseudo-inverse of the small ``(m, m)`` kernel is computed exactly (``torch.linalg.pinv``, in
    float32 since it has no half-precision kernel), so with ``m == N`` the result equals exact
    attention. ``num_landmarks`` above the token count is clamped to it.
    """
    m = min(num_landmarks, q.shape[-2], k.shape[-2])
    dtype = q.dtype
    with torch.autocast(device_type=q.device.type, enabled=False):  # pinv needs float32 throughout
        out = _nystrom_fp32(q, k, v, scale=scale, m=m, dropout=dropout)
    return out.to(dtype)


def _nystrom_fp32(q: Tensor, k: Tensor, v: Tensor, *, scale: float, m: int, dropout: float) -> Tensor:
    # Split the logit scale over q and k so that every q k^T product below carries it once.
    s = scale**0.5
    q32, k32, v32 = q.float() * s, k.float() * s, v.float()
    q_l, k_l = _landmarks(q32, m), _landmarks(k32, m)
    f1 = torch.softmax(q32 @ k_l.transpose(-2, -1), dim=-1)  # (B, h, N_q, m)
    a = torch.softmax(q_l @ k_l.transpose(-2, -1), dim=-1)  # (B, h, m, m)
    f3 = torch.softmax(q_l @ k32.transpose(-2, -1), dim=-1)  # (B, h, m, N_k)
    if dropout > 0:
        f1 = F.dropout(f1, p=dropout, training=True)
    return f1 @ (torch.linalg.pinv(a) @ (f3 @ v32))  # (B, h, N_q, d_h)


class SelfAttention(nn.Module):
    """Multi-head self-attention with timm's parameter layout (``qkv``, ``proj``).

    Same names and maths as ``timm.models.vision_transformer.Attention`` so timm MobileViT weights
    load unchanged; the kernel is chosen by name from ``ATTENTION``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        kind: str = "full",
        num_landmarks: int = 16,
        qkv_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide dim ({dim})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.kind = kind
        self.kernel = ATTENTION.get(kind)
        self.num_landmarks = num_landmarks
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        # (B, N, 3C) -> (3, B, heads, N, d_h)
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = self.kernel(
            q,
            k,
            v,
            scale=self.scale,
            num_landmarks=self.num_landmarks,
            dropout=self.attn_drop if self.training else 0.0,
        )
        out = out.transpose(1, 2).reshape(b, n, c)  # (B, N, C)
        return self.proj_drop(self.proj(out))
