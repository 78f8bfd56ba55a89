"""Augmentation: per-image random parameters, disabled steps are the identity, preprocessing shapes."""

from __future__ import annotations

import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from cmafnet.config import AugmentConfig, DataConfig
from cmafnet.data.augment import HEDJitter, build_augment
from cmafnet.data.transforms import GPUPreprocess

STEPS = ["flips", "rotation", "elastic", "hed", "color_jitter"]


def _only(step: str) -> AugmentConfig:
    off = {"flips": False, "rotation": 0.0, "elastic": False, "hed": False, "color_jitter": False}
    on = {"flips": True, "rotation": 30.0, "elastic": True, "hed": True, "color_jitter": True}
    return AugmentConfig(**{**off, step: on[step]})


def _pair() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 3, 32, 32, generator=g) * 0.6 + 0.2  # asymmetric texture
    return img.repeat(8, 1, 1, 1)  # eight identical images


@pytest.mark.parametrize("step", STEPS)
def test_each_image_gets_its_own_parameters(step: str) -> None:
    torch.manual_seed(1)
    aug = build_augment(_only(step))
    assert len(aug) >= 1
    out = aug(_pair())
    diffs = [(out[0] - out[i]).abs().max().item() for i in range(1, 8)]
    assert max(diffs) > 1e-3, step  # identical inputs, different outputs
    assert out.shape == (8, 3, 32, 32) and torch.isfinite(out).all()


def test_disabled_steps_are_identity() -> None:
    x = _pair()
    off = AugmentConfig(flips=False, rotation=0.0, elastic=False, hed=False, color_jitter=False)
    assert len(build_augment(off)) == 0 and torch.equal(build_augment(off)(x), x)
    assert torch.equal(build_augment(AugmentConfig(enabled=False))(x), x)
    hed = HEDJitter(0.0, 0.0)
    torch.testing.assert_close(hed(x), x, atol=1e-5, rtol=0)  # a=1, b=0 round-trips


def test_gpu_preprocess_shapes_and_stats() -> None:
    torch.manual_seed(0)
    x = (torch.rand(4, 3, 50, 50) * 120 + 100).to(torch.uint8)
    cfg = DataConfig()
    train = GPUPreprocess(cfg, 64, train=True)
    evalp = GPUPreprocess(cfg, 64, train=False)
    assert train(x).shape == (4, 3, 64, 64) and evalp(x).shape == (4, 3, 64, 64)
    assert torch.equal(evalp(x), evalp(x))  # eval is deterministic
    assert train.stain_reference["he_ref"][0] == pytest.approx([0.5626, 0.2159])
    off = {"stain": {"enabled": False}, "augment": {"enabled": False}}
    plain = GPUPreprocess(DataConfig(**off, mean=(0.6, 0.5, 0.4), std=(0.2, 0.25, 0.3)), 50, train=True)
    mean = torch.tensor([0.6, 0.5, 0.4]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    torch.testing.assert_close(plain(x), (x.float() / 255 - mean) / std)  # no stain, no aug, no resize
    assert plain.stain_reference is None
    # mean/std unset (not resolved from any weights): ImageNet's, as timm states them
    unset = GPUPreprocess(DataConfig(**off), 50, train=True)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(unset(x), (x.float() / 255 - mean) / std)
