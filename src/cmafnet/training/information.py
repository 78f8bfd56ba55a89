"""Information-theoretic training monitors (paper §4.5, §6.3; Fig. 4), accumulated over a validation pass.

All values are in nats and computed without gradients from a :class:`~cmafnet.models.ModelOutput`.
Each quantity the objective penalises is monitored with the objective's own definition
(:mod:`cmafnet.losses.regularizers`), on the whole validation pass instead of one batch:

- ``mi_zs_x`` / ``mi_zt_x``: the ``I(Z;X)`` upper bound per branch, ``E_x KL(q(z|x) || N(0, I))`` of the
  variational bottleneck (:func:`~cmafnet.losses.regularizers.gaussian_kl_per_sample`, the KL terms).
- ``mi_zs_zt``: the Gaussian (CCA) estimate of ``I(Z_s;Z_t)`` of the pooled bottleneck codes with
  Ledoit-Wolf shrinkage (:func:`~cmafnet.losses.regularizers.gaussian_mutual_information`, the
  redundancy term), from up to ``max_codes`` validation samples.
- ``attn_entropy_h<h>``: mean attention entropy per head in nats, as Fig. 4 plots it
  (:func:`~cmafnet.losses.regularizers.attention_entropy_nats`; the penalty divides it by ``log N_t``).

With the classification loss's per-sample weights (``loss_weights``), ``loss_weight_c<c>``: the mean
weight of class c's samples on their ``-log p`` term (A-CBFL: ``alpha_c(t) * (1 - p_c)^{gamma_c}``), from
which the trainer logs the effective learning rate per class (``eff_lr_c<c>`` = lr x that weight).

And what the objective does not penalise: the ``I(Z_fused;Y)`` lower bound ``H(Y) - CE`` (Barber &
Agakov: any classifier's cross-entropy upper-bounds ``H(Y|Z)``), the temperature per head, gate mean
and standard deviation, and class margins (mean over the samples of class c of
``logit_c - max_{j != c} logit_j``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from cmafnet.losses.objective import mutual_info_lower_bound
from cmafnet.losses.regularizers import (
    attention_entropy_nats,
    gaussian_kl_per_sample,
    gaussian_mutual_information,
)


def class_margins(logits: Tensor, target: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Sum and count per class of ``logit_y - max_{j != y} logit_j``; returns ``((C,), (C,))``."""
    lg = logits.float()
    true = lg.gather(1, target[:, None]).squeeze(1)
    other = lg.scatter(1, target[:, None], float("-inf")).amax(1)
    margin = true - other
    sums = torch.zeros(num_classes, device=lg.device).index_add_(0, target, margin)
    counts = torch.zeros(num_classes, device=lg.device).index_add_(0, target, torch.ones_like(margin))
    return sums, counts


class MonitorAccumulator:
    """Accumulates the monitors over the batches of an evaluation pass; :meth:`result` gives a flat
    dict of floats (keys such as ``mi_zs_x``, ``attn_entropy_h0``, ``tau_h0``, ``margin_c1``)."""

    def __init__(
        self,
        num_classes: int,
        max_codes: int = 4096,
        loss_weights: Callable[[Tensor, Tensor], Tensor] | None = None,
    ):
        self.num_classes = num_classes
        self.loss_weights = loss_weights  # (logits, target) -> (B,) weights of the classification loss
        self.weight_sum = torch.zeros(num_classes, dtype=torch.float64)
        self.max_codes = max_codes  # cap on stored pooled codes for the I(Z_s;Z_t) estimate
        self.n = 0
        self.sums: dict[str, float] = {}
        self.ce_sum = 0.0
        self.margin_sum = torch.zeros(num_classes)
        self.margin_count = torch.zeros(num_classes)  # samples per class
        self.attn_ent: Tensor | None = None
        self.tau: Tensor | None = None
        self.gate_sum = self.gate_sq = self.gate_n = 0.0
        self.z_s: list[Tensor] = []
        self.z_t: list[Tensor] = []
        self.n_codes = 0

    @torch.no_grad()
    def update(self, out: object, target: Tensor) -> None:
        """Add one batch. ``out`` is a ModelOutput; fields that are ``None`` are skipped."""
        b = int(target.shape[0])
        self.n += b
        logits = out.logits.float()
        self.ce_sum += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        s, c = class_margins(logits, target, self.num_classes)
        self.margin_sum += s.cpu()
        self.margin_count += c.cpu()
        if self.loss_weights is not None:
            w = self.loss_weights(logits, target).detach().double()
            self.weight_sum += w.new_zeros(self.num_classes).index_add_(0, target, w).cpu()
        for name, mu, lv in (("mi_zs_x", out.mu_s, out.logvar_s), ("mi_zt_x", out.mu_t, out.logvar_t)):
            if mu is not None and lv is not None:
                self.sums[name] = self.sums.get(name, 0.0) + float(gaussian_kl_per_sample(mu, lv).sum())
        if out.attn is not None:
            ent = attention_entropy_nats(out.attn).cpu() * b
            self.attn_ent = ent if self.attn_ent is None else self.attn_ent + ent
        if out.tau is not None:
            self.tau = out.tau.detach().float().cpu()
        if out.gate is not None:
            g = out.gate.float()
            self.gate_sum += float(g.sum())
            self.gate_sq += float(g.pow(2).sum())
            self.gate_n += g.numel()
        if out.z_s is not None and out.z_t is not None and self.n_codes < self.max_codes:
            self.z_s.append(out.z_s.float().reshape(b, -1).cpu())
            self.z_t.append(out.z_t.float().reshape(b, -1).cpu())
            self.n_codes += b

    def result(self) -> dict[str, float]:
        if self.n == 0:
            return {}
        res = {k: v / self.n for k, v in self.sums.items()}
        ce = self.ce_sum / self.n
        res["val_ce"] = ce
        res["mi_zfused_y_lb"] = mutual_info_lower_bound(ce, self.margin_count)
        for c in range(self.num_classes):
            if self.margin_count[c] > 0:
                res[f"margin_c{c}"] = float(self.margin_sum[c] / self.margin_count[c])
                if self.loss_weights is not None:
                    res[f"loss_weight_c{c}"] = float(self.weight_sum[c] / self.margin_count[c])
        if self.attn_ent is not None:
            for h, v in enumerate((self.attn_ent / self.n).tolist()):
                res[f"attn_entropy_h{h}"] = v
        if self.tau is not None:
            for h, v in enumerate(self.tau.tolist()):
                res[f"tau_h{h}"] = v
        if self.gate_n:
            mean = self.gate_sum / self.gate_n
            res["gate_mean"] = mean
            res["gate_std"] = math.sqrt(max(self.gate_sq / self.gate_n - mean * mean, 0.0))
        if self.n_codes >= 2:
            z_s, z_t = torch.cat(self.z_s)[: self.max_codes], torch.cat(self.z_t)[: self.max_codes]
            res["mi_zs_zt"] = float(gaussian_mutual_information(z_s, z_t))
        return res
