"""What each kind of stage trains and which loss it minimises.

The stage list itself is data (``cfg.train.stages``, paper §4.5)::

    branches   30 ep  lr 1e-3 cosine         spatial + contextual + temporary heads, CE on aux_logits
    fusion     40 ep  lr 1e-4 warmup_cosine  fusion + head (extractors frozen, BN in eval), beta ramp
    end_to_end 30 ep  lr 1e-5 cyclic         everything but the temporary heads, full objective

A one-stage schedule (``train: all``) is the "w/o progressive training" ablation.
"""

from __future__ import annotations

import logging

import torch.nn.functional as F
from torch import Tensor, nn

from cmafnet.config import StageConfig
from cmafnet.errors import ConfigError

log = logging.getLogger(__name__)

# Roles (model.param_groups_by_role()) trained by each kind of stage.
TRAINED_ROLES: dict[str, tuple[str, ...]] = {
    "branches": ("spatial", "contextual", "aux_heads"),
    "fusion": ("fusion", "head"),
    "all": ("spatial", "contextual", "fusion", "head"),
}


def configure_trainable(
    model: nn.Module, stage: StageConfig, roles: dict[str, list[nn.Parameter]]
) -> list[tuple[str, nn.Parameter]]:
    """Set ``requires_grad`` for ``stage`` and return the trainable ``(name, parameter)`` pairs.

    ``roles`` is ``model.param_groups_by_role()`` taken once before any stage froze anything (models
    leave parameters frozen by their config, e.g. a fixed tau, out of every role). Parameters the
    model assigns to no role but that were trainable at the start are trained with ``fusion``.

    Raises:
        ConfigError: the model has none of the roles the stage trains.
    """
    wanted = TRAINED_ROLES[stage.train]
    trainable = {id(p) for r in wanted for p in roles.get(r, [])}
    named = list(model.named_parameters())
    if "fusion" in wanted:
        trainable |= {id(p) for p in roles.get("_unassigned", [])}
    if not trainable:
        raise ConfigError(
            f"train.stages: stage '{stage.name}' trains {list(wanted)} but the model has none of these roles "
            f"(roles: {[r for r, ps in roles.items() if ps]}); use a single 'train: all' stage for this model"
        )
    for _, p in named:
        p.requires_grad_(id(p) in trainable)
    return [(n, p) for n, p in named if p.requires_grad]


def initial_roles(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The model's roles before training, plus ``_unassigned``: trainable parameters in no role."""
    roles = {k: list(v) for k, v in model.param_groups_by_role().items()}
    in_role = {id(p) for ps in roles.values() for p in ps}
    roles["_unassigned"] = [p for p in model.parameters() if p.requires_grad and id(p) not in in_role]
    return roles


def freeze_eval(module: nn.Module) -> None:
    """Put every sub-module whose parameters are all frozen in eval mode (BN statistics and dropout
    of frozen extractors stay fixed). Call after every ``model.train()``."""
    params = list(module.parameters())
    if params and not any(p.requires_grad for p in params):
        module.eval()
        return
    for child in module.children():
        freeze_eval(child)


def stage_loss(
    out: object, target: Tensor, stage: StageConfig, objective: nn.Module, *, epoch: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss a stage minimises and its detached terms for logging.

    ``loss: ce`` in a ``branches`` stage: summed cross-entropy of the temporary branch heads
    (``out.aux_logits``); ``loss: ce`` elsewhere: cross-entropy of the main logits;
    ``loss: objective``: the full objective, regularisers on outside ``branches`` stages.
    """
    if stage.loss == "ce":
        if stage.train == "branches":
            if not out.aux_logits:
                raise ConfigError(
                    f"train.stages: stage '{stage.name}' trains branch heads but the model returns no aux_logits"
                )
            return objective.stage1_loss(out, target)  # sum of the branch heads' cross-entropies
        total = F.cross_entropy(out.logits.float(), target)
        return total, {"total": total.detach()}
    if stage.train == "branches" and not out.aux_logits:
        raise ConfigError(f"train.stages: stage '{stage.name}' trains branch heads but the model has none")
    return objective(out, target, epoch=epoch, use_regularizers=stage.train != "branches")


def uses_ramp(stage: StageConfig) -> bool:
    """The beta ramp clock runs from the first stage that trains the fusion (stage 2 onwards)."""
    return stage.train != "branches"
