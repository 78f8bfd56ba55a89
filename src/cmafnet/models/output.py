"""The structured model output shared by the model, the objective, the monitors and explanations."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from torch import Tensor


@dataclass
class ModelOutput:
    """What ``model(x, return_aux=True)`` returns. Absent parts are ``None``.

    Shapes use B = batch, D = fusion width, h x w = fusion grid, N = h*w tokens, H = heads.
    """

    logits: Tensor  # (B, num_classes)
    pre_logits: Tensor | None = None  # (B, D) pooled fused features before the FC head
    f_s: Tensor | None = None  # (B, D, h, w) projected spatial features (query side)
    f_t: Tensor | None = None  # (B, D, h, w) projected contextual features (key/value side)
    f_att: Tensor | None = None  # (B, D, h, w) attended features
    f_fused: Tensor | None = None  # (B, D, h, w)
    attn: Tensor | None = None  # (B, H, N_s, N_t) per-head attention maps
    tau: Tensor | None = None  # (H,) positive temperatures
    gate: Tensor | None = None  # (B, D, h, w) gate values in (0, 1)
    mu_s: Tensor | None = None  # (B, N, D) bottleneck means / log-variances per branch
    logvar_s: Tensor | None = None
    mu_t: Tensor | None = None
    logvar_t: Tensor | None = None
    z_s: Tensor | None = None  # (B, D) pooled bottleneck samples used for the redundancy estimate
    z_t: Tensor | None = None
    aux_logits: dict[str, Tensor] = field(default_factory=dict)  # stage-1 branch heads by branch name

    def detached(self) -> ModelOutput:
        """A copy with every tensor detached (for monitors)."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        kw = {k: v.detach() for k, v in tensors.items() if isinstance(v, Tensor)}
        return replace(self, **kw, aux_logits={k: t.detach() for k, t in self.aux_logits.items()})
