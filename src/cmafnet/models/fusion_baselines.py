"""Reconstructed fusion baselines of Table 1: TransFuse, MMTM and HRFNet, as image classifiers.

None of the three papers ships a histopathology *classifier*; the CMAF-Net paper does not say how it
adapted them. These are **reconstructions** from the papers' descriptions, built from timm
backbones with random init (no hub), and they follow the common model contract:

* ``transfuse`` -- Zhang, Liu, Hu, "TransFuse: Fusing Transformers and CNNs for Medical Image
  Segmentation", MICCAI 2021 (paper ref [20]). Parallel ResNet-34 and DeiT-S streams; the
  **BiFusion** block: SE channel attention on the transformer map, CBAM-style spatial attention on
  the CNN map, a bilinear (Hadamard) interaction of the two projected maps through a 3x3 conv,
  concatenation and a residual block. Applied at strides 16 and 32; pooled and classified.
* ``mmtm`` -- Joze et al., "MMTM: Multimodal Transfer Module for CNN Fusion", CVPR 2020 (ref [76]).
  A ResNet-18 stream and a DeiT-S stream run side by side; after each ResNet stage (and after every
  third transformer block) an MMTM squeezes both (global pooling / token mean), maps the joint
  vector through a shared FC to ``(Ca + Cb) / 4`` units and excites each stream with its own
  ``2 * sigmoid`` gate. Late fusion of the pooled streams.
* ``hrfnet`` -- Ding et al., "HRFNet: High-Resolution Feature Network for Dense Prediction",
  arXiv:2108.07697 (ref [75]). Kept to its principle: parallel multi-resolution streams (ResNet-34
  stages at strides 4, 8, 16, 32) that are **repeatedly fused** by up- and down-sampling
  (HRNet-style exchange units), then the HRNet classification head (progressive down-sample-and-add
  from the high-resolution stream to the lowest, widen, pool).

Param counts at 224 px (2 classes): transfuse 48.8 M, mmtm 33.7 M, hrfnet 28.4 M; the paper's table
lists 34.2 / 29.5 / 31.8 M, so these are not weight-for-weight copies.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmafnet.config import ModelConfig
from cmafnet.errors import ConfigError
from cmafnet.models import MODELS
from cmafnet.models.baselines import ClassifierMixin, require_multiple_of_32, timm_kwargs


def _tokens_to_map(vit: nn.Module, tokens: Tensor, img_size: int) -> Tensor:
    """(B, P + N, C) tokens (P prefix tokens) -> (B, C, h, w) map on the patch grid."""
    p = vit.num_prefix_tokens
    h = w = img_size // vit.patch_embed.patch_size[0]
    x = tokens[:, p:]  # (B, N, C)
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], h, w)


def _conv_bn_act(cin: int, cout: int, k: int = 3, stride: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------- TransFuse
class BiFusion(nn.Module):
    """TransFuse BiFusion block for a CNN map ``g`` and a transformer map ``t`` of equal size."""

    def __init__(self, ch_g: int, ch_t: int, ch_b: int, ch_out: int, reduction: int = 4) -> None:
        super().__init__()
        # channel attention (squeeze-and-excitation) on the transformer map
        self.se = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(ch_t, max(ch_t // reduction, 8), 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(max(ch_t // reduction, 8), ch_t, 1),
            nn.Sigmoid(),
        )
        # spatial attention (CBAM: channel max & mean -> 7x7 conv -> sigmoid) on the CNN map
        self.spatial = nn.Sequential(nn.Conv2d(2, 1, 7, padding=3), nn.Sigmoid())
        # bilinear interaction: W_g g * W_t t -> 3x3 conv
        self.w_g = nn.Conv2d(ch_g, ch_b, 1)
        self.w_t = nn.Conv2d(ch_t, ch_b, 1)
        self.inter = _conv_bn_act(ch_b, ch_b, 3)
        # fuse [b, t_hat, g_hat] with a residual unit
        cin = ch_b + ch_t + ch_g
        self.fuse_skip = _conv_bn_act(cin, ch_out, 1, act=False)
        self.fuse = nn.Sequential(_conv_bn_act(cin, ch_out, 3), _conv_bn_act(ch_out, ch_out, 3, act=False))

    def forward(self, g: Tensor, t: Tensor) -> Tensor:
        t_hat = t * self.se(t)  # (B, Ct, h, w)
        pooled = torch.cat([g.amax(1, keepdim=True), g.mean(1, keepdim=True)], 1)  # (B, 2, h, w)
        g_hat = g * self.spatial(pooled)  # (B, Cg, h, w)
        b = self.inter(self.w_g(g) * self.w_t(t))  # (B, Cb, h, w)
        x = torch.cat([b, t_hat, g_hat], 1)
        return F.relu(self.fuse(x) + self.fuse_skip(x))  # (B, Cout, h, w)


@MODELS.register("transfuse")
class TransFuseClassifier(ClassifierMixin, nn.Module):
    """TransFuse reconstruction (ResNet-34 + DeiT-S, BiFusion at strides 16 and 32)."""

    roles = {"spatial": ("cnn",), "contextual": ("vit",), "fusion": ("fuse16", "fuse32"), "head": ("head",)}

    def __init__(self, cfg: ModelConfig, cnn: str = "resnet34", vit: str = "deit_small_patch16_224") -> None:
        super().__init__()
        require_multiple_of_32(cfg, "transfuse")
        self.cnn = timm.create_model(cnn, pretrained=False, features_only=True, out_indices=(3, 4))
        self.vit = timm.create_model(vit, **timm_kwargs(vit, cfg))
        ch16, ch32 = self.cnn.feature_info.channels()
        ct = self.vit.num_features
        # interaction / output widths: half the CNN width keeps the block light
        self.fuse16 = BiFusion(ch16, ct, ch16 // 2, ch16 // 2)
        self.fuse32 = BiFusion(ch32, ct, ch32 // 2, ch32 // 2)
        self._init_head(cfg, (ch16 + ch32) // 2)

    def forward_features(self, x: Tensor) -> Tensor:
        g16, g32 = self.cnn(x)  # (B, C16, S/16, S/16), (B, C32, S/32, S/32)
        t16 = _tokens_to_map(self.vit, self.vit.forward_features(x), self.img_size)  # (B, Ct, S/16, S/16)
        t32 = F.avg_pool2d(t16, 2)  # (B, Ct, S/32, S/32)
        f16 = self.fuse16(g16, t16).mean((2, 3))
        f32 = self.fuse32(g32, t32).mean((2, 3))
        return torch.cat([f16, f32], 1)  # (B, (C16 + C32) / 2)


# -------------------------------------------------------------------------------------------- MMTM
class MMTM(nn.Module):
    """Multimodal transfer module for a CNN map (B, Ca, h, w) and transformer tokens (B, N, Cb)."""

    def __init__(self, ch_a: int, ch_b: int, ratio: int = 4) -> None:
        super().__init__()
        cz = (ch_a + ch_b) // ratio
        self.joint = nn.Sequential(nn.Linear(ch_a + ch_b, cz), nn.ReLU(inplace=True))
        self.exc_a = nn.Linear(cz, ch_a)
        self.exc_b = nn.Linear(cz, ch_b)

    def forward(self, a: Tensor, b: Tensor, prefix: int) -> tuple[Tensor, Tensor]:
        s = torch.cat([a.mean((2, 3)), b[:, prefix:].mean(1)], 1)  # (B, Ca + Cb) squeezed
        z = self.joint(s)  # (B, Cz)
        ga = 2 * torch.sigmoid(self.exc_a(z))  # (B, Ca) excitation gates, 1 = identity
        gb = 2 * torch.sigmoid(self.exc_b(z))  # (B, Cb)
        return a * ga[:, :, None, None], b * gb[:, None, :]


@MODELS.register("mmtm")
class MMTMClassifier(ClassifierMixin, nn.Module):
    """MMTM reconstruction: ResNet-18 and DeiT-S streams exchanging through 4 MMTMs."""

    roles = {"spatial": ("cnn",), "contextual": ("vit",), "fusion": ("mmtm",), "head": ("head",)}

    def __init__(self, cfg: ModelConfig, cnn: str = "resnet18", vit: str = "deit_small_patch16_224") -> None:
        super().__init__()
        require_multiple_of_32(cfg, "mmtm")
        self.cnn = timm.create_model(cnn, pretrained=False, num_classes=0)
        self.vit = timm.create_model(vit, **timm_kwargs(vit, cfg))
        n_blocks = len(self.vit.blocks)
        if n_blocks % 4:
            raise ConfigError(f"mmtm: transformer depth {n_blocks} is not a multiple of 4")
        self.per_stage = n_blocks // 4
        chans = [self.cnn.feature_info[i]["num_chs"] for i in range(1, 5)]  # layer1..layer4
        self.mmtm = nn.ModuleList(MMTM(c, self.vit.num_features) for c in chans)
        self._init_head(cfg, self.cnn.num_features + self.vit.num_features)

    def forward_features(self, x: Tensor) -> Tensor:
        c, v = self.cnn, self.vit
        a = c.maxpool(c.act1(c.bn1(c.conv1(x))))  # ResNet stem, (B, 64, S/4, S/4)
        b = v.norm_pre(v.patch_drop(v._pos_embed(v.patch_embed(x))))  # (B, P + N, Cb)
        layers = [c.layer1, c.layer2, c.layer3, c.layer4]
        for i, (layer, mmtm) in enumerate(zip(layers, self.mmtm, strict=True)):
            a = layer(a)
            b = v.blocks[i * self.per_stage : (i + 1) * self.per_stage](b)
            a, b = mmtm(a, b, v.num_prefix_tokens)
        za = a.mean((2, 3))  # (B, Ca)
        zb = v.forward_head(v.norm(b), pre_logits=True)  # (B, Cb)
        return torch.cat([za, zb], 1)


# ------------------------------------------------------------------------------------------ HRFNet
class _Resample(nn.Module):
    """Bring stream j (width cin, stride s_j) to stream i (width cout, stride s_i)."""

    def __init__(self, cin: int, cout: int, steps: int) -> None:
        super().__init__()
        self.steps = steps  # > 0: down-sample 2**steps by strided convs; < 0: up-sample
        if steps > 0:
            convs = [_conv_bn_act(cin, cin, 3, 2) for _ in range(steps - 1)]
            convs.append(_conv_bn_act(cin, cout, 3, 2, act=False))
            self.op = nn.Sequential(*convs)
        else:
            self.op = _conv_bn_act(cin, cout, 1, act=False)

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        y = self.op(x)
        return F.interpolate(y, size=size, mode="bilinear", align_corners=False) if self.steps < 0 else y


class ExchangeUnit(nn.Module):
    """One HRNet-style fusion round: every stream adds every other stream, resampled, then a residual conv."""

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        n = len(widths)
        self.paths = nn.ModuleList(
            nn.ModuleList(
                nn.Identity() if i == j else _Resample(widths[j], widths[i], i - j) for j in range(n)
            )
            for i in range(n)
        )
        self.blocks = nn.ModuleList(
            nn.Sequential(_conv_bn_act(w, w, 3), _conv_bn_act(w, w, 3, act=False)) for w in widths
        )

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        out = []
        for i, (paths, block) in enumerate(zip(self.paths, self.blocks, strict=True)):
            size = xs[i].shape[-2:]
            y = sum(xs[j] if i == j else paths[j](xs[j], size) for j in range(len(xs)))
            out.append(F.relu(block(y) + y))
        return out


@MODELS.register("hrfnet")
class HRFNetClassifier(ClassifierMixin, nn.Module):
    """HRFNet reconstruction: ResNet-34 multi-resolution streams, 2 exchange units, HRNet head."""

    roles = {"spatial": ("cnn",), "fusion": ("proj", "exchange", "widen", "down", "final"), "head": ("head",)}

    def __init__(
        self, cfg: ModelConfig, cnn: str = "resnet34", widths: tuple[int, ...] = (32, 64, 128, 256)
    ) -> None:
        super().__init__()
        require_multiple_of_32(cfg, "hrfnet")
        self.cnn = timm.create_model(cnn, pretrained=False, features_only=True, out_indices=(1, 2, 3, 4))
        w = list(widths)
        self.proj = nn.ModuleList(
            _conv_bn_act(c, wi, 1) for c, wi in zip(self.cnn.feature_info.channels(), w)
        )
        self.exchange = nn.Sequential(ExchangeUnit(w), ExchangeUnit(w))
        # HRNet classification head: widen each stream, then down-sample-and-add from high to low res
        wide = [2 * x for x in w]
        self.widen = nn.ModuleList(_conv_bn_act(a, b, 1) for a, b in zip(w, wide))
        self.down = nn.ModuleList(_conv_bn_act(wide[i], wide[i + 1], 3, 2) for i in range(len(w) - 1))
        self.final = _conv_bn_act(wide[-1], 1024, 1)
        self._init_head(cfg, 1024)

    def forward_features(self, x: Tensor) -> Tensor:
        xs = [p(f) for p, f in zip(self.proj, self.cnn(x), strict=True)]  # strides 4, 8, 16, 32
        for unit in self.exchange:
            xs = unit(xs)
        y = self.widen[0](xs[0])
        for i, down in enumerate(self.down):
            y = self.widen[i + 1](xs[i + 1]) + down(y)
        return self.final(y).mean((2, 3))  # (B, 1024)
