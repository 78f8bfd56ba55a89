"""Classification losses for imbalanced data: the baselines of Table 1 and their shared pieces.

Every loss takes logits ``(B, C)``, integer targets ``(B,)`` and the training clock ``epoch`` (the
fractional epoch, a float or a 0-d tensor; only scheduled losses read it), works for binary and multi-class
problems, computes in float32 (also under bf16/fp16 autocast) and reduces to
``F.cross_entropy`` in its degenerate setting (see ``tests/losses``):

* ``ce``               -- cross-entropy (optionally class-weighted, label smoothing).
* ``focal``            -- Lin et al. 2017, softmax form, ``gamma = 2``, optional ``alpha``.
* ``cb``               -- Cui et al. 2019, weights ``(1 - beta) / (1 - beta^n_c)``, ``beta = 0.9999``,
  softmax or focal type.
* ``ldam``             -- Cao et al. 2019, margins ``m_c = C / n_c^{1/4}`` (max 0.5), scale ``s = 30``,
  deferred re-weighting (DRW) by effective-number weights from ``drw_epoch``. It is meant for a
  normalised (cosine) classifier: set ``model.head.normalized: true`` with it.
* ``balanced_softmax`` -- Ren et al. 2020, cross-entropy of ``logits + log prior``.

The schedules are functions of ``epoch`` (A-CBFL's alpha(t), LDAM's DRW): the caller passes it at every
call, the losses keep no clock of their own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmafnet.registry import Registry

LOSSES: Registry = Registry("loss")

Reduction = Literal["mean", "sum", "none"]
# Floor for 1 - p_t inside the focal factor: keeps d/dp (1 - p)^gamma finite at p = 1 when gamma < 1.
FOCAL_EPS = 1e-12


# ------------------------------------------------------------------------------ argument checks
def as_class_counts(class_counts: Sequence[float] | Tensor | None, *, required: bool = True) -> Tensor | None:
    """Validate per-class sample counts into a float64 tensor ``(C,)``.

    Raises:
        ValueError: naming ``class_counts`` when missing (and ``required``), not 1-D, fewer than two
            classes, non-finite, or any class has a count <= 0.
    """
    if class_counts is None:
        if required:
            raise ValueError("class_counts is required for this loss (one count per class)")
        return None
    counts = torch.as_tensor(class_counts, dtype=torch.float64).detach().cpu()
    if counts.ndim != 1 or counts.numel() < 2:
        raise ValueError(
            f"class_counts must be a 1-D sequence of >= 2 counts, got shape {tuple(counts.shape)}"
        )
    if not torch.isfinite(counts).all():
        raise ValueError(f"class_counts must be finite, got {counts.tolist()}")
    bad = (counts <= 0).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"class_counts: class {bad[0]} has count {counts[bad[0]].item():g}; every class needs at "
            "least one training sample (drop the class or fix the split)"
        )
    return counts


def as_class_weights(weight: Sequence[float] | Tensor | None, name: str = "weight") -> Tensor | None:
    """Validate non-negative finite per-class weights into a float32 tensor ``(C,)``."""
    if weight is None:
        return None
    w = torch.as_tensor(weight, dtype=torch.float32).detach().cpu()
    if w.ndim != 1 or w.numel() < 2:
        raise ValueError(
            f"{name} must be a 1-D sequence of >= 2 per-class weights, got shape {tuple(w.shape)}"
        )
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"{name} must be finite and non-negative, got {w.tolist()}")
    if w.sum() <= 0:
        raise ValueError(f"{name} must not be all zero")
    return w


def effective_number_weights(class_counts: Tensor, beta: float) -> Tensor:
    """Cui et al.'s class-balanced weights ``(1 - beta) / (1 - beta^n_c)``, normalised to sum to C.

    ``beta = 0`` gives equal weights (plain cross-entropy); ``beta -> 1`` approaches inverse frequency.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    eff = -torch.expm1(class_counts.double() * math.log(beta)) if beta > 0 else torch.ones_like(class_counts)
    w = (1.0 - beta) / eff
    return (w / w.sum() * len(w)).float()


def ldam_margins(class_counts: Tensor, max_margin: float) -> Tensor:
    """Cao et al.'s margins ``m_c = C / n_c^{1/4}`` with C chosen so that ``max_c m_c = max_margin``."""
    if max_margin < 0:
        raise ValueError(f"max_margin must be >= 0, got {max_margin}")
    m = class_counts.double() ** -0.25
    return (m * (max_margin / m.max())).float()


