"""The CMAF-Net training objective: classification loss plus weighted regularisers (Eq. 9, with the corrections of docs/decisions.md).

``total = cls + beta1(t) * (kl_s + kl_t) + beta2(t) * redundancy
          + diversity_w * diversity + entropy_w * attn_entropy + orthogonality_w * orthogonality``

The redundancy is *penalised* (+beta2; Eq. 5/9 print a minus sign). ``beta_i(t) = regularizers.beta_i *
beta_ramp``: the caller passes the ramp (0 -> 1 over ``regularizers.ramp_epochs``, or 1 when fixed;
:func:`cmafnet.training.schedules.beta_ramp`) and the classification loss's ``epoch`` at every call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cmafnet.config import LossConfig, RegularizerConfig
from cmafnet.losses.classification import LOSSES, ClassificationLoss
from cmafnet.losses.regularizers import (
    AttentionEntropyRegularizer,
    attention_diversity,
    gaussian_kl,
    orthogonality,
    redundancy,
)
from cmafnet.models.output import ModelOutput


def create_loss(
    name: str, class_counts: Sequence[float] | Tensor | None = None, **kwargs: Any
) -> ClassificationLoss:
    """Build a registered classification loss (``ce``, ``focal``, ``cb``, ``ldam``, ``balanced_softmax``, ``acbfl``).

    Raises:
        ConfigError: unknown name (a ``ValueError``, with a "did you mean").
        ValueError: bad arguments, naming the argument.
    """
    return LOSSES.get(name)(class_counts, **kwargs)


def create_loss_from_config(
    loss_cfg: LossConfig, class_counts: Sequence[float] | Tensor | None, *, total_epochs: float | None = None
) -> ClassificationLoss:
    """Build the loss named by ``loss_cfg.name`` with the matching ``LossConfig`` fields.

    Args:
        loss_cfg: the ``loss`` section.
        class_counts: training samples per class.
        total_epochs: epochs the loss is trained for; LDAM needs it when ``loss.drw_epoch`` is unset
            (DRW then starts at 80% of it).
    """
    c = loss_cfg
    table: dict[str, dict[str, Any]] = {
        "ce": {"label_smoothing": c.label_smoothing},
        "focal": {"gamma": c.focal_gamma},
        "cb": {
            "beta": c.cb_beta,
            "loss_type": c.cb_loss_type,
            "gamma": c.focal_gamma,
            "label_smoothing": c.label_smoothing,
        },
        "ldam": {
            "max_margin": c.max_margin,
            "s": c.ldam_s,
            "drw": True,
            "drw_epoch": c.drw_epoch,
            "total_epochs": total_epochs,
            "beta": c.cb_beta,
            "label_smoothing": c.label_smoothing,
        },
        "balanced_softmax": {"label_smoothing": c.label_smoothing},
        "acbfl": {
            "gamma_base": c.gamma_base,
            "class_dependent_gamma": c.class_dependent_gamma,
            "dynamic_alpha": c.dynamic_alpha,
            "alpha_decay": c.alpha_decay,
            "entropy_weight": c.entropy_weight,
            "margin": c.margin,
            "max_margin": c.max_margin,
        },
    }
    LOSSES.get(c.name)  # unknown name -> ConfigError with a suggestion
    if c.name not in table:
        raise ValueError(f"loss '{c.name}' has no LossConfig mapping")
    return create_loss(c.name, class_counts, **table[c.name])


def class_entropy(class_prior: Sequence[float] | Tensor) -> float:
    """H(Y) in nats of a class prior (normalised here, so counts work too; empty classes add 0)."""
    p = torch.as_tensor(class_prior, dtype=torch.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum())


def mutual_info_lower_bound(ce: float | Tensor, class_prior: Sequence[float] | Tensor) -> float | Tensor:
    """Variational lower bound ``I(Z_fused; Y) >= H(Y) - CE`` in nats (Eq. 3).

    Args:
        ce: mean cross-entropy of the classifier (nats) on a data set.
        class_prior: the class prior of that data set (or its class counts).
    """
    return class_entropy(class_prior) - ce


def stage1_loss(out: ModelOutput, target: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Stage 1: the sum of cross-entropies of the temporary branch heads in ``out.aux_logits``.

    Returns:
        ``(total, terms)`` with ``terms`` = ``{"ce_<branch>": ..., "total": ...}`` (detached).
    """
    if not out.aux_logits:
        raise ValueError("aux_logits: stage 1 needs the branch heads (call the model with return_aux=True)")
    terms: dict[str, Tensor] = {}
    total: Tensor | None = None
    for name, logits in out.aux_logits.items():
        ce = F.cross_entropy(logits.float(), target.long())
        terms[f"ce_{name}"] = ce.detach()
        total = ce if total is None else total + ce
    assert total is not None
    terms["total"] = total.detach()
    return total, terms


