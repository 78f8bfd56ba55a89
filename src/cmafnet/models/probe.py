"""``probe``: a frozen pretrained backbone read by a linear or k-nearest-neighbour head.

The baseline the field asks for beside a new classifier (kaiko-ai/eva's protocol; docs/foundation.md).
The model follows the model contract, so the trainer, ``evaluate``, ``predict``, ``wsi`` and the
experiments treat it as any other model. ``forward`` takes images ``(B, 3, S, S)`` or, when the trainer
feeds cached embeddings (:mod:`cmafnet.data.features`), embeddings ``(B, D)``.

The backbone is frozen and never trained, so it is not part of the state dict: a run's weights file
holds the head (a linear layer, or the kNN head's memory), and the backbone is rebuilt from
``model.probe`` whenever the run's model is, its content hash checked against the one the run
recorded (``model.probe.fingerprint``). A ViT-g run folder is then megabytes, not 4.5 GB per seed
and checkpoint.

Physical scale: with ``match_scale`` the input (which shows ``input_mpp`` µm/px) is resampled to the
backbone's ``native_mpp`` and cut into ``img_size`` tiles whose embeddings are averaged, inside the
model, so every path that feeds it images (training, evaluate, predict, wsi) sees the same scale.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmafnet.config import KNNConfig, ModelConfig
from cmafnet.errors import ConfigError
from cmafnet.models import MODELS
from cmafnet.models.baselines import ClassifierMixin
from cmafnet.models.foundation import (
    build_backbone,
    embed,
    embedding_dim,
    resolve_backbone,
    weights_fingerprint,
)

_BACKBONE_KEY = re.compile(r"(^|\.)backbone\.")


class KNNHead(nn.Module):
    """k-nearest-neighbour classification over a memory of embeddings (no parameters, no gradient steps).

    Semantics of scikit-learn's ``KNeighborsClassifier`` (brute force): the ``k`` nearest memory
    entries vote, uniformly or by inverse distance (an exact match takes all the weight); ``cosine``
    distance is ``1 - cos``. The output is ``log`` of the vote shares (floored at 1e-6), so softmax
    gives the shares back and the calibration and metrics downstream treat it as logits.
    """

    def __init__(self, num_features: int, num_classes: int, cfg: KNNConfig) -> None:
        super().__init__()
        self.num_classes, self.k, self.metric, self.weights = num_classes, cfg.k, cfg.metric, cfg.weights
        self.register_buffer("bank", torch.zeros(0, num_features))  # (N, D) memory
        self.register_buffer("bank_labels", torch.zeros(0, dtype=torch.long))  # (N,)

    def fit(self, z: Tensor, y: Tensor) -> None:
        """Remember the embeddings ``z`` (N, D) with labels ``y`` (N,)."""
        if len(z) < self.k:
            raise ConfigError(
                f"model.probe.knn.k: {self.k} neighbours, but only {len(z)} training embeddings"
            )
        z = z.float()
        self.bank = (F.normalize(z, dim=1) if self.metric == "cosine" else z).to(self.bank.device)
        self.bank_labels = y.long().to(self.bank.device)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        for name in ("bank", "bank_labels"):  # the memory's size is the trained run's, not the empty one's
            if prefix + name in state_dict:
                stored = state_dict[prefix + name]
                setattr(self, name, torch.empty_like(stored, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, z: Tensor) -> Tensor:
        if len(self.bank) == 0:
            raise ConfigError("model.probe.head=knn: the kNN memory is empty (the probe was not trained)")
        z = z.float()
        if self.metric == "cosine":
            dist = 1.0 - F.normalize(z, dim=1) @ self.bank.t()  # (B, N)
        else:
            # (B, N), exact 0 for a match
            dist = torch.cdist(z, self.bank, compute_mode="donot_use_mm_for_euclid_dist")
        d, idx = dist.topk(self.k, dim=1, largest=False)  # (B, k) nearest first
        if self.weights == "distance":
            exact = d <= 0
            w = torch.where(exact.any(1, keepdim=True), exact.float(), 1.0 / d.clamp_min(1e-12))
        else:
            w = torch.ones_like(d)
        votes = torch.zeros(len(z), self.num_classes, device=z.device).scatter_add_(
            1, self.bank_labels[idx], w
        )
        return torch.log((votes / votes.sum(1, keepdim=True)).clamp_min(1e-6))  # (B, C)


def tile_starts(length: int, tile: int) -> list[int]:
    """Start offsets of the fewest ``tile``-long windows covering ``length``, spread evenly (as
    :func:`cmafnet.inference.resampling.tile_origins`, which models may not import)."""
    if length <= tile:
        return [0]
    n = math.ceil(length / tile)
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


@MODELS.register("probe")
class ProbeModel(ClassifierMixin, nn.Module):
    """Frozen backbone -> embedding (B, D) -> linear (or cosine) classifier or kNN head."""

    roles = {"head": ("head",)}  # the backbone is in no role: never trained

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        probe = cfg.probe
        if cfg.weights:
            raise ConfigError("model.weights: a probe's frozen weights go to model.probe.backbone")
        if probe.head == "knn" and not probe.cache:
            raise ConfigError(
                "model.probe.head=knn is fit from cached embeddings: set model.probe.cache=true"
            )
        self.spec = resolve_backbone(probe, cfg.img_size)
        if probe.match_scale and self.spec.native_mpp is None:
            raise ConfigError(
                "model.probe.match_scale: the backbone's native scale is unknown; set model.probe.native_mpp"
            )
        self.match_scale = probe.match_scale
        self.backbone = build_backbone(self.spec).requires_grad_(False)
        self.fingerprint = weights_fingerprint(self.backbone)
        if probe.fingerprint is not None and probe.fingerprint != self.fingerprint:
            raise ConfigError(
                f"model.probe.fingerprint: the backbone {self.spec.weights} now has weights {self.fingerprint}, "
                f"but this model was trained on {probe.fingerprint} (a new revision on the Hub, or another file)"
            )
        self.embedding = self.spec.embedding
        self.head_kind, self.knn_cfg = probe.head, probe.knn
        self._init_head(cfg, embedding_dim(self.backbone, self.embedding))
        self.set_input_mpp(probe.input_mpp)
        # the frozen backbone is rebuilt from model.probe, not saved with the head (module docstring)
        self.register_state_dict_post_hook(_without_backbone)
        self.register_load_state_dict_post_hook(_backbone_not_missing)

    def _make_head(self, num_classes: int) -> nn.Module:
        if self.head_kind == "knn":
            return KNNHead(self.num_features, num_classes, self.knn_cfg)
        return super()._make_head(num_classes)

    def set_input_mpp(self, mpp: float | None) -> None:
        """The µm/px the model's input shows; with ``match_scale`` inputs are resampled to the native scale."""
        self.input_mpp = mpp
        native = self.spec.native_mpp
        self.zoom = mpp / native if self.match_scale and mpp and native else 1.0

    def train(self, mode: bool = True) -> ProbeModel:
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout, fixed statistics
        return self

    def tiles(self, x: Tensor) -> Tensor:
        """``x`` (B, 3, S, S) at the native scale: resampled by ``zoom`` and cut into (B, T, 3, S, S) tiles.

        Smaller than one tile, the image is padded with zeros (the normalisation's mean colour).
        """
        s = x.shape[-1]
        side = max(1, round(s * self.zoom))
        mode = "bicubic" if side > s else "area"
        x = F.interpolate(x, size=(side, side), mode=mode, **({"align_corners": False} if side > s else {}))
        if side < s:
            x = F.pad(x, (0, s - side, 0, s - side))
        starts = tile_starts(max(side, s), s)
        return torch.stack([x[..., i : i + s, j : j + s] for i in starts for j in starts], 1)

    @torch.no_grad()
    def embed_images(self, x: Tensor) -> Tensor:
        """The embedding (B, D) of an image batch (B, 3, S, S) (tiles averaged under ``match_scale``)."""
        if self.zoom == 1.0:
            return embed(self.backbone, x, self.embedding)
        t = self.tiles(x)  # (B, T, 3, S, S)
        z = embed(self.backbone, t.flatten(0, 1), self.embedding)  # (B*T, D)
        return z.view(t.shape[0], t.shape[1], -1).mean(1)

    def forward_features(self, x: Tensor) -> Tensor:
        """The embedding (B, D): of images (B, 3, S, S), or ``x`` itself when it is one already."""
        return x if x.ndim == 2 else self.embed_images(x)


def _without_backbone(module: nn.Module, state_dict: dict, prefix: str, _local_metadata: dict) -> None:
    for k in [k for k in state_dict if k.startswith(prefix + "backbone.")]:
        del state_dict[k]


def _backbone_not_missing(module: nn.Module, incompatible: object) -> None:
    missing = incompatible.missing_keys  # type: ignore[attr-defined]
    missing[:] = [k for k in missing if not _BACKBONE_KEY.search(k)]
