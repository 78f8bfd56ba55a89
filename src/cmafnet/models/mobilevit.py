"""The contextual branch: MobileViT (v1, xxs / xs / s) with the paper's modifications.

The MobileNetV2 inverted-residual stages, the stem and the final 1x1 conv are timm's
(``timm.create_model("mobilevit_<v>")``); every ``MobileVitBlock`` is replaced by
:class:`MobileViTBlock`, written here, which keeps timm's parameter names (so a timm MobileViT state
dict loads unchanged) and adds (switches of ``model.contextual``):

- learned absolute positional embeddings on the token grid (``learned_pos``),
- scale-aware positional embeddings: the Sobel gradient magnitude of the input image, average-pooled
  to each transformer grid and embedded by a 1x1 conv (``scale_aware_pos``),
- exact (SDPA) or Nystrom attention (``attention``, ``num_landmarks``, ``pinv``, ``pinv_iters``),
- a configurable unfold patch size (``patch_size``; timm uses 2).

Both embeddings are zero-initialised, so a branch loaded from timm weights starts as exactly timm's
function; with the modifications off it *is* timm's MobileViT (tested).
"""

from __future__ import annotations

import math

import timm
import torch
import torch.nn.functional as F
from timm.models.mobilevit import MobileVitBlock as TimmMobileVitBlock
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cmafnet.config import ContextualConfig
from cmafnet.models.nystrom import SelfAttention


