"""Batched, device-side augmentation for H&E patches (every image gets its own parameters).

Steps (each switchable in ``cfg.data.augment``; a disabled step is not in the pipeline at all):
flips (horizontal and vertical, p=0.5 each), rotation (uniform in +-``rotation`` degrees,
reflection padding), elastic deformation, HED stain jitter (Tellez et al. 2018) and colour
jitter. Geometric steps come first, then the stain/colour steps. Kornia provides flips, rotation,
elastic deformation and colour jitter; HED jitter is written here (kornia has none).

Input and output: float ``(B, 3, H, W)`` in [0, 1] on any device.
"""

from __future__ import annotations

import math

import kornia.augmentation as K
import torch
from torch import nn

from cmafnet.config import AugmentConfig

# Ruifrok & Johnston's H&E-DAB stain vectors (rows: hematoxylin, eosin, DAB), as in skimage's
# rgb2hed; its inverse maps optical density to stain concentrations.
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)


class HEDJitter(nn.Module):
    """Tellez et al. 2018 HED stain augmentation: ``hed' = hed * a + b`` per image and channel.

    ``a ~ U(1 - sigma, 1 + sigma)``, ``b ~ U(-bias, bias)`` in OD units; optical density is
    natural-log based (a common factor that the matrix product carries through unchanged).
    """

    def __init__(self, sigma: float = 0.03, bias: float = 0.01) -> None:
        super().__init__()
        self.sigma, self.bias = float(sigma), float(bias)
        self.register_buffer("rgb_from_hed", RGB_FROM_HED.float(), persistent=False)
        self.register_buffer("hed_from_rgb", HED_FROM_RGB.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        a = 1 + (torch.rand(b, 1, 3, device=x.device) * 2 - 1) * self.sigma  # (B, 1, 3)
        bb = (torch.rand(b, 1, 3, device=x.device) * 2 - 1) * self.bias
        od = -torch.log(x.clamp_min(1e-6)).flatten(2).transpose(1, 2)  # (B, P, 3)
        hed = od @ self.hed_from_rgb  # (B, P, 3) stain concentrations
        od2 = (hed * a + bb) @ self.rgb_from_hed
        return torch.exp(-od2).transpose(1, 2).reshape(b, c, h, w).clamp(0, 1)


def _elastic(cfg: AugmentConfig) -> nn.Module:
    k = min(2 * math.ceil(3 * cfg.elastic_sigma) + 1, 63)
    return K.RandomElasticTransform(
        kernel_size=(k, k), sigma=(cfg.elastic_sigma, cfg.elastic_sigma), alpha=(cfg.elastic_alpha, cfg.elastic_alpha),
        padding_mode="reflection", p=1.0,
    )  # fmt: skip


def build_augment(cfg: AugmentConfig) -> nn.Sequential:
    """The enabled steps, in order; an empty ``nn.Sequential`` (identity) when all are off."""
    steps: list[nn.Module] = []
    if not cfg.enabled:
        return nn.Sequential()
    if cfg.flips:
        steps += [K.RandomHorizontalFlip(p=0.5), K.RandomVerticalFlip(p=0.5)]
    if cfg.rotation > 0:
        steps.append(K.RandomAffine(degrees=cfg.rotation, padding_mode="reflection", p=1.0))
    if cfg.elastic and cfg.elastic_alpha > 0:
        steps.append(_elastic(cfg))
    if cfg.hed and (cfg.hed_sigma > 0 or cfg.hed_bias > 0):
        steps.append(HEDJitter(cfg.hed_sigma, cfg.hed_bias))
    if cfg.color_jitter and any(v > 0 for v in (cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)):
        steps.append(
            K.ColorJitter(
                brightness=cfg.brightness,
                contrast=cfg.contrast,
                saturation=cfg.saturation,
                hue=cfg.hue,
                p=1.0,
            )
        )
    return nn.Sequential(*steps)
