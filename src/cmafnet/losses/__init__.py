"""Classification losses, information-theoretic regularisers and the CMAF-Net objective.

Public API (docs/architecture.md "losses")::

    loss = create_loss("acbfl", class_counts=[198738, 78786])
    value = loss(logits, target, epoch=3.5)  # the schedules' clock: passed at every call

    objective = Objective(cfg.loss, cfg.regularizers, class_counts, num_heads=cfg.model.fusion.heads)
    total, terms = objective(model(x, return_aux=True), y, epoch=epoch, beta_ramp=ramp)
"""

from __future__ import annotations

from typing import Any

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
    TERM_NAMES,
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

# Table 6 rows that change only the objective, as overrides of the ``loss`` / ``regularizers``
# sections (everything else stays at the paper config).
TABLE6_LOSS_VARIANTS: dict[str, dict[str, Any]] = {
    "Standard Cross-Entropy": {"loss": {"name": "ce"}},
    "Standard Focal Loss": {"loss": {"name": "focal"}},
    "CB Loss": {"loss": {"name": "cb"}},
    "A-CBFL w/o class-dependent γ": {"loss": {"name": "acbfl", "class_dependent_gamma": False}},
    "A-CBFL w/o dynamic weighting": {"loss": {"name": "acbfl", "dynamic_alpha": False}},
}
TABLE6_REGULARIZER_VARIANTS: dict[str, dict[str, Any]] = {
    "w/o IB regularization (β2 = 0)": {"regularizers": {"beta2": 0.0}},
    "w/o Diversity loss": {"regularizers": {"diversity": 0.0}},
    "w/o Entropy regularization": {"regularizers": {"entropy": 0.0}},
    "Fixed β (no scheduling)": {"regularizers": {"beta_schedule": "fixed"}},
}


__all__ = [
    "LOSSES",
    "TABLE6_LOSS_VARIANTS",
    "TABLE6_REGULARIZER_VARIANTS",
    "TERM_NAMES",
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