def bilinear_resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of ``(B, C, H, W)`` to ``size`` as two small matmuls, in float32.

    Same result as ``F.interpolate(x, size, mode="bilinear", align_corners=False)``. Why not call
    that: MobileViT-S resizes its 7x7 last-stage map to 8x8 and back at 224 px (patch 2), and on
    the GPU the channels-last bilinear kernel took ~6 ms of a ~60 ms training step (profiled on an
    H200), more than the whole transformer of that stage; the matmul form costs microseconds and
    its backward is a matmul too. Float32 whatever the autocast dtype: the 8 -> 7 weights are not
    representable in bf16.
    """
    h, w = x.shape[-2:]
    with torch.autocast(x.device.type, enabled=False):
        # 1-D linear-interpolation weights (n_out, n_in): F.interpolate of the identity (channel j = e_j),
        # so exactly its own taps, built on the device (no host-to-device copy: CUDA-graph capturable)
        wh, ww = (
            F.interpolate(torch.eye(n, device=x.device)[None], size=m, mode="linear")[0].T
            for n, m in ((h, size[0]), (w, size[1]))
        )  # (H', H), (W', W)
        y = torch.einsum("bchw,Hh,Ww->bcHW", x.float(), wh, ww)  # (B, C, H', W')
    return y.to(x.dtype)


class MobileViTBlock(nn.Module):
    """MobileViT block (Mehta & Rastegari, ICLR 2022): local conv, unfold, transformer, fold, fuse.

    Built from a timm ``MobileVitBlock`` whose conv modules it takes over (same names).
    """

    def __init__(self, block: TimmMobileVitBlock, grid: int, opts: ContextualConfig) -> None:
        super().__init__()
        self.conv_kxk = block.conv_kxk
        self.conv_1x1 = block.conv_1x1
        dim = block.conv_1x1.out_channels
        for layer in block.transformer:  # timm ``Block``s, their attention swapped for ours
            attn = layer.attn
            layer.attn = SelfAttention(
                attn.qkv.in_features,
                attn.num_heads,
                kind=opts.attention,
                num_landmarks=opts.num_landmarks,
                pinv=opts.pinv,
                pinv_iters=opts.pinv_iters,
                attn_drop=attn.attn_drop.p,
            )
            # Reuse timm's modules so the state-dict names and initialisation are timm's own.
            layer.attn.qkv, layer.attn.proj, layer.attn.proj_drop = attn.qkv, attn.proj, attn.proj_drop
        self.transformer = block.transformer
        self.norm = block.norm
        self.conv_proj = block.conv_proj
        self.conv_fusion = block.conv_fusion
        self.patch_size = opts.patch_size
        # (1, C, g, g) learned embedding on the token grid; zero so timm weights start unchanged.
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, grid, grid)) if opts.learned_pos else None
        self.scale_embed = nn.Conv2d(1, dim, kernel_size=1) if opts.scale_aware_pos else None
        if self.scale_embed is not None:
            nn.init.zeros_(self.scale_embed.weight)
            nn.init.zeros_(self.scale_embed.bias)

    def forward(self, x: Tensor, grad_mag: Tensor | None = None) -> Tensor:
        shortcut = x
        x = self.conv_1x1(self.conv_kxk(x))  # (B, C, H, W) token features
        b, c, h, w = x.shape
        if self.pos_embed is not None:
            pos = self.pos_embed
            if pos.shape[-2:] != (h, w):
                pos = F.interpolate(pos, size=(h, w), mode="bicubic", align_corners=False)
            x = x + pos
        if self.scale_embed is not None:
            if grad_mag is None:
                raise ValueError("scale-aware positional embedding needs the input gradient magnitude")
            x = x + self.scale_embed(F.adaptive_avg_pool2d(grad_mag, (h, w)))

        p = self.patch_size
        new_h, new_w = math.ceil(h / p) * p, math.ceil(w / p) * p
        resized = (new_h, new_w) != (h, w)
        if resized:  # as timm / Apple: resize to a multiple of the patch, back after folding
            x = bilinear_resize(x, (new_h, new_w))
        nh, nw = new_h // p, new_w // p
        # Unfold with one copy: (B, C, nh, p, nw, p) -> (B, p, p, nh, nw, C) -> (B*P, N, C),
        # P = p*p pixels per patch, N = nh*nw patches; attention runs over N for each pixel slot.
        x = x.reshape(b, c, nh, p, nw, p).permute(0, 3, 5, 2, 4, 1).reshape(b * p * p, nh * nw, c)
        x = self.norm(self.transformer(x))
        # Fold back: (B*P, N, C) -> (B, p, p, nh, nw, C) -> (B, C, nh, p, nw, p) -> (B, C, H, W)
        x = x.reshape(b, p, p, nh, nw, c).permute(0, 5, 3, 1, 4, 2).reshape(b, c, new_h, new_w)
        if resized:
            x = bilinear_resize(x, (h, w))

        x = self.conv_proj(x)
        if self.conv_fusion is not None:
            x = self.conv_fusion(torch.cat((shortcut, x), dim=1))
        return x


# Normalised 3x3 Sobel kernels (sum of absolute weights 1), x then y: (2, 1, 3, 3).
_SOBEL = torch.tensor([[[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]]) / 8.0
_SOBEL = torch.stack((_SOBEL, _SOBEL.transpose(1, 2)))


def gradient_magnitude(x: Tensor, kernel: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """Sobel gradient magnitude of the channel-mean image: ``(B, 3, S, S) -> (B, 1, S, S)``.

    One fixed-kernel conv with replicate padding (the same numbers as ``kornia.filters.sobel``),
    written out so the model path needs no kornia and stays a single fusible op under compile.
    Pass ``kernel`` already on the input's device (a module buffer) to avoid a host-to-device copy
    per call, which would also break CUDA-graph capture.
    """
    g = x.mean(dim=1, keepdim=True)  # (B, 1, S, S)
    k = _SOBEL if kernel is None else kernel
    g = F.conv2d(F.pad(g, (1, 1, 1, 1), mode="replicate"), k.to(dtype=g.dtype, device=g.device))
    return torch.sqrt(g.square().sum(dim=1, keepdim=True) + eps)  # (B, 1, S, S)


class MobileViT(nn.Module):
    """MobileViT feature extractor: ``(B, 3, S, S) -> (B, num_features, S/32, S/32)``.

    Parameter names follow timm's ``mobilevit_<variant>`` (``stem``, ``stages``, ``final_conv``), so a timm
    state dict loads (:func:`cmafnet.models.weights.load_branch_weights`).
    """

    def __init__(self, opts: ContextualConfig, img_size: int = 224, drop_path: float = 0.0) -> None:
        super().__init__()
        self.variant = opts.variant
        self.opts = opts
        self.register_buffer("sobel", _SOBEL.clone(), persistent=False)  # (2, 1, 3, 3), not in state dicts
        net = timm.create_model(
            f"mobilevit_{opts.variant}", pretrained=False, num_classes=0, drop_path_rate=drop_path
        )
        self.stem = net.stem
        for s, stage in enumerate(net.stages, start=1):
            grid = -(-img_size // 2**s)  # stage s: stride 2**s, each stride-2 conv ceil-halving the side
            for i, blk in enumerate(stage):
                if isinstance(blk, TimmMobileVitBlock):
                    stage[i] = MobileViTBlock(blk, grid, opts)
        self.stages = net.stages
        self.final_conv = net.final_conv
        self.num_features = net.num_features
        self.grad_checkpointing = False  # recompute each stage in backward (set by CMAFNet)

    def _run_stage(self, stage: nn.Sequential, x: Tensor, grad_mag: Tensor | None) -> Tensor:
        for blk in stage:
            x = blk(x, grad_mag) if isinstance(blk, MobileViTBlock) else blk(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        grad_mag = gradient_magnitude(x, self.sobel) if self.opts.scale_aware_pos else None
        x = self.stem(x)
        for stage in self.stages:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(self._run_stage, stage, x, grad_mag, use_reentrant=False)
            else:
                x = self._run_stage(stage, x, grad_mag)
        return self.final_conv(x)

    def added_parameter_names(self) -> set[str]:
        """Names of the parameters timm's MobileViT does not have (the positional embeddings)."""
        return {n for n, _ in self.named_parameters() if ".pos_embed" in n or ".scale_embed." in n}
