"""The spatial branch: timm ResNet-18 features with stage skips and a spatial attention gate (§4.2)."""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cmafnet.config import SpatialConfig
from cmafnet.errors import ConfigError


class SpatialAttentionGate(nn.Module):
    """CBAM-style spatial attention (Woo et al., 2018): channel avg & max pool -> 7x7 conv -> sigmoid."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        # (B, C, H, W) -> (B, 2, H, W) -> (B, 1, H, W) map in (0, 1)
        pooled = torch.cat((x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)), dim=1)
        return x * torch.sigmoid(self.conv(pooled))


class SpatialBranch(nn.Module):
    """ResNet features ``(B, 3, S, S) -> (B, 512, S/32, S/32)`` with the paper's ``model.spatial`` switches.

    ``skip_merge``: the outputs of the two stages before the last (ResNet-18 ``layer2``, ``layer3``:
    128 and 256 channels at strides 8 and 16) are average-pooled to the last grid and projected by a
    1x1 conv to the last stage's width, then summed with it. Pooling before the 1x1 conv is exactly
    the same linear map as conv-then-pool (both are linear) at 1/16 and 1/4 of the MACs.
    ``spatial_gate``: :class:`SpatialAttentionGate` on the merged map.
    Parameter names under ``body`` are timm's ``resnet18`` names, so timm state dicts load.
    """

    def __init__(self, cfg: SpatialConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.backbone = cfg.backbone
        out_indices = (-3, -2, -1) if cfg.skip_merge else (-1,)
        kw = {"drop_path_rate": drop_path} if drop_path > 0 else {}
        try:
            self.body = timm.create_model(
                cfg.backbone, pretrained=False, features_only=True, out_indices=out_indices, **kw
            )
        except RuntimeError as err:  # timm: unknown model name
            raise ConfigError(f"model.spatial.backbone: {err}") from None
        chs = self.body.feature_info.channels()
        self.num_features = chs[-1]
        self.skips = nn.ModuleList(nn.Conv2d(c, chs[-1], kernel_size=1) for c in chs[:-1])
        self.gate = SpatialAttentionGate() if cfg.spatial_gate else None
        # Modules of ``body`` (in execution order) whose outputs are the returned features.
        self._feature_names = frozenset(n.replace(".", "_") for n in self.body.feature_info.module_name())
        # Grad checkpointing segments: the residual stages only (``nn.Sequential`` of blocks, i.e.
        # ResNet ``layer1``..``layer4``), never the stem. timm's own FeatureListNet checkpointing
        # (timm <= 1.0.29) wraps every module separately, including the stem's ``ReLU(inplace=True)``:
        # that ReLU overwrites the tensor the checkpoint saved for recomputation, and backward fails
        # ("modified by an inplace operation ... ReluBackward0"). A stage never modifies its input
        # in place (blocks write only to their own intermediates), so checkpointing stages is safe
        # and holds almost all the activation memory anyway.
        self._ckpt_names = frozenset(
            n for i, (n, m) in enumerate(self.body.items()) if i > 0 and isinstance(m, nn.Sequential)
        )
        self.grad_checkpointing = False  # recompute the residual stages in backward (set by CMAFNet)

    def _features(self, x: Tensor) -> list[Tensor]:
        """The backbone's feature maps, as ``body(x)`` returns them (strides 8, 16, 32 by default)."""
        if not (self.grad_checkpointing and self.training and torch.is_grad_enabled()):
            return self.body(x)
        feats = []
        for name, module in self.body.items():
            x = checkpoint(module, x, use_reentrant=False) if name in self._ckpt_names else module(x)
            if name in self._feature_names:
                feats.append(x)
        return feats

    def forward(self, x: Tensor) -> Tensor:
        feats = self._features(x)
        out = feats[-1]  # (B, 512, h, w)
        for conv, f in zip(self.skips, feats[:-1], strict=True):
            out = out + conv(F.adaptive_avg_pool2d(f, out.shape[-2:]))
        if self.gate is not None:
            out = self.gate(out)
        return out
