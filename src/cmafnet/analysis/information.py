"""Information-theoretic training monitors (paper §4.5, §6.3; Fig. 4).

All values are in nats and computed without gradients from a :class:`~cmafnet.models.ModelOutput`:

- ``I(Z;X)`` upper bound per branch: ``E_x KL(q(z|x) || N(0, I))`` of the variational bottleneck,
  summed over the feature dimension and averaged over tokens and samples (Alemi et al., 2017).
- ``I(Z_s;Z_t)`` estimate: Gaussian mutual information of the pooled bottleneck codes,
  ``0.5 (log|S_s| + log|S_t| - log|S|)``, with Ledoit-Wolf shrinkage covariances (sklearn) fitted
  on the whole validation set (a batch is far too small for a D x D covariance).
- ``I(Z_fused;Y)`` lower bound: ``H(Y) - CE`` (Barber & Agakov): the label entropy minus the
  classifier's cross-entropy; any classifier's CE upper-bounds ``H(Y|Z)``.
- attention entropy per head (mean over samples and query tokens of the key distribution's entropy)
  and the temperature per head; gate mean and standard deviation; class margins (mean over the
  samples of class c of ``logit_c - max_{j != c} logit_j``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from cmafnet.losses.regularizers import gaussian_kl_per_sample

# Per-sample KL(N(mu, exp(logvar)) || N(0, I)) of ``(B, N, D)`` or ``(B, D)`` -> ``(B,)``: the training
# regulariser's own definition (one implementation for the loss and the monitor).
kl_to_standard_normal = gaussian_kl_per_sample


def attention_entropy(attn: Tensor) -> Tensor:
    """Mean entropy per head of attention maps ``(B, H, N_q, N_k)`` (rows sum to 1) -> ``(H,)``."""
    a = attn.float().clamp_min(1e-12)
    return -(a * a.log()).sum(-1).mean(dim=(0, 2))


def class_margins(logits: Tensor, target: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Sum and count per class of ``logit_y - max_{j != y} logit_j``; returns ``((C,), (C,))``."""
    lg = logits.float()
    true = lg.gather(1, target[:, None]).squeeze(1)
    other = lg.scatter(1, target[:, None], float("-inf")).amax(1)
    margin = true - other
    sums = torch.zeros(num_classes, device=lg.device).index_add_(0, target, margin)
    counts = torch.zeros(num_classes, device=lg.device).index_add_(0, target, torch.ones_like(margin))
    return sums, counts


def label_entropy(counts: np.ndarray) -> float:
    """Entropy of the empirical label distribution (nats)."""
    p = np.asarray(counts, dtype=np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log(p)).sum())


def gaussian_mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """Gaussian MI estimate between samples ``a (N, Da)`` and ``b (N, Db)`` with Ledoit-Wolf shrinkage."""
    from sklearn.covariance import LedoitWolf

    if a.shape[0] < 3:
        return float("nan")

    def logdet(x: np.ndarray) -> float:
        cov = LedoitWolf().fit(x).covariance_
        sign, val = np.linalg.slogdet(cov)
        return float(val) if sign > 0 else float("nan")

    mi = 0.5 * (logdet(a) + logdet(b) - logdet(np.concatenate([a, b], axis=1)))
    return max(mi, 0.0)


class MonitorAccumulator:
    """Accumulates the monitors over the batches of an evaluation pass; :meth:`result` gives a flat
    dict of floats (keys such as ``mi_zs_x``, ``attn_entropy_h0``, ``tau_h0``, ``margin_c1``)."""

    def __init__(self, num_classes: int, max_codes: int = 4096):
        self.num_classes = num_classes
        self.max_codes = max_codes  # cap on stored pooled codes for the MI estimate
        self.n = 0
        self.sums: dict[str, float] = {}
        self.ce_sum = 0.0
        self.label_counts = np.zeros(num_classes)
        self.margin_sum = torch.zeros(num_classes)
        self.margin_count = torch.zeros(num_classes)
        self.attn_ent: Tensor | None = None
        self.tau: Tensor | None = None
        self.gate_sum = self.gate_sq = self.gate_n = 0.0
        self.z_s: list[np.ndarray] = []
        self.z_t: list[np.ndarray] = []
        self.n_codes = 0

    def _add(self, key: str, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value

    @torch.no_grad()
    def update(self, out: object, target: Tensor) -> None:
        """Add one batch. ``out`` is a ModelOutput; fields that are ``None`` are skipped."""
        b = int(target.shape[0])
        self.n += b
        logits = out.logits.float()
        self.ce_sum += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        self.label_counts += np.bincount(target.cpu().numpy(), minlength=self.num_classes)[: self.num_classes]
        s, c = class_margins(logits, target, self.num_classes)
        self.margin_sum += s.cpu()
        self.margin_count += c.cpu()
        for name, mu, lv in (("mi_zs_x", out.mu_s, out.logvar_s), ("mi_zt_x", out.mu_t, out.logvar_t)):
            if mu is not None and lv is not None:
                self._add(name, float(kl_to_standard_normal(mu, lv).sum()))
        if out.attn is not None:
            ent = attention_entropy(out.attn).cpu() * b
            self.attn_ent = ent if self.attn_ent is None else self.attn_ent + ent
        if out.tau is not None:
            self.tau = out.tau.detach().float().cpu()
        if out.gate is not None:
            g = out.gate.float()
            self.gate_sum += float(g.sum())
            self.gate_sq += float(g.pow(2).sum())
            self.gate_n += g.numel()
        if out.z_s is not None and out.z_t is not None and self.n_codes < self.max_codes:
            self.z_s.append(out.z_s.float().reshape(b, -1).cpu().numpy())
            self.z_t.append(out.z_t.float().reshape(b, -1).cpu().numpy())
            self.n_codes += b

    def result(self) -> dict[str, float]:
        if self.n == 0:
            return {}
        res = {k: v / self.n for k, v in self.sums.items()}
        ce = self.ce_sum / self.n
        res["val_ce"] = ce
        res["mi_zfused_y_lb"] = label_entropy(self.label_counts) - ce
        for c in range(self.num_classes):
            if self.margin_count[c] > 0:
                res[f"margin_c{c}"] = float(self.margin_sum[c] / self.margin_count[c])
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
        if self.z_s:
            res["mi_zs_zt"] = gaussian_mutual_information(np.concatenate(self.z_s), np.concatenate(self.z_t))
        return res
