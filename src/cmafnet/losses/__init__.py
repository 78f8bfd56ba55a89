"""Classification losses, information-theoretic regularisers and the CMAF-Net objective.

Public API (docs/architecture.md "losses")::

    loss = create_loss("acbfl", class_counts=[198738, 78786])
    value = loss(logits, target, epoch=3.5)  # the schedules' clock: passed at every call

    objective = Objective(cfg.loss, cfg.regularizers, class_counts, num_heads=cfg.model.fusion.heads)
    total, terms = objective(model(x, return_aux=True), y, epoch=epoch, beta_ramp=ramp)
"""

from __future__ import annotations

# acbfl is imported for its @LOSSES.register side effect.
from cmafnet.losses.acbfl import ACBFLoss, gamma_per_class, power_weights
from cmafnet.losses.classification import (
    LOSSES,
    BalancedSoftmaxLoss,
    ClassBalancedLoss,
    ClassificationLoss,
    CrossEntropyLoss,
    FocalLoss,
    LDAMLoss,
    effective_number_weights,
    ldam_margins,
)
from cmafnet.losses.objective import (
    Objective,
    class_entropy,
    create_loss,
    create_loss_from_config,
    mutual_info_lower_bound,
    stage1_loss,
)
from cmafnet.losses.regularizers import (
    AttentionEntropyRegularizer,
    attention_diversity,
    attention_entropy,
    gaussian_kl,
    gaussian_mutual_information,
    normalized_hsic,
    orthogonality,
    ramp_weight,
    redundancy,
)

__all__ = [
    "LOSSES",
    "ACBFLoss",
    "AttentionEntropyRegularizer",
    "BalancedSoftmaxLoss",
    "ClassBalancedLoss",
    "ClassificationLoss",
    "CrossEntropyLoss",
    "FocalLoss",
    "LDAMLoss",
    "Objective",
    "attention_diversity",
    "attention_entropy",
    "class_entropy",
    "create_loss",
    "create_loss_from_config",
    "effective_number_weights",
    "gamma_per_class",
    "gaussian_kl",
    "gaussian_mutual_information",
    "ldam_margins",
    "mutual_info_lower_bound",
    "normalized_hsic",
    "orthogonality",
    "power_weights",
    "ramp_weight",
    "redundancy",
    "stage1_loss",
]
