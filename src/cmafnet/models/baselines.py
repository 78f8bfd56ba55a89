"""Single-backbone baselines of the paper (Tables 1, 2, 8) behind the common model contract.

Each baseline is a timm backbone created with ``num_classes=0`` (so timm's own pooling and
pre-logits normalisation are kept) and our own classifier on top, so that the head can be a cosine
classifier (``cfg.head.normalized``) for LDAM and so that ``param_groups_by_role`` separates the
backbone (``spatial``) from the classifier (``head``). Imbalance-aware baselines (focal, CB,
LDAM-DRW, Balanced Softmax) are the same models with another ``loss.name``: configs, not classes.

The reconstructed fusion baselines (TransFuse, MMTM, HRFNet) live in
:mod:`cmafnet.models.fusion_baselines`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmafnet.config import ModelConfig
from cmafnet.errors import ConfigError
from cmafnet.models import MODELS
from cmafnet.models.output import ModelOutput
from cmafnet.models.weights import load_model_weights

# Short registry names -> timm architectures (paper Table 1 rows: ResNet-18, ResNet-50, DenseNet-121,
# EfficientNet-B3, ConvNeXt-T, ViT-S/16, Swin-T, DeiT-S).
BASELINES: dict[str, str] = {
    "resnet18": "resnet18",
    "resnet50": "resnet50",
    "densenet121": "densenet121",
    "efficientnet_b3": "efficientnet_b3",
    "convnext_tiny": "convnext_tiny",
    "vit_s16": "vit_small_patch16_224",
    "swin_t": "swin_tiny_patch4_window7_224",
    "deit_s": "deit_small_patch16_224",
}


class CosineClassifier(nn.Module):
    """Normalised linear layer (LDAM's ``NormedLinear``): logits are cosine similarities in [-1, 1].

    LDAM (Cao et al., 2019) multiplies these by its scale ``s`` inside the loss.
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=1).t()  # (B, C)


def make_classifier(in_features: int, num_classes: int, normalized: bool) -> nn.Module:
    """A linear or cosine classifier."""
    return CosineClassifier(in_features, num_classes) if normalized else nn.Linear(in_features, num_classes)


def require_multiple_of_32(cfg: ModelConfig, name: str) -> None:
    if cfg.img_size % 32:
        raise ConfigError(f"model.img_size: {name} needs a multiple of 32 (got {cfg.img_size})")


def timm_kwargs(timm_name: str, cfg: ModelConfig) -> dict[str, Any]:
    """Keyword arguments for ``timm.create_model`` for this config (no pretrained download, ever)."""
    kw: dict[str, Any] = {"pretrained": False, "num_classes": 0}
    if "_patch" in timm_name:  # ViT / DeiT / Swin: the position grid depends on the input size
        kw["img_size"] = cfg.img_size
        if timm_name.startswith("swin"):
            # Swin needs the patch grid (img/4) to be divisible by the window at every stage; the
            # 224-px window of 7 does not divide small grids, so small inputs use window img/32
            # (7 at 224 px, 2 at 64 px). Recorded in docs/decisions/experiments.md.
            require_multiple_of_32(cfg, "Swin")
            kw["window_size"] = cfg.img_size // 32
    if cfg.drop_path > 0:
        kw["drop_path_rate"] = cfg.drop_path
    return kw


class ClassifierMixin:
    """The model contract around a pooled ``(B, D)`` feature: dropout, a linear / cosine classifier,
    ``forward``, ``forward_head``, ``reset_classifier`` and ``param_groups_by_role`` (by ``roles``:
    role -> the attributes whose parameters it trains)."""

    roles: dict[str, tuple[str, ...]]

    def _init_head(
        self, cfg: ModelConfig, num_features: int, backbone_attr: str = "cnn", **timm_kw: Any
    ) -> None:
        """The classifier, then ``model.weights`` (a name or backbone file goes to ``backbone_attr``)."""
        self.img_size = cfg.img_size
        self.num_classes = cfg.num_classes
        self.normalized = cfg.head.normalized
        self.num_features = num_features
        self.drop = nn.Dropout(cfg.head.dropout)
        self.head = self._make_head(cfg.num_classes)
        if cfg.weights:
            load_model_weights(self, cfg.weights, getattr(self, backbone_attr), **timm_kw)

    def _make_head(self, num_classes: int) -> nn.Module:
        return make_classifier(self.num_features, num_classes, self.normalized)

    def pool(self, feats: Tensor) -> Tensor:
        """``forward_features``' output as ``(B, D)``: already pooled unless overridden."""
        return feats

    def forward_head(self, feats: Tensor, pre_logits: bool = False) -> Tensor:
        z = self.pool(feats)
        return z if pre_logits else self.head(self.drop(z))

    def forward(self, x: Tensor, return_aux: bool = False) -> Tensor | ModelOutput:
        z = self.pool(self.forward_features(x))  # type: ignore[attr-defined]
        logits = self.head(self.drop(z))
        return ModelOutput(logits=logits, pre_logits=z) if return_aux else logits

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = self._make_head(num_classes)

    def param_groups_by_role(self) -> dict[str, list[nn.Parameter]]:
        return {
            role: [p for a in attrs for p in getattr(self, a).parameters()]
            for role, attrs in self.roles.items()
        }


class TimmClassifier(ClassifierMixin, nn.Module):
    """A timm backbone plus our (linear or cosine) classifier, following the model contract."""

    roles = {"spatial": ("backbone",), "head": ("head",)}

    def __init__(self, timm_name: str, cfg: ModelConfig) -> None:
        super().__init__()
        kw = timm_kwargs(timm_name, cfg)
        try:
            self.backbone = timm.create_model(timm_name, **kw)
        except (TypeError, ValueError, AssertionError, RuntimeError) as err:
            raise ConfigError(f"model: cannot build {timm_name} at img_size {cfg.img_size}: {err}") from None
        if cfg.grad_checkpointing:
            self.backbone.set_grad_checkpointing(True)
        self._init_head(cfg, self.backbone.num_features, "backbone", **kw)

    def forward_features(self, x: Tensor) -> Tensor:
        """Backbone feature map (CNN: (B, C, h, w); ViT: (B, N, C) tokens)."""
        return self.backbone.forward_features(x)

    def pool(self, feats: Tensor) -> Tensor:
        return self.backbone.forward_head(feats, pre_logits=True)  # timm's own pooling / norm, (B, D)


for _name, _timm_name in BASELINES.items():
    MODELS.add(_name, partial(TimmClassifier, _timm_name))
