"""Test-time adaptations for a new site: TTA, AdaBN, Reinhard / Macenko stain normalisation, site calibration.

Each of these changes what a trained run sees or how its outputs are read on a target cohort (e.g.
BreakHis after training on IDC) without touching the trained weights by gradient:

* :func:`tta_logits` averages the class probabilities over the flips / the 8 dihedral transforms
  of each image (histology has no preferred orientation);
* :func:`adapt_batchnorm` re-estimates every BatchNorm layer's running statistics on target
  images (AdaBN, Li et al. 2016, "Revisiting batch normalization for practical domain adaptation");
* :class:`~cmafnet.data.reinhard.ReinhardNormalizer` and the
  project's :class:`~cmafnet.data.stain.MacenkoNormalizer` map a target image's colours to a
  reference's (chosen by ``Adaptation.stain`` in :func:`cmafnet.inference.preprocess.build_preprocess`);
* :func:`site_calibration_split` / :func:`site_calibrate` spend ``k`` labelled target patients on
  refitting the temperature and the operating threshold, and score the remaining patients only.

Conventions: models and ``forward`` callables take the *preprocessed* batch (float ``(B, C, H, W)``,
mean/std-normalised, as ``cmafnet.inference.preprocess.build_preprocess`` returns it); stain
normalisers take raw RGB ``(B, 3, H, W)`` (uint8, or float in ``[0, 255]`` like the Macenko
normaliser) and return the same dtype and range, so they go *before* the mean/std step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from cmafnet.errors import ConfigError

# ----------------------------------------------------------------------------------------- TTA
TTA_MODES = ("none", "flips", "d4")
ADABN_MODES = ("off", "on", "balanced")
STAIN_CHOICES = ("run", "none", "macenko", "reinhard")  # run: as the run was trained


@dataclass(frozen=True)
class Adaptation:
    """What ``evaluate``, ``predict`` and ``wsi`` change on a new site; recorded in their outputs.

    ``stain``: ``run`` (the run's own preprocessing), ``none``, ``macenko`` (to the run's Macenko
    reference, or the standard H&E one) or ``reinhard`` (to the LAB statistics of the run's training
    patches, run.json ``reinhard_reference``); ``tta``: ``none | flips | d4``; ``adabn``: ``off``,
    ``on`` (BatchNorm statistics re-estimated on the target images) or ``balanced`` (on a
    class-balanced sample of them; needs labels); ``site_patients``: labelled target patients that
    refit the temperature and threshold and are then left out of the scores (``evaluate`` only);
    ``seed``: which patients / which balanced sample.
    """

    stain: str = "run"
    tta: str = "none"
    adabn: str = "off"
    site_patients: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name, value, choices in (("--stain-norm", self.stain, STAIN_CHOICES), ("--tta", self.tta, TTA_MODES),
                                     ("--adabn", self.adabn, ADABN_MODES)):  # fmt: skip
            if value not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        if self.site_patients < 0:
            raise ConfigError(f"--site-calibration must be >= 0 patients, got {self.site_patients}")

    @property
    def active(self) -> bool:
        return self != Adaptation(seed=self.seed)

    def label(self) -> str:
        """A short name for tables: ``raw``, or the switches that differ from the default."""
        parts = [f"stain {self.stain}" if self.stain != "run" else "", f"TTA {self.tta}" if self.tta != "none" else "",
                 f"AdaBN{' balanced' if self.adabn == 'balanced' else ''}" if self.adabn != "off" else "",
                 f"site calibration k={self.site_patients}" if self.site_patients else ""]  # fmt: skip
        return " + ".join(p for p in parts if p) or "raw"


@torch.no_grad()
def tta_logits(forward: Callable[[Tensor], Tensor], x: Tensor, mode: str = "d4") -> Tensor:
    """Logits ``(B, K)`` whose softmax is the mean of the class probabilities over the TTA views.

    Args:
        forward: the model (or any callable) mapping a preprocessed batch ``(B, C, H, W)`` to logits ``(B, K)``.
        x: the preprocessed batch ``(B, C, H, W)``. ``"d4"`` rotates by 90°, so non-square inputs
            reach ``forward`` as ``(B, C, W, H)`` too (fine for pooled CNNs, not for fixed-size ViTs).
        mode: ``"none"`` (the identity only), ``"flips"`` (identity, horizontal flip, vertical flip,
            both: 4 views) or ``"d4"`` (the 8 dihedral transforms: 4 rotations × mirror).

    Returns:
        ``log(mean_v softmax(z_v))``, float32. Averaging probabilities (not logits) is the usual TTA;
        ``log p`` is a valid logit vector because ``softmax(log p) = p`` (probabilities sum to 1).
        Computed with log-sum-exp, so no probability underflows to ``log 0``. One forward per view
        (memory of one batch at a time).
    """
    if mode == "flips":
        views = [x, x.flip(-1), x.flip(-2), x.flip((-2, -1))]
    elif mode == "d4":  # the dihedral group of the square: 4 rotations of x and of its mirror image
        views = [torch.rot90(v, k, dims=(-2, -1)) for v in (x, x.flip(-1)) for k in range(4)]
    elif mode == "none":
        views = [x]
    else:
        raise ConfigError(f"TTA mode must be one of {', '.join(TTA_MODES)}, got {mode!r}")
    logp = torch.stack([torch.log_softmax(forward(v).float(), -1) for v in views])  # (V, B, K)
    return torch.logsumexp(logp, 0) - math.log(len(views))  # (B, K)


# --------------------------------------------------------------------------------------- AdaBN
@torch.no_grad()
def adapt_batchnorm(model: nn.Module, batches: Iterable[Tensor]) -> dict[str, Any]:
    """AdaBN: replace every BatchNorm layer's running mean / variance by the target data's.

    The source statistics a network normalises with are one of the things that shift between sites
    (staining, scanner); AdaBN (Li et al., 2016) re-estimates them on unlabelled target images and
    leaves every learnt weight alone. Here: each BN layer with running statistics is reset, and the
    batches are run through the model in ``no_grad`` with *only* the BN layers in train mode
    (dropout, stochastic depth etc. stay in eval mode, so the statistics are those of the
    deterministic network). The estimate is the cumulative average over all batches (as with
    ``momentum=None``, but weighted by images, so a smaller last batch counts for its size): the
    running mean is the target mean exactly, the variance the image-weighted average of the per-batch
    (unbiased) variances. Momentum and every module's train / eval flag are restored afterwards
    (an eval-mode model comes back in eval mode), also on error, when the original statistics are
    put back as well.

    Risk under class-proportion shift: the re-estimated statistics absorb the target's class mix.
    BN then centres features on the target's average image, so if the target holds e.g. 70 %
    malignant images where the source held 30 %, what used to be "average" moves towards the
    malignant class and decisions drift towards benign (and the operating threshold no longer means
    what it meant on validation). When labels exist, re-estimate on a class-balanced sample
    (:func:`balanced_indices`); otherwise report the adaptation alongside the unadapted result.

    Args:
        model: the network; its BN layers are updated in place.
        batches: preprocessed batches ``(B, C, H, W)`` on the model's device (only images are needed).

    Returns:
        ``{"method", "layers", "images", "batches"}``; ``layers == 0`` (nothing changed, no error) for a
        model without BatchNorm, e.g. a ViT or a GroupNorm / LayerNorm network.

    Raises:
        ValueError: ``batches`` was empty (the model is left as it was).
    """
    # only the BatchNorm layers that keep running statistics can be re-estimated
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    summary: dict[str, Any] = {"method": "AdaBN (BatchNorm statistics re-estimated)", "layers": len(bns)}
    if not bns:
        return {**summary, "images": 0, "batches": 0}
    flags = [(m, m.training) for m in model.modules()]
    momenta = [m.momentum for m in bns]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in bns]
    n_images = n_batches = 0
    ok = False
    try:
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.train()
        for x in batches:
            b = int(x.shape[0])
            if b == 0:
                continue
            n_images += b
            n_batches += 1
            for m in bns:
                m.momentum = b / n_images  # cumulative, image-weighted average (first batch: 1)
            model(x)
        if n_images == 0:
            raise ValueError("adapt_batchnorm: no images in batches")
        ok = True
    finally:
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        for m, was in flags:
            m.training = was
        if not ok:
            for m, s in zip(bns, saved):
                m.load_state_dict(s)
    return {**summary, "images": n_images, "batches": n_batches}


def balanced_indices(labels: np.ndarray, seed: int) -> np.ndarray:
    """Row indices of a class-balanced sample: every class undersampled to the smallest class's count.

    For AdaBN on labelled target data (see :func:`adapt_batchnorm` on class-proportion shift).
    Seeded (``numpy.random.default_rng(seed)``), without replacement, returned sorted. With a
    single class present every row is returned (there is nothing to balance).
    """
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {y.shape}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    n = int(counts.min())
    picked = [rng.choice(np.flatnonzero(y == c), size=n, replace=False) for c in classes]
    return np.sort(np.concatenate(picked)).astype(np.int64)
