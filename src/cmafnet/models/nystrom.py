"""Attention kernels: exact (SDPA) and Nystrom (landmark) softmax attention, plus a self-attention layer.

The kernels take per-head tensors ``q, k, v`` of shape ``(B, heads, N, d_h)`` and a ``scale`` that
multiplies the logits (``1/sqrt(d_h)`` for the standard softmax attention), and return
``(B, heads, N_q, d_h)``. ``ATTENTION`` names them for configs (``contextual.attention``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmafnet.registry import Registry

AttentionKernel = Callable[..., Tensor]
ATTENTION: Registry[AttentionKernel] = Registry("attention")
PINV_METHODS = ("iterative", "exact")


@ATTENTION.register("full")
def full_attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, dropout: float = 0.0, **_: object
) -> Tensor:
    """Exact softmax attention through ``F.scaled_dot_product_attention`` (flash / efficient kernels)."""
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale)


def iterative_pinv(a: Tensor, iters: int = 6) -> Tensor:
    """Moore-Penrose pseudo-inverse of ``(..., m, n)`` matrices by Nystromformer's iteration.

    Xiong et al. 2021 (after Razavi et al. 2014): ``Z_0 = A^T / (||A||_1 ||A||_inf)``, then
    ``Z_{j+1} = Z_j (13 I - A Z_j (15 I - A Z_j (7 I - A Z_j))) / 4``. The residual ``R = I - A Z``
    obeys ``R_{j+1} = R_j^3 (3 I + R_j) / 4``, so convergence is cubic once ``||R|| < 1``; ``Z_0``
    makes ``||R_0||_2 = 1 - sigma_min^2 / (||A||_1 ||A||_inf) < 1`` for a full-rank ``A``.
    Singular values too small to converge in ``iters`` steps are damped rather than inverted, which
    is what makes the iteration stable on ill-conditioned landmark kernels (the exact inverse
    amplifies them).

    The norms are taken per matrix, as the formula says (Nystromformer's "exact" coefficient), not
    over the whole batch as some implementations do: a sample's result then does not depend on the
    other samples of its batch. Runs in at least float32 with autocast off, whatever the input.

    Args:
        a: matrices, batched over the leading dimensions.
        iters: iterations (6 in Nystromformer).

    Returns:
        ``(..., n, m)`` approximate pseudo-inverses, float32 (float64 for a float64 input).
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    dtype = torch.promote_types(a.dtype, torch.float32)
    with torch.autocast(device_type=a.device.type, enabled=False):
        a = a.to(dtype)
        abs_a = a.abs()
        norm_1 = abs_a.sum(dim=-2).amax(dim=-1)  # max column sum, (...)
        norm_inf = abs_a.sum(dim=-1).amax(dim=-1)  # max row sum, (...)
        denom = (norm_1 * norm_inf).clamp_min(torch.finfo(dtype).tiny)  # a zero matrix stays zero
        z = a.mT / denom[..., None, None]  # (..., n, m)
        eye = torch.eye(a.shape[-2], dtype=dtype, device=a.device)  # (m, m)
        for _ in range(iters):
            az = a @ z  # (..., m, m)
            z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def _landmarks(x: Tensor, m: int) -> Tensor:
    """Segment means of the token axis: ``(B, h, N, d) -> (B, h, m, d)`` (uneven segments when m does
    not divide N; the identity when ``m == N``)."""
    b, h, n, d = x.shape
    # (B*h, d, N) -> pool over tokens -> (B*h, d, m) -> (B, h, m, d)
    pooled = F.adaptive_avg_pool1d(x.reshape(b * h, n, d).transpose(1, 2), m)
    return pooled.transpose(1, 2).reshape(b, h, m, d)


def nystrom_approximation(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float,
    num_landmarks: int,
    pinv: str = "iterative",
    pinv_iters: int = 6,
    dropout: float = 0.0,
) -> Tensor:
    """The Nystrom formula itself, for any landmark count (no shortcut to exact attention).

    ``softmax(QK^T) V ~= softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T) V`` with landmarks
    ``Q~, K~`` the segment means of the queries and keys; ``num_landmarks`` is clamped to the token
    counts. With ``m == N`` and the exact pseudo-inverse this is exact attention. Computed in
    float32 (float64 for float64 inputs) with autocast off: neither pseudo-inverse is stable in
    half precision. Returns the input dtype.
    """
    if pinv not in PINV_METHODS:
        raise ValueError(f"pinv must be one of {PINV_METHODS}, got {pinv!r}")
    m = min(num_landmarks, q.shape[-2], k.shape[-2])
    dtype = q.dtype
    compute = torch.promote_types(dtype, torch.float32)
    with torch.autocast(device_type=q.device.type, enabled=False):
        # Split the logit scale over q and k so that every q k^T product below carries it once.
        s = scale**0.5
        q, k, v = q.to(compute) * s, k.to(compute) * s, v.to(compute)
        q_l, k_l = _landmarks(q, m), _landmarks(k, m)
        f1 = torch.softmax(q @ k_l.transpose(-2, -1), dim=-1)  # (B, h, N_q, m)
        a = torch.softmax(q_l @ k_l.transpose(-2, -1), dim=-1)  # (B, h, m, m)
        f3 = torch.softmax(q_l @ k.transpose(-2, -1), dim=-1)  # (B, h, m, N_k)
        if dropout > 0:
            f1 = F.dropout(f1, p=dropout, training=True)
        a_inv = torch.linalg.pinv(a) if pinv == "exact" else iterative_pinv(a, pinv_iters)  # (B, h, m, m)
        out = f1 @ (a_inv @ (f3 @ v))  # (B, h, N_q, d_h)
    return out.to(dtype)


@ATTENTION.register("nystrom")
def nystrom_attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, num_landmarks: int = 16, dropout: float = 0.0, **kw: Any
) -> Tensor:
    """Nystrom approximation of softmax attention (Xiong et al., AAAI 2021, "Nystromformer").

    Cost O(N m) instead of O(N^2) for ``m = num_landmarks``, plus O(m^3) per pseudo-inverse
    iteration. ``pinv`` chooses the pseudo-inverse of the ``(m, m)`` landmark kernel: ``iterative``
    (:func:`iterative_pinv`, ``pinv_iters`` steps, the paper's method) or ``exact``
    (``torch.linalg.pinv``). When the landmarks would be the tokens themselves
    (``num_landmarks >= N``) the formula is exact attention, which is then computed directly
    (as Nystromformer's reference code does); see :func:`nystrom_approximation` for the formula (``kw``:
    its ``pinv`` and ``pinv_iters``).
    """
    if num_landmarks >= q.shape[-2] and num_landmarks >= k.shape[-2]:
        return full_attention(q, k, v, scale=scale, dropout=dropout)
    return nystrom_approximation(q, k, v, scale=scale, num_landmarks=num_landmarks, dropout=dropout, **kw)


class SelfAttention(nn.Module):
    """Multi-head self-attention with timm's parameter layout (``qkv``, ``proj``).

    Same names and maths as ``timm.models.vision_transformer.Attention`` so timm MobileViT weights
    load unchanged; the kernel is chosen by name from ``ATTENTION``. ``num_landmarks``, ``pinv`` and
    ``pinv_iters`` are passed to the kernel (the Nystrom one reads them).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        kind: str = "full",
        num_landmarks: int = 16,
        pinv: str = "iterative",
        pinv_iters: int = 6,
        attn_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide dim ({dim})")
        if pinv not in PINV_METHODS:
            raise ValueError(f"pinv must be one of {PINV_METHODS}, got {pinv!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.kind = kind
        self.kernel = ATTENTION.get(kind)
        self.num_landmarks = num_landmarks
        self.pinv = pinv
        self.pinv_iters = pinv_iters
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x: Tensor, **_: object) -> Tensor:  # timm's Block passes attn_mask=None, is_causal
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
            pinv=self.pinv,
            pinv_iters=self.pinv_iters,
            dropout=self.attn_drop if self.training else 0.0,
        )
        out = out.transpose(1, 2).reshape(b, n, c)  # (B, N, C)
        return self.proj_drop(self.proj(out))