class Objective(nn.Module):
    """Classification loss + information-theoretic and attention regularisers.

    Args:
        loss_cfg: the ``loss`` section (which classification loss, its parameters).
        reg_cfg: the ``regularizers`` section (weights, schedule, estimator).
        class_counts: training samples per class.
        num_heads: attention heads of the fusion block (``cfg.model.fusion.heads``), the size of the
            learned per-head entropy weights.
        total_epochs: epochs the objective is trained for (LDAM's DRW default, see
            :func:`create_loss_from_config`).

    The module holds parameters (the per-head entropy weights) and buffers (class weights): move it
    to the device and give ``objective.parameters()`` to the optimiser.
    """

    def __init__(
        self,
        loss_cfg: LossConfig,
        reg_cfg: RegularizerConfig,
        class_counts: Sequence[float] | Tensor,
        *,
        num_heads: int = 8,
        total_epochs: float | None = None,
    ):
        super().__init__()
        self.loss_cfg, self.reg_cfg = loss_cfg, reg_cfg
        self.loss = create_loss_from_config(loss_cfg, class_counts, total_epochs=total_epochs)
        self.entropy_reg = AttentionEntropyRegularizer(num_heads)
        self._compiled_terms: Callable[..., dict[str, Tensor]] | None = None

    def compile_regularizers(self, enable: bool = True, **compile_kw: Any) -> None:
        """Run :meth:`regularizer_terms` through ``torch.compile`` (inductor fuses the KL, redundancy,
        attention and orthogonality terms and their backward into few kernels); ``enable=False``
        goes back to eager. Its inputs are tensors and two booleans, so the schedules' changing
        weights cause no recompilation."""
        self._compiled_terms = torch.compile(self.regularizer_terms, **compile_kw) if enable else None

    def regularizer_terms(self, out: ModelOutput, use_kl: bool, use_redundancy: bool) -> dict[str, Tensor]:
        """The unweighted regulariser values that apply to ``out`` (absent: its inputs are None, its
        weight is 0, or, for the redundancy, the batch has one sample)."""
        r = self.reg_cfg
        values: dict[str, Tensor] = {}
        if use_kl:
            for side, mu, logvar in (("s", out.mu_s, out.logvar_s), ("t", out.mu_t, out.logvar_t)):
                if mu is not None and logvar is not None:
                    values[f"kl_{side}"] = gaussian_kl(mu, logvar)
        # The estimate needs two samples; a batch of one (never in training, drop_last) skips it.
        if use_redundancy and out.z_s is not None and out.z_t is not None and out.z_s.shape[0] >= 2:
            values["redundancy"] = redundancy(out.z_s, out.z_t, r.redundancy_estimator)
        if out.attn is not None:
            if r.diversity > 0 and out.attn.shape[1] > 1:
                values["diversity"] = attention_diversity(out.attn)
            if r.entropy > 0:
                values["attn_entropy"] = self.entropy_reg(out.attn)
        if r.orthogonality > 0 and out.f_s is not None and out.f_att is not None:
            values["orthogonality"] = orthogonality(out.f_s, out.f_att)
        return values

    def forward(
        self,
        out: ModelOutput,
        target: Tensor,
        *,
        epoch: float | Tensor,
        beta_ramp: float | Tensor,
        use_regularizers: bool = True,
    ) -> tuple[Tensor, dict[str, Tensor | float]]:
        """Total loss and its terms.

        Args:
            out: the model's structured output (``model(x, return_aux=True)``).
            target: ``(B,)`` class indices.
            epoch: fractional epoch for the scheduled classification loss (A-CBFL alpha, LDAM DRW).
            beta_ramp: the beta ramp in [0, 1] (``beta_i = regularizers.beta_i * beta_ramp``).
            use_regularizers: ``False`` gives the classification loss alone.

        ``epoch`` and ``beta_ramp`` are numbers, or 0-d device tensors in a captured step (never read
        on the host).

        Returns:
            ``(total, terms)``: ``terms`` holds detached 0-dim tensors for every computed term and
            ``total`` (call ``.item()`` when logging, to avoid a device sync per step), and ``beta1``,
            ``beta2`` (numbers, or tensors). Terms whose inputs are ``None`` (ablations) or whose
            configured weight is 0 are skipped and absent; a term the ramp weights by 0 is computed, so
            a run logs the same terms at every step. The keys: ``cls``, ``total``, ``beta1``,
            ``beta2`` and those of :meth:`regularizer_terms`.
        """
        cls = self.loss(out.logits, target, epoch)
        total = cls
        r = self.reg_cfg
        beta1, beta2 = r.beta1 * beta_ramp, r.beta2 * beta_ramp
        terms: dict[str, Tensor | float] = {"cls": cls.detach(), "beta1": beta1, "beta2": beta2}
        if use_regularizers:
            weights = {"kl_s": beta1, "kl_t": beta1, "redundancy": beta2, "diversity": r.diversity,
                       "attn_entropy": r.entropy, "orthogonality": r.orthogonality}  # fmt: skip
            values = (self._compiled_terms or self.regularizer_terms)(out, r.beta1 > 0, r.beta2 > 0)
            for name, value in values.items():
                total = total + weights[name] * value
                terms[name] = value.detach()
        terms["total"] = total.detach()
        return total, terms

    @property
    def entropy_weights(self) -> Tensor:
        """The normalised per-head entropy weights ``(H,)`` (for monitors)."""
        return self.entropy_reg.weights.detach()
