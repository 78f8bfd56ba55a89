"""What each kind of stage trains and which loss it minimises.

The stage list itself is data (``cfg.train.stages``, paper §4.5)::

    branches   30 ep  lr 1e-3 cosine         spatial + contextual + temporary heads, CE on aux_logits
    fusion     40 ep  lr 1e-4 warmup_cosine  fusion + head (extractors frozen, BN in eval), beta ramp
    end_to_end 30 ep  lr 1e-5 cyclic         everything but the temporary heads, full objective

A one-stage schedule (``train: all``) is the "w/o progressive training" ablation.

:func:`prepare_stage` builds what a stage trains with (frozen roles, AdamW, SAM, clipper, the
DDP/compile wrapping and the :class:`~cmafnet.training.step.TrainStep`, captured once under
``train.cuda_graph``): the trainer runs the :class:`StageStep` it returns and ``cmafnet bench`` times it.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmafnet.config import StageConfig, TrainConfig
from cmafnet.errors import ConfigError
from cmafnet.losses.objective import stage1_loss
from cmafnet.training.clipping import GradClipper
from cmafnet.training.graphs import GraphMode
from cmafnet.training.optim import build_adamw, param_groups
from cmafnet.training.sam import SAM
from cmafnet.training.schedules import ScheduleValues
from cmafnet.training.step import StepResult, TrainStep

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


def branch_groups(model: nn.Module, named: list[tuple[str, nn.Parameter]]) -> list[list[nn.Parameter]]:
    """Stage 1's independent parts: each branch with its temporary head (``aux_heads.<branch>``).

    The two branches share no parameter and each head reads one branch, so with SAM's radius and the
    clipping taken per part (its own gradient norm) each branch's update is the one it would get if it
    were trained alone (docs/decisions/training.md).
    """
    groups: dict[str, list[nn.Parameter]] = {}
    for name, p in named:
        top, _, rest = name.partition(".")
        part = rest.partition(".")[0] if top == "aux_heads" else top
        groups.setdefault(part, []).append(p)
    return list(groups.values())


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
    out: object, target: Tensor, sched: ScheduleValues, *, stage: StageConfig, objective: nn.Module
) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss a stage minimises and its detached terms for logging (the step's ``loss_fn``).

    ``loss: ce`` in a ``branches`` stage: summed cross-entropy of the temporary branch heads
    (``out.aux_logits``); ``loss: ce`` elsewhere: cross-entropy of the main logits;
    ``loss: objective``: the full objective at the step's loss clock and beta ramp, regularisers on
    outside ``branches`` stages.
    """
    if stage.train == "branches" and not out.aux_logits:
        raise ConfigError(
            f"train.stages: stage '{stage.name}' trains branch heads but the model returns no aux_logits"
        )
    if stage.loss == "ce":
        if stage.train == "branches":
            return stage1_loss(out, target)  # sum of the branch heads' cross-entropies
        total = F.cross_entropy(out.logits.float(), target)
        return total, {"total": total.detach()}
    return objective(
        out, target, epoch=sched.epoch, beta_ramp=sched.beta_ramp, use_regularizers=stage.train != "branches"
    )


@dataclass
class StageStep:
    """What one stage trains with; ``stage_step(x, y, schedule, after_forward=None) -> StepResult`` is one
    optimiser update (see :class:`~cmafnet.training.step.TrainStep`)."""

    stage: StageConfig
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]
    step: TrainStep
    graph: GraphMode | None  # train.cuda_graph: the step captured once, replayed

    def __call__(
        self, x: Tensor, y: Tensor, sched: ScheduleValues, after_forward: Callable[[], None] | None = None
    ) -> StepResult:
        if self.graph is not None:
            return self.graph(x, y, sched, after_forward)
        return self.step.result(self.step(x, y, sched, after_forward))


def prepare_stage(
    model: nn.Module,
    objective: nn.Module,
    stage: StageConfig,
    tc: TrainConfig,
    roles: dict[str, list[nn.Parameter]],
    *,
    device: torch.device,
    distributed: bool = False,
    scaler: torch.amp.GradScaler | None = None,
) -> StageStep:
    """Freeze what ``stage`` does not train and build its optimiser, SAM, clipper and step.

    Args:
        model: the unwrapped model (DDP and ``torch.compile`` wrap it here, per stage).
        objective: the stage's objective (its own parameters train in ``loss: objective`` stages).
        roles: :func:`initial_roles` of ``model``, taken before any stage froze anything.
        distributed: wrap the model in DDP (one process per device).
        scaler: the run's GradScaler (fp16), kept across stages.
    """
    named = configure_trainable(model, stage, roles)
    uses_objective = stage.loss == "objective"
    for p in objective.parameters():
        p.requires_grad_(uses_objective)
    obj_params = list(objective.parameters()) if uses_objective else []
    groups = param_groups(named, tc.weight_decay, extra_no_decay=obj_params)
    params = [p for g in groups for p in g["params"]]
    optimizer = build_adamw(groups, stage.lr, fused=tc.fused_adamw, device=device)
    sam = SAM(params, tc.sam.rho, tc.sam.adaptive) if tc.sam.enabled else None
    train_model: nn.Module = model
    gc.collect()  # free the previous stage's DDP wrapper (its reducer hooks go with it)
    if distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        # Stages freeze parts of the model; a frozen role may still sit on the forward path.
        train_model = DDP(train_model, device_ids=ids, find_unused_parameters=True)
    if tc.compile:
        train_model = torch.compile(train_model)
    loss = partial(stage_loss, stage=stage, objective=objective)
    step = TrainStep(
        train_model, loss, optimizer, params, clipper=GradClipper(tc.clip, device), sam=sam, amp=tc.amp,
        sdpa_backend=tc.sdpa_backend, scaler=scaler, accumulate=tc.accumulate_steps, graph_safe=tc.cuda_graph,
        sync_ranks=distributed, groups=branch_groups(model, named) if stage.train == "branches" else None,
    )  # fmt: skip
    graph = GraphMode(step) if tc.cuda_graph else None
    log.info("stage '%s' (%s): %d trainable parameters, lr %.2e", stage.name, stage.train,
             sum(p.numel() for p in params), stage.lr)  # fmt: skip
    return StageStep(stage, optimizer, params, step, graph)