def check_nonnegative(name: str, value: float) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is finite and >= 0."""
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value}")


def target_logp(logits: Tensor, target: Tensor) -> Tensor:
    """``log p_y`` of each sample's target class, ``(B,)``."""
    return logits.log_softmax(dim=1).gather(1, target[:, None]).squeeze(1)


def subtract_margins(logits: Tensor, target: Tensor, margins: Tensor) -> Tensor:
    """The logits with each sample's target-class margin subtracted from its own logit only."""
    return logits - F.one_hot(target, logits.shape[1]).to(logits.dtype) * margins[target][:, None]


def focal_factor(logp_t: Tensor, gamma: float | Tensor) -> Tensor:
    """``(1 - p_t)^gamma`` computed from log-probabilities.

    ``1 - p_t = -expm1(log p_t)`` is exact for p_t near 1, and the floor :data:`FOCAL_EPS` keeps the
    gradient finite at p_t = 1 for gamma < 1 (the product with ``-log p_t`` is 0 there anyway).
    """
    one_minus_p = (-torch.expm1(logp_t)).clamp_min(FOCAL_EPS)
    return one_minus_p.pow(gamma)


# ------------------------------------------------------------------------------------- base class
class ClassificationLoss(nn.Module):
    """Base class: argument checks, label smoothing and the reduction; ``forward(logits, target, epoch=0.0)``."""

    def __init__(
        self,
        class_counts: Sequence[float] | Tensor | None = None,
        reduction: Reduction = "mean",
        label_smoothing: float = 0.0,
    ):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.reduction, self.label_smoothing = reduction, label_smoothing
        counts = as_class_counts(class_counts, required=False)
        self.num_classes: int | None = None if counts is None else len(counts)
        # Counts are kept for inspection; they also travel with .to(device) like every class weight.
        self.register_buffer("class_counts", None if counts is None else counts.float(), persistent=False)

    @staticmethod
    def _clock(epoch: float | Tensor) -> float | Tensor:
        """A scheduled loss's ``epoch``: a number is checked here, a device scalar is not read."""
        if not isinstance(epoch, Tensor) and not (math.isfinite(epoch) and epoch >= 0):
            raise ValueError(f"epoch must be finite and >= 0, got {epoch}")
        return epoch

    def _check(self, logits: Tensor, target: Tensor) -> Tensor:
        """Validate shapes (no device sync) and return float32 logits."""
        if logits.ndim != 2:
            raise ValueError(f"logits must be (B, C), got shape {tuple(logits.shape)}")
        if target.ndim != 1 or target.shape[0] != logits.shape[0]:
            raise ValueError(f"target must be (B,) = ({logits.shape[0]},), got shape {tuple(target.shape)}")
        if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise ValueError(f"target must hold integer class indices, got dtype {target.dtype}")
        if self.num_classes is not None and logits.shape[1] != self.num_classes:
            raise ValueError(
                f"class_counts has {self.num_classes} classes but logits have {logits.shape[1]} columns"
            )
        return logits.float()

    def sample_weights(self, logits: Tensor, target: Tensor, epoch: float | Tensor = 0.0) -> Tensor:
        """Each sample's weight on its ``-log p_y`` term at ``epoch``, ``(B,)``: how strongly the loss
        pushes on it (the training monitors' effective learning rate per class). Plain cross-entropy: 1."""
        return torch.ones_like(self._check(logits, target)[:, 0])

    def _cross_entropy(self, logits: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
        """``F.cross_entropy`` with the loss's label smoothing and reduction."""
        return F.cross_entropy(
            logits,
            target.long(),
            weight=weight,
            label_smoothing=self.label_smoothing,
            reduction=self.reduction,
        )

    @staticmethod
    def _check_size(name: str, weight: Tensor, logits: Tensor) -> None:
        if weight.numel() != logits.shape[1]:
            raise ValueError(f"{name} has {weight.numel()} entries but logits have {logits.shape[1]} classes")

    def _reduce(self, per_sample: Tensor) -> Tensor:
        if self.reduction == "none":
            return per_sample
        return per_sample.sum() if self.reduction == "sum" else per_sample.mean()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, reduction={self.reduction!r}"


# ----------------------------------------------------------------------------------------- losses
@LOSSES.register("ce")
class CrossEntropyLoss(ClassificationLoss):
    """Cross-entropy, optionally with per-class ``weight`` (weighted mean, as torch) and label smoothing."""

    def __init__(
        self,
        class_counts: Sequence[float] | Tensor | None = None,
        *,
        weight: Sequence[float] | Tensor | None = None,
        label_smoothing: float = 0.0,
        reduction: Reduction = "mean",
    ):
        super().__init__(class_counts, reduction, label_smoothing)
        self.register_buffer("weight", as_class_weights(weight))

    def forward(self, logits: Tensor, target: Tensor, epoch: float | Tensor = 0.0) -> Tensor:
        logits = self._check(logits, target)
        if self.weight is not None:
            self._check_size("weight", self.weight, logits)
        return self._cross_entropy(logits, target, self.weight)


@LOSSES.register("focal")
class FocalLoss(ClassificationLoss):
    """Softmax focal loss (Lin et al. 2017): ``-alpha_y (1 - p_y)^gamma log p_y``.

    Args:
        gamma: focusing parameter (Lin et al.'s default 2; 0 gives cross-entropy).
        alpha: ``None`` (no weighting), a float in [0, 1] for binary problems (weight of class 1,
            class 0 gets ``1 - alpha``, Lin et al.'s convention) or one non-negative weight per class.
    """

    def __init__(
        self,
        class_counts: Sequence[float] | Tensor | None = None,
        *,
        gamma: float = 2.0,
        alpha: float | Sequence[float] | Tensor | None = None,
        reduction: Reduction = "mean",
    ):
        super().__init__(class_counts, reduction)
        check_nonnegative("gamma", gamma)
        self.gamma = float(gamma)
        if isinstance(alpha, (int, float)):
            if not 0.0 <= alpha <= 1.0:
                raise ValueError(
                    f"alpha as a number must be in [0, 1] (binary weight of class 1), got {alpha}"
                )
            alpha = [1.0 - alpha, float(alpha)]
        self.register_buffer("alpha", as_class_weights(alpha, "alpha"))

    def forward(self, logits: Tensor, target: Tensor, epoch: float | Tensor = 0.0) -> Tensor:
        logits = self._check(logits, target)
        target = target.long()
        logp_t = target_logp(logits, target)  # (B,)
        loss = -focal_factor(logp_t, self.gamma) * logp_t
        if self.alpha is not None:
            self._check_size("alpha", self.alpha, logits)
            loss = self.alpha[target] * loss
        return self._reduce(loss)


@LOSSES.register("cb")
class ClassBalancedLoss(ClassificationLoss):
    """Class-balanced loss (Cui et al. 2019) with effective-number weights.

    ``loss_type='softmax'`` weights softmax cross-entropy, ``'focal'`` weights the softmax focal loss
    (Cui et al.'s focal variant used sigmoids; we keep one softmax head for every loss). Weights sum
    to C and the batch mean is a plain mean over samples (TF ``softmax_cross_entropy`` semantics of
    the reference code), so ``beta = 0`` is exactly cross-entropy.
    """

    def __init__(
        self,
        class_counts: Sequence[float] | Tensor | None = None,
        *,
        beta: float = 0.9999,
        loss_type: Literal["softmax", "focal"] = "softmax",
        gamma: float = 2.0,
        label_smoothing: float = 0.0,
        reduction: Reduction = "mean",
    ):
        super().__init__(as_class_counts(class_counts), reduction, label_smoothing)
        if loss_type not in ("softmax", "focal"):
            raise ValueError(f"loss_type must be 'softmax' or 'focal', got {loss_type!r}")
        check_nonnegative("gamma", gamma)
        self.beta, self.loss_type, self.gamma = beta, loss_type, float(gamma)
        self.register_buffer("weight", effective_number_weights(self.class_counts, beta))

    def forward(self, logits: Tensor, target: Tensor, epoch: float | Tensor = 0.0) -> Tensor:
        logits = self._check(logits, target)
        target = target.long()
        if self.loss_type == "softmax":
            loss = F.cross_entropy(logits, target, reduction="none", label_smoothing=self.label_smoothing)
        else:
            logp_t = target_logp(logits, target)
            loss = -focal_factor(logp_t, self.gamma) * logp_t
        return self._reduce(self.weight[target] * loss)


@LOSSES.register("ldam")
class LDAMLoss(ClassificationLoss):
    """LDAM with deferred re-weighting (Cao et al. 2019).

    ``loss = CE(s * (x - m_y e_y), y; weight)`` where ``x`` are the logits (cosine similarities of a
    normalised classifier), ``m_c = C / n_c^{1/4}`` with ``max m = max_margin`` and, from epoch
    ``drw_epoch`` on, ``weight`` = effective-number weights with ``beta`` (before: all ones). As in the
    reference code the weighted batch mean divides by the sum of the targets' weights.

    Args:
        max_margin: largest margin (Cao: 0.5).
        s: logit scale (Cao: 30); ``max_margin=0, s=1, drw=False`` is cross-entropy.
        drw: enable deferred re-weighting.
        drw_epoch: epoch at which re-weighting starts; ``None`` = 80% of ``total_epochs`` (Cao et al.
            re-weight at epoch 160 of 200).
        total_epochs: epochs the loss is trained for (only used to resolve ``drw_epoch=None``).
        beta: effective-number beta of the DRW weights (Cao: 0.9999).
    """

    def __init__(
        self,
        class_counts: Sequence[float] | Tensor | None = None,
        *,
        max_margin: float = 0.5,
        s: float = 30.0,
        drw: bool = True,
        drw_epoch: float | None = None,
        total_epochs: float | None = None,
        beta: float = 0.9999,
        label_smoothing: float = 0.0,
        reduction: Reduction = "mean",
    ):
        super().__init__(as_class_counts(class_counts), reduction, label_smoothing)
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"s must be finite and > 0, got {s}")
        if drw and drw_epoch is None:
            if total_epochs is None:
                raise ValueError(
                    "drw_epoch: set loss.drw_epoch or pass total_epochs (DRW starts at 80% of it)"
                )
            if total_epochs < 0:
                raise ValueError(f"total_epochs must be >= 0, got {total_epochs}")
            drw_epoch = 0.8 * float(total_epochs)
        if drw_epoch is not None and drw_epoch < 0:
            raise ValueError(f"drw_epoch must be >= 0, got {drw_epoch}")
        self.s, self.drw = float(s), drw
        self.drw_epoch = None if drw_epoch is None else float(drw_epoch)
        self.register_buffer("margins", ldam_margins(self.class_counts, max_margin))
        self.register_buffer("drw_weight", effective_number_weights(self.class_counts, beta))

    def class_weight(self, epoch: float | Tensor) -> Tensor | None:
        """The cross-entropy's class weights at ``epoch``: the DRW weights from ``drw_epoch`` on, else None
        (at a device-scalar epoch: ones before it, chosen on the device)."""
        epoch = self._clock(epoch)
        if not self.drw or self.drw_epoch is None:
            return None
        if isinstance(epoch, Tensor):
            return torch.where(epoch >= self.drw_epoch, self.drw_weight, torch.ones_like(self.drw_weight))
        return self.drw_weight if epoch >= self.drw_epoch else None

    def forward(self, logits: Tensor, target: Tensor, epoch: float | Tensor = 0.0) -> Tensor:
        logits, target = self._check(logits, target), target.long()
        return self._cross_entropy(
            self.s * subtract_margins(logits, target, self.margins), target, self.class_weight(epoch)
        )


@LOSSES.register("balanced_softmax")
class BalancedSoftmaxLoss(ClassificationLoss):
    """Balanced Softmax (Ren et al. 2020): cross-entropy of ``logits + log pi_c``.

    Only the training loss is adjusted; predictions use the plain logits.
    """

    def __init__(
        self,
        class_counts: Sequence[float] | Tensor | None = None,
        *,
        label_smoothing: float = 0.0,
        reduction: Reduction = "mean",
    ):
        super().__init__(as_class_counts(class_counts), reduction, label_smoothing)
        prior = self.class_counts / self.class_counts.sum()
        self.register_buffer("log_prior", prior.log())

    def forward(self, logits: Tensor, target: Tensor, epoch: float | Tensor = 0.0) -> Tensor:
        return self._cross_entropy(self._check(logits, target) + self.log_prior, target)
