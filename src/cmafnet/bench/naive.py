"""The naive dual-branch reference that `cmafnet bench` compares CMAF-Net against.

It restates the "dual_proxy" model of the H200 anchor measurement (docs/performance.md): a timm
ResNet-18 and a timm MobileViT used as plain ``features_only`` extractors, both last feature maps
projected to the fusion width with 1x1 convolutions, one multi-head cross-attention (queries from
the CNN tokens, keys/values from the MobileViT tokens, per-head temperatures dividing the queries),
a sigmoid gate over ``[F_att; F_s]`` and a linear head on the average-pooled fused map.

It is deliberately "naive": no skip merge, no spatial gate, no bottleneck, no positional
embeddings, no regulariser outputs and no optimisation beyond what timm and SDPA give. It exists
only to put CMAF-Net's speed on a scale that was measured independently.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# timm names of the contextual branch by MobileViT variant (same names as the model config).
MOBILEVIT_NAMES = {"xxs": "mobilevit_xxs", "xs": "mobilevit_xs", "s": "mobilevit_s"}


class NaiveDualBranch(nn.Module):
    """ResNet-18 + MobileViT + one multi-head cross-attention + gate (the anchors' ``dual_proxy``), randomly
    initialised: the bench measures speed, not accuracy.

    Args:
        variant: MobileViT variant of the contextual branch (``"s"`` is the anchor's model).
        dim: fusion width D (480 in the anchor and the paper).
        heads: attention heads (8 in the anchor; ``dim`` must be divisible by it).
        num_classes: classifier outputs.
        materialize_attention: compute ``softmax(QK^T) V`` explicitly instead of through
            ``F.scaled_dot_product_attention``; used by the bench to show what keeping the attention
            maps costs (the anchor uses SDPA).
    """

    def __init__(
        self,
        variant: str = "s",
        *,
        dim: int = 480,
        heads: int = 8,
        num_classes: int = 2,
        materialize_attention: bool = False,
    ) -> None:
        super().__init__()
        if variant not in MOBILEVIT_NAMES:
            raise ValueError(f"unknown MobileViT variant '{variant}' (choose from {sorted(MOBILEVIT_NAMES)})")
        if dim % heads:
            raise ValueError(f"heads ({heads}) must divide dim ({dim})")
        self.heads, self.head_dim, self.dim = heads, dim // heads, dim
        self.materialize_attention = materialize_attention
        self.spatial = timm.create_model("resnet18", features_only=True, out_indices=(4,))
        self.contextual = timm.create_model(MOBILEVIT_NAMES[variant], features_only=True, out_indices=(4,))
        c_s = self.spatial.feature_info.channels()[-1]
        c_t = self.contextual.feature_info.channels()[-1]
        self.proj_s = nn.Conv2d(c_s, dim, 1)
        self.proj_t = nn.Conv2d(c_t, dim, 1)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        self.tau = nn.Parameter(torch.ones(heads))  # the anchor learns tau directly (no log)
        self.gate = nn.Conv2d(2 * dim, dim, 1)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        f_s = self.proj_s(self.spatial(x)[-1])  # (B, D, h, w)
        f_t = self.proj_t(self.contextual(x)[-1])  # (B, D, h, w)
        b, d, h, w = f_s.shape
        s = f_s.flatten(2).transpose(1, 2)  # (B, N_s, D)
        t = f_t.flatten(2).transpose(1, 2)  # (B, N_t, D)
        # (B, heads, N_s, d_h); the temperature divides the queries, as in the anchor
        q = self.q(s).view(b, -1, self.heads, self.head_dim).transpose(1, 2) / self.tau.view(1, -1, 1, 1)
        k, v = (
            self.kv(t).view(b, -1, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        )  # 2 x (B, H, N_t, d_h)
        if self.materialize_attention:
            attn = torch.softmax(q @ k.transpose(-2, -1) * self.head_dim**-0.5, dim=-1)  # (B, H, N_s, N_t)
            a = attn @ v
        else:
            a = F.scaled_dot_product_attention(q, k, v)  # (B, H, N_s, d_h)
        a = self.out(a.transpose(1, 2).reshape(b, -1, d))  # (B, N_s, D)
        f_att = a.transpose(1, 2).reshape(b, d, h, w)
        g = torch.sigmoid(self.gate(torch.cat([f_att, f_s], 1)))
        fused = g * f_att + (1 - g) * f_s
        return self.head(fused.mean((2, 3)))
