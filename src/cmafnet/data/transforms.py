"""Device-side preprocessing: uint8 batch from the loader -> normalised float batch for a model.

``uint8 (B, 3, h, w)`` -> float [0, 255] -> Macenko (``data.stain.enabled``) -> [0, 1] ->
augmentation (training only, ``data.augment``) -> resize to ``img_size`` (bicubic by default,
50 -> 224 for IDC) -> clamp to [0, 1] (bicubic overshoots) -> ``(x - mean) / std``.

``data.mean`` / ``data.std`` are filled from the model's weights when training starts
(:func:`cmafnet.models.pretrained.resolve_normalization`) and stored in the run's config; a config
that leaves them unset here normalises as a model without pretrained weights (ImageNet, timm's
constants).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cmafnet.config import DataConfig
from cmafnet.data.augment import build_augment
from cmafnet.data.stain import MacenkoNormalizer, build_normalizer


def input_normalization(data_cfg: DataConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``(mean, std)`` of the config, timm's ImageNet defaults where unset."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    mean = data_cfg.mean if data_cfg.mean is not None else IMAGENET_DEFAULT_MEAN
    std = data_cfg.std if data_cfg.std is not None else IMAGENET_DEFAULT_STD
    return tuple(mean), tuple(std)


class GPUPreprocess(nn.Module):
    """Preprocessing as a module so it moves with ``.to(device)`` and runs on the batch's device.

    Args:
        img_size: the model's input size.
        train: apply augmentation.
        stain_reference: a saved :meth:`MacenkoNormalizer.to_dict` (e.g. from ``run.json``) to
            reuse instead of fitting/choosing the reference again.
    """

    def __init__(
        self,
        data_cfg: DataConfig,
        img_size: int,
        train: bool,
        *,
        stain_reference: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.img_size, self.interpolation = int(img_size), data_cfg.interpolation
        self.stain: MacenkoNormalizer | None = None
        if data_cfg.stain.enabled:
            s = data_cfg.stain
            self.stain = (
                MacenkoNormalizer.from_dict(stain_reference)
                if stain_reference
                else build_normalizer(s.Io, s.alpha, s.beta, s.reference)
            )
        self.augment = build_augment(data_cfg.augment) if train else nn.Sequential()
        mean, std = input_normalization(data_cfg)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def stain_reference(self) -> dict[str, Any] | None:
        """The Macenko reference in use (for ``run.json``), or None when stain is disabled."""
        return self.stain.to_dict() if self.stain is not None else None

    @property
    def last_fallback(self) -> torch.Tensor | None:
        """(B,) bool: images of the last batch left unnormalised (too little tissue)."""
        return self.stain.last_fallback if self.stain is not None else None

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W), got {tuple(x.shape)}")
        # float32 throughout, even when called inside a bf16/fp16 autocast region (eigh, log/exp)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            if self.stain is not None:
                x = self.stain(x)
            x = x / 255.0
            if len(self.augment):
                x = self.augment(x).clamp(0, 1)
            if x.shape[-2:] != (self.img_size, self.img_size):
                down = x.shape[-1] > self.img_size or x.shape[-2] > self.img_size
                x = F.interpolate(
                    x,
                    size=(self.img_size, self.img_size),
                    mode=self.interpolation,
                    align_corners=False,
                    antialias=down,
                ).clamp(0, 1)
            return (x - self.mean) / self.std
