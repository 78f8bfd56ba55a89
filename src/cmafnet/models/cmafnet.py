"""CMAF-Net (paper §4): ResNet-18 + MobileViT fused by cross-modal attention, as one config-driven model.

Data flow (B = batch, D = ``fusion.dim``, h x w = final grid, 7 x 7 at 224 px)::

    x (B,3,S,S) -> SpatialBranch  -> (B,512,h,w) -> 1x1 conv+BN -> (B,D,h,w) -> bottleneck -> F_s
               \\-> MobileViT     -> (B,C_t,h,w) -> 1x1 conv+BN -> (B,D,h,w) -> bottleneck -> F_t
    FUSIONS[fusion.kind](F_s, F_t) -> F_fused (B,D,h,w) -> global avg pool -> head -> logits

Every Table 6 architecture ablation is a config switch: ``spatial.enabled=False`` (ViT only: the
fused map is F_t), ``contextual.enabled=False`` (CNN only: F_s), ``fusion.kind=concat``,
``fusion.learn_temperature=False``, ``fusion.heads=1``, ``fusion.gate=False``.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import Tensor, nn

from cmafnet.config import ModelConfig
from cmafnet.models import MODELS
from cmafnet.models.baselines import make_classifier
from cmafnet.models.bottleneck import VariationalBottleneck
from cmafnet.models.fusion import FUSIONS
from cmafnet.models.mobilevit import MobileViT
from cmafnet.models.output import ModelOutput
from cmafnet.models.spatial import SpatialBranch
from cmafnet.models.weights import load_branch_weights, load_model_weights

ROLES = ("spatial", "contextual", "fusion", "head", "aux_heads")


def _projection(in_ch: int, dim: int) -> nn.Sequential:
    """1x1 conv + BN to the fusion width (BN puts both branches on one scale before attention)."""
    return nn.Sequential(nn.Conv2d(in_ch, dim, kernel_size=1, bias=False), nn.BatchNorm2d(dim))


@MODELS.register("cmafnet")
class CMAFNet(nn.Module):
    """CMAF-Net following the package model contract (``docs/architecture.md``).

    Attributes:
        img_size: the input side the model (and its learned positional embeddings) is built for.
        num_classes: number of output logits.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.img_size = cfg.img_size
        self.num_classes = cfg.num_classes
        d = cfg.fusion.dim
        self.num_features = d
        sp, ct = cfg.spatial, cfg.contextual

        self.spatial = SpatialBranch(sp, cfg.drop_path) if sp.enabled else None
        self.contextual = MobileViT(ct, cfg.img_size, cfg.drop_path) if ct.enabled else None

        # Role "fusion": projections, bottlenecks and the fusion block (trained in stage 2).
        self.proj_s = _projection(self.spatial.num_features, d) if self.spatial is not None else None
        self.proj_t = _projection(self.contextual.num_features, d) if self.contextual is not None else None
        vib = cfg.bottleneck
        self.bottleneck_s = VariationalBottleneck(d) if vib and self.spatial is not None else None
        self.bottleneck_t = VariationalBottleneck(d) if vib and self.contextual is not None else None
        both = self.spatial is not None and self.contextual is not None
        self.fusion = FUSIONS.get(cfg.fusion.kind)(cfg.fusion) if both else None

        h = cfg.head  # (B, D) -> (B, C): optional hidden layer (Linear, GELU), dropout, final (cosine) layer
        hidden = nn.Sequential(nn.Linear(d, h.hidden), nn.GELU()) if h.hidden else nn.Identity()
        fc = make_classifier(h.hidden or d, cfg.num_classes, h.normalized)
        self.head = nn.Sequential(OrderedDict(hidden=hidden, drop=nn.Dropout(h.dropout), fc=fc))
        # Stage-1 temporary heads on each branch's own pooled features.
        branches = {"spatial": self.spatial, "contextual": self.contextual}
        self.aux_heads = nn.ModuleDict(
            {k: nn.Linear(b.num_features, cfg.num_classes) for k, b in branches.items() if b is not None}
        )

        # Fixed by the config (e.g. tau without temperature learning), recorded before any stage
        # freezing so that later requires_grad changes by the trainer do not alter it.
        self._config_frozen = frozenset(n for n, p in self.named_parameters() if not p.requires_grad)
        if cfg.grad_checkpointing:
            self.set_grad_checkpointing(True)
        for role, branch in branches.items():
            if branch is not None and getattr(cfg, role).weights:
                load_branch_weights(branch, getattr(cfg, role).weights, role)
        if cfg.weights:
            load_model_weights(self, cfg.weights)

    # ------------------------------------------------------------------------------ contract
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute branch activations in backward (trades compute for memory)."""
        for branch in (self.spatial, self.contextual):
            if branch is not None:
                branch.grad_checkpointing = enable  # in training mode with grad enabled only

    def frozen_parameter_names(self) -> set[str]:
        """Parameters fixed by the config (e.g. tau without temperature learning); never trained."""
        return set(self._config_frozen)

    def param_groups_by_role(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by role: spatial, contextual, fusion, head, aux_heads.

        Parameters frozen by the config (:meth:`frozen_parameter_names`) are left out, so stage
        freezing and unfreezing cannot switch them on.
        """
        groups: dict[str, list[nn.Parameter]] = {r: [] for r in ROLES}
        frozen = self.frozen_parameter_names()
        for name, p in self.named_parameters():
            if name in frozen:
                continue
            top = name.split(".", 1)[0]
            role = top if top in ROLES else "fusion"  # proj_*, bottleneck_* and fusion
            groups[role].append(p)
        return groups

    def reset_classifier(self, num_classes: int) -> None:
        """New final layer (and aux heads) for ``num_classes`` outputs."""
        self.num_classes = num_classes
        in_features, device = self.head.fc.weight.shape[1], self.head.fc.weight.device
        self.head.fc = make_classifier(in_features, num_classes, self.cfg.head.normalized).to(device)
        for name, lin in list(self.aux_heads.items()):
            self.aux_heads[name] = nn.Linear(lin.in_features, num_classes).to(lin.weight.device)

    def _encode(self, x: Tensor, return_aux: bool) -> tuple[Tensor, dict[str, Any]]:
        """Branches, projections, bottlenecks and fusion: ``(B,3,S,S) -> F_fused (B,D,h,w)``, and the
        :class:`ModelOutput` fields they fill (complete with ``return_aux``)."""
        aux: dict[str, Any] = {"aux_logits": {}}
        maps: dict[str, Tensor] = {}
        for name, key, branch, proj, vib in (
            ("s", "spatial", self.spatial, self.proj_s, self.bottleneck_s),
            ("t", "contextual", self.contextual, self.proj_t, self.bottleneck_t),
        ):
            if branch is None:
                continue
            raw = branch(x)  # (B, C_branch, h, w)
            if return_aux:
                aux["aux_logits"][key] = self.aux_heads[key](raw.mean(dim=(2, 3)))
            f = proj(raw)  # (B, D, h, w)
            if vib is not None:
                b, d, h, w = f.shape
                tokens = f.flatten(2).transpose(1, 2)  # (B, N, D)
                z, aux[f"mu_{name}"], aux[f"logvar_{name}"] = vib(tokens, need_stats=return_aux)
                f = z.transpose(1, 2).reshape(b, d, h, w)
            if return_aux:
                aux[f"z_{name}"] = f.mean(dim=(2, 3))  # (B, D) pooled bottleneck sample
            aux[f"f_{name}"] = maps[name] = f
        if self.fusion is None:
            fused = maps.get("s", maps.get("t"))
        else:
            fused, fusion_aux = self.fusion(maps["s"], maps["t"], return_aux=return_aux)
            aux.update(fusion_aux)
        return fused, aux

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, 3, S, S) -> F_fused (B, D, h, w)``."""
        return self._encode(x, return_aux=False)[0]

    def forward_head(self, feats: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool ``(B, D, h, w)`` and classify; ``pre_logits=True`` returns the pooled ``(B, D)``."""
        pooled = feats.mean(dim=(2, 3))
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: Tensor, return_aux: bool = False) -> Tensor | ModelOutput:
        """Logits ``(B, C)``, or with ``return_aux`` the full :class:`ModelOutput`."""
        if not return_aux:
            return self.forward_head(self.forward_features(x))
        fused, aux = self._encode(x, return_aux=True)
        pooled = self.forward_head(fused, pre_logits=True)
        return ModelOutput(logits=self.head(pooled), pre_logits=pooled, f_fused=fused, **aux)
