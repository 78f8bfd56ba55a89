"""The run's evaluation preprocessing for inference (stain normalisation, resize, mean/std)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cmafnet.run import LoadedRun

log = logging.getLogger(__name__)


def build_preprocess(
    run: LoadedRun, device: torch.device
) -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    """The run's evaluation preprocessing: uint8 ``(B, 3, H, W)`` -> normalised float at ``img_size``.

    Uses the data package's ``GPUPreprocess(train=False)`` (Macenko with the run's stain reference,
    resize, mean/std) when it is installed; otherwise resize + mean/std only, and says so.
    Returns the callable and a short description for the log / summary.
    """
    cfg = run.config
    img_size = cfg.model.img_size
    try:
        from cmafnet.data.transforms import GPUPreprocess
    except ImportError:
        GPUPreprocess = None
    if GPUPreprocess is not None:
        ref = run.meta.get("stain_reference")
        pre = GPUPreprocess(cfg.data, img_size, train=False, stain_reference=ref).to(device).eval()
        if not cfg.data.stain.enabled:
            what = "GPUPreprocess(train=False), stain normalisation off (as in training)"
        elif ref:
            what = f"GPUPreprocess(train=False), Macenko with the run's stain reference ({ref.get('source', 'run.json')})"
        else:
            what = "GPUPreprocess(train=False), Macenko with the standard H&E reference (run.json has none)"
        return pre, what
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    mean = torch.tensor(cfg.data.mean or IMAGENET_DEFAULT_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std or IMAGENET_DEFAULT_STD, device=device).view(1, 3, 1, 1)
    mode = cfg.data.interpolation

    def fallback(x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255.0)  # (B, 3, H, W) in [0, 1]
        if x.shape[-2:] != (img_size, img_size):
            x = F.interpolate(x, size=(img_size, img_size), mode=mode, align_corners=False, antialias=True)
        return (x.clamp_(0, 1) - mean) / std

    what = "resize+normalise (cmafnet.data.transforms missing"
    what += ", NO stain normalisation)" if cfg.data.stain.enabled else ")"
    log.warning("preprocessing: %s", what)
    return fallback, what
