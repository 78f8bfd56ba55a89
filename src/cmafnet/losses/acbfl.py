"""Adaptive Class-Balanced Focal Loss (paper §4.4, Eq. 14, with the corrections of docs/decisions.md).

Per sample ``i`` with target ``y``::

    loss_i = alpha_y(t) * (1 - p_y)^{gamma_y} * (-log p_y)  -  lambda * H(p_i)

* ``gamma_c = gamma_base * (pi_maj / pi_c)^{1/4}`` (``class_dependent_gamma``; off: ``gamma_base``).
* ``alpha_c(t) = w_sqrt + (w_inv - w_sqrt) * exp(-rate * t)``: inverse-frequency weights at t = 0
  moving exponentially toward the square-root weights of §3.3 (``w_1 / w_0 = sqrt(pi_0 / pi_1)``).
  Both weight vectors are normalised to mean 1, so ``alpha(t)`` keeps mean 1 and a balanced data set
  gives ``alpha = 1``. ``dynamic_alpha=False`` fixes ``alpha = w_sqrt``. ``t`` is the ``epoch`` argument
  of every call (the trainer passes the fractional epoch within the stage).
* ``H(p_i)`` is the entropy of the predicted distribution (from the logits without margins). It is
  a confidence penalty (Pereyra et al. 2017): the term *lowers* the loss for higher entropy, not the
  sign Eq. 14 prints.
* ``margin=True`` (default): LDAM-style margins ``m_c = C / n_c^{1/4}`` (largest ``max_margin``)
  subtracted from the true-class logit before the softmax (Eq. 9's margin term ``∝ pi_c^{-1/4}``).
  They act on the raw logits (no LDAM scale ``s``), because the CMAF-Net head is not normalised.

``p_y`` and the focal factor come from ``log_softmax`` (see ``focal_factor``); the batch reduction is
a plain mean over samples (Eq. 14 sums; the mean keeps the scale independent of the batch size).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from cmafnet.losses.classification import (
    LOSSES,
    ClassificationLoss,
    Reduction,
    as_class_counts,
    check_nonnegative,
    focal_factor,
    ldam_margins,
    subtract_margins,
    target_logp,
)


def gamma_per_class(class_counts: Tensor, gamma_base: float) -> Tensor:
    """``gamma_c = gamma_base * (pi_maj / pi_c)^{1/4}``; the majority class gets ``gamma_base``."""
    pi = class_counts.double() / class_counts.sum()
    return (gamma_base * (pi.max() / pi) ** 0.25).float()


def power_weights(class_counts: Tensor, power: float) -> Tensor:
    """Weights ``w_c ∝ pi_c^{-power}`` normalised to mean 1 (power 1: inverse frequency, 0.5: sqrt)."""
    pi = class_counts.double() / class_counts.sum()
    w = pi**-power
    return (w / w.mean()).float()


@LOSSES.register("acbfl")
class ACBFLoss(ClassificationLoss):
    """Adaptive Class-Balanced Focal Loss; every component has a switch (Table 6 loss rows).

    Args:
        class_counts: training samples per class (priors ``pi_c`` are their fractions).
        gamma_base: focusing parameter of the majority class (paper: 2.0).
        class_dependent_gamma: ``gamma_c`` grows as ``(pi_maj / pi_c)^{1/4}``; off: ``gamma_base``.
        dynamic_alpha: exponential schedule of ``alpha(t)``; off: fixed square-root weights.
        alpha_decay: rate of the schedule per epoch.
        entropy_weight: ``lambda`` of the confidence penalty ``-lambda * H(p)``.
        margin: subtract LDAM-style margins from the true-class logit.
        max_margin: the largest margin (Cao et al.: 0.5).
    """

    def __init__(
        self,
        class_counts: Sequence[float] | Tensor | None = None,
        *,
        gamma_base: float = 2.0,
        class_dependent_gamma: bool = True,
        dynamic_alpha: bool = True,
        alpha_decay: float = 0.1,
        entropy_weight: float = 0.1,
        margin: bool = True,
        max_margin: float = 0.5,
        reduction: Reduction = "mean",
    ):
        super().__init__(as_class_counts(class_counts), reduction)
        check_nonnegative("gamma_base", gamma_base)
        check_nonnegative("entropy_weight", entropy_weight)
        check_nonnegative("max_margin", max_margin)
        if not (math.isfinite(alpha_decay) and alpha_decay > 0):
            raise ValueError(f"alpha_decay must be finite and > 0, got {alpha_decay}")
        self.dynamic_alpha, self.alpha_decay = dynamic_alpha, float(alpha_decay)
        self.entropy_weight, self.use_margin = float(entropy_weight), margin
        counts = self.class_counts
        gamma = (
            gamma_per_class(counts, gamma_base)
            if class_dependent_gamma
            else torch.full_like(counts, float(gamma_base))
        )
        self.register_buffer("gamma", gamma)  # (C,)
        self.register_buffer("w_inv", power_weights(counts, 1.0))  # (C,) alpha at t = 0
        self.register_buffer("w_sqrt", power_weights(counts, 0.5))  # (C,) alpha as t -> inf
        self.register_buffer("margins", ldam_margins(counts, max_margin if margin else 0.0))  # (C,)

    def alpha(self, epoch: float | Tensor) -> Tensor:
        """``alpha_c(t)`` at ``t = epoch`` (a number, or a 0-d tensor read on the device), shape ``(C,)``."""
        t = self._clock(epoch)
        if not self.dynamic_alpha:
            return self.w_sqrt
        decay = torch.exp(-self.alpha_decay * t) if isinstance(t, Tensor) else math.exp(-self.alpha_decay * t)
        return self.w_sqrt + (self.w_inv - self.w_sqrt) * decay

    def _weighted_logp(self, logits: Tensor, target: Tensor, epoch: float | Tensor) -> tuple[Tensor, Tensor]:
        """``alpha_y(t) * (1 - p_y)^{gamma_y}`` and ``log p_y`` of the true class after the margins, ``(B,)`` each."""
        logp_t = target_logp(
            subtract_margins(logits, target, self.margins) if self.use_margin else logits, target
        )
        return self.alpha(epoch)[target] * focal_factor(logp_t, self.gamma[target]), logp_t

    def sample_weights(self, logits: Tensor, target: Tensor, epoch: float | Tensor = 0.0) -> Tensor:
        """``alpha_y(t) * (1 - p_y)^{gamma_y}`` per sample at ``t = epoch`` (margins applied), ``(B,)``."""
        return self._weighted_logp(self._check(logits, target), target.long(), epoch)[0]

    def forward(self, logits: Tensor, target: Tensor, epoch: float | Tensor = 0.0) -> Tensor:
        logits = self._check(logits, target)  # float32 (B, C)
        weight, logp_t = self._weighted_logp(logits, target.long(), epoch)  # (B,) each
        loss = -weight * logp_t
        if self.entropy_weight > 0:
            logp = logits.log_softmax(dim=1)
            # H(p) = -sum p log p; written with exp(log p) so p = 0 contributes 0 value and 0 gradient.
            entropy = -(logp.exp() * logp).sum(dim=1)
            loss = loss - self.entropy_weight * entropy
        return self._reduce(loss)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, gamma={[round(g, 4) for g in self.gamma.tolist()]}, "
            f"dynamic_alpha={self.dynamic_alpha}, entropy_weight={self.entropy_weight}, margin={self.use_margin}"
        )
