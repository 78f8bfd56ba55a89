"""Information-theoretic and attention regularisers of CMAF-Net (paper §3.2, §4.3; corrections in docs/decisions.md).

All functions compute in float32 (float64 for the log-determinants) whatever the autocast dtype,
and return a scalar tensor that is differentiable in its inputs.

* :func:`gaussian_kl` -- KL(N(mu, sigma^2) || N(0, I)), the variational bound on I(Z; X) (Eq. 4).
* :func:`gaussian_mutual_information` -- I(Z_s; Z_t) under a joint-Gaussian model: the CCA bound
  ``-1/2 sum_i log(1 - rho_i^2)`` over canonical correlations, computed as
  ``1/2 [log det R_ss + log det R_tt - log det R]`` of the (shrunk) correlation matrix.
* :func:`normalized_hsic` -- the alternative dependence measure (``redundancy_estimator: hsic``).
* :func:`attention_diversity`, :func:`attention_entropy`, :class:`AttentionEntropyRegularizer`,
  :func:`orthogonality` -- the CMAF block regularisers.
* :func:`ramp_weight` -- the beta_1 / beta_2 schedule.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def gaussian_kl_per_sample(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) in nats per sample, in float32.

    Summed over the latent dimension (last axis), averaged over the tokens of each sample.
    Inputs ``(B, N, D)`` or ``(B, D)``; returns ``(B,)``. The training monitors use it directly
    (the ``I(Z;X)`` bound); :func:`gaussian_kl` is its batch mean.
    """
    if mu.shape != logvar.shape:
        raise ValueError(f"mu {tuple(mu.shape)} and logvar {tuple(logvar.shape)} must have the same shape")
    mu, logvar = mu.float(), logvar.float()
    kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(dim=-1)
    return kl.reshape(kl.shape[0], -1).mean(dim=1)


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) in nats.

    Summed over the latent dimension (last axis), averaged over every other axis (batch and
    tokens), i.e. the KL *per token*. Inputs ``(B, N, D)`` or ``(B, D)``.
    """
    return gaussian_kl_per_sample(mu, logvar).mean()


def _standardize(x: Tensor, eps: float = 1e-8) -> Tensor:
    """Zero-mean, unit (biased) variance columns of ``(B, d)``; constant columns become 0."""
    x = x - x.mean(dim=0, keepdim=True)
    return x / (x.square().mean(dim=0, keepdim=True).sqrt() + eps)


def _ledoit_wolf(n: int, d: int, trace_s: Tensor, frob2_s: Tensor, row_sq: Tensor) -> Tensor:
    """Ledoit-Wolf intensity from the moments of centred ``x`` ``(n, d)`` with ``s = x^T x / n``.

    ``trace_s = tr(s)``, ``frob2_s = ||s||_F^2``, ``row_sq`` the ``(n,)`` squared row norms of ``x``.
    These come as cheaply from the ``(n, n)`` Gram matrix ``x x^T`` as from ``s`` itself
    (``||x^T x||_F = ||x x^T||_F``), so the estimate never needs the ``(d, d)`` matrix when n < d.
    A 0-d tensor on the device of ``x`` (no host sync, no graph break): ``0`` when the target
    distance ``delta`` is 0, else ``min(beta, delta) / delta`` clamped to [0, 1].
    """
    mu = trace_s / d
    beta_ = (row_sq.square().sum() / n - frob2_s) / (d * n)
    delta = (frob2_s - 2.0 * mu * trace_s + d * mu**2) / d
    beta = torch.minimum(beta_, delta)
    # delta == 0 would divide by zero; the where selects 0 there (the NaN branch is discarded).
    safe = torch.where(delta == 0, torch.ones_like(delta), delta)
    return torch.where(delta == 0, torch.zeros_like(delta), (beta / safe).clamp(0.0, 1.0))


def _ledoit_wolf_from_cov(x: Tensor, s: Tensor) -> Tensor:
    """:func:`_ledoit_wolf` of centred ``x`` ``(n, d)`` and its covariance ``s = x^T x / n`` ``(d, d)``."""
    n, d = x.shape
    return _ledoit_wolf(n, d, torch.diagonal(s).sum(), s.square().sum(), x.square().sum(dim=1))


def _ledoit_wolf_from_gram(x: Tensor, g: Tensor) -> Tensor:
    """:func:`_ledoit_wolf` of centred ``x`` ``(n, d)`` and its Gram matrix ``g = x x^T`` ``(n, n)``."""
    n, d = x.shape
    diag = torch.diagonal(g)  # squared row norms of x
    return _ledoit_wolf(n, d, diag.sum() / n, g.square().sum() / n**2, diag)


@torch.no_grad()
def ledoit_wolf_shrinkage(x: Tensor) -> Tensor:
    """Ledoit-Wolf optimal shrinkage intensity of the covariance of centred ``x`` ``(n, d)``.

    The same formula as ``sklearn.covariance.ledoit_wolf_shrinkage`` (target ``mu * I``), in torch
    so it runs on the device; cross-checked against sklearn in the tests. Returns a 0-d tensor in
    the dtype of ``x`` (at least float32) on its device: no ``.item()``, so no device-to-host sync
    and no ``torch.compile`` graph break.
    """
    if x.ndim != 2:
        raise ValueError(f"x must be (n, d), got shape {tuple(x.shape)}")
    x = x.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    n, d = x.shape
    # The smaller of the two (n, n) / (d, d) products gives the same moments.
    return _ledoit_wolf_from_gram(x, x @ x.T) if n < d else _ledoit_wolf_from_cov(x, x.T @ x / n)


def _cholesky_log_diag(m: Tensor) -> Tensor:
    """``log diag(L)`` of the Cholesky factor ``L`` of a symmetric positive-definite ``m``; NaN where
    ``m`` is not positive definite.

    ``cholesky_ex`` instead of ``cholesky``: the latter checks its status on the host (a device sync
    every training step, not allowed inside a CUDA graph). A failed factorisation gives NaN, which
    the trainer's non-finite check turns into a skipped step, instead of an exception.
    """
    chol, info = torch.linalg.cholesky_ex(m)
    log_diag = chol.diagonal(dim1=-2, dim2=-1).log()
    return torch.where(info.unsqueeze(-1) == 0, log_diag, torch.full_like(log_diag, math.nan))


def _logdet_pd(m: Tensor) -> Tensor:
    """log det of a symmetric positive-definite matrix via Cholesky (NaN when it is not)."""
    return 2.0 * _cholesky_log_diag(m).sum(-1)


def _mi_from_covariance(x: Tensor, d_s: int, shrinkage: float | Literal["auto"], jitter: float) -> Tensor:
    """The Gaussian MI of :func:`gaussian_mutual_information` through the ``(d, d)`` correlation matrix."""
    n, d = x.shape
    s = x.T @ x / n  # (d, d) sample correlation, float64
    with torch.no_grad():
        s_ = s.detach()
        lam: Tensor | float = (
            _ledoit_wolf_from_cov(x.detach(), s_) if shrinkage == "auto" else float(shrinkage)
        )
        mu = torch.diagonal(s_).sum() / d  # = x.square().sum() / (n d)
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    r = (1.0 - lam) * s + (lam * mu + jitter) * eye  # (d, d)
    log_diag = _cholesky_log_diag(r)  # (d,)
    # 1/2 [log det R_ss + log det R_tt - log det R] with log det R = 2 sum(log_diag) and
    # log det R_ss = 2 sum(log_diag[:d_s]) (the leading block of a Cholesky factor is the factor
    # of the leading block): the R_ss part cancels exactly.
    return 0.5 * _logdet_pd(r[d_s:, d_s:]) - log_diag[d_s:].sum()


def _mi_from_gram(x: Tensor, d_s: int, shrinkage: float | Literal["auto"], jitter: float) -> Tensor:
    """The same MI through ``(n, n)`` Gram matrices: exact, and far cheaper when n < d.

    With ``R_B = a X_B^T X_B / n + c I`` for a block ``B`` of the columns of ``x`` (``a = 1 - lambda``,
    ``c = lambda mu + jitter``), Sylvester's determinant identity gives
    ``log det R_B = d_B log c + log det(I_n + k X_B X_B^T)`` with ``k = a / (c n)``. The ``log c``
    terms of ``R_ss``, ``R_tt`` and ``R`` cancel (``d_s + d_t = d``), leaving three ``(n, n)``
    log-determinants of matrices whose eigenvalues are all >= 1.
    """
    n, d = x.shape
    x_s, x_t = x[:, :d_s], x[:, d_s:]
    g_s, g_t = x_s @ x_s.T, x_t @ x_t.T  # (n, n) each, float64
    g = g_s + g_t  # (n, n) Gram matrix of all of x
    with torch.no_grad():
        g_ = g.detach()
        lam: Tensor | float = (
            _ledoit_wolf_from_gram(x.detach(), g_) if shrinkage == "auto" else float(shrinkage)
        )
        mu = torch.diagonal(g_).sum() / (n * d)  # = tr(x^T x / n) / d
        k = (1.0 - lam) / ((lam * mu + jitter) * n)
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    # 1/2 log det of each (n, n) matrix. Three unbatched factorisations, not one batched call: on
    # CUDA a batch goes to cusolver's potrfBatched, which has not been checked under CUDA-graph
    # capture here; the unbatched potrf has (the trainer's graph step), and three 128 x 128
    # factorisations cost microseconds.
    half = [_cholesky_log_diag(m * k + eye).sum() for m in (g_s, g_t, g)]
    return half[0] + half[1] - half[2]


def gaussian_mutual_information(
    z_s: Tensor,
    z_t: Tensor,
    *,
    shrinkage: float | Literal["auto"] = "auto",
    jitter: float = 1e-6,
) -> Tensor:
    """Gaussian (CCA) estimate of I(Z_s; Z_t) in nats from a batch.

    For jointly Gaussian variables ``I = -1/2 sum_i log(1 - rho_i^2)`` over the canonical
    correlations ``rho_i``; equivalently ``1/2 [log det R_ss + log det R_tt - log det R]`` with R
    the correlation matrix of ``[z_s, z_t]``. With few samples per dimension the sample R is
    (near) singular and every rho -> 1, so R is shrunk toward ``mu * I``:
    ``R <- (1 - lambda) R + lambda mu I``, with the Ledoit-Wolf intensity (``"auto"``, computed
    without gradient) or a fixed ``lambda`` in [0, 1]; ``jitter`` is added to the diagonal for the
    Cholesky. Shrinkage biases the estimate toward 0 (it is a lower estimate of the Gaussian MI).

    The factorisations are float64 (a near-singular R loses the log-determinant in float32, and
    TF32 matmuls would make it indefinite). With fewer samples than dimensions (training: 128
    samples of 480 + 480) the three log-determinants are taken of ``(n, n)`` Gram matrices instead
    of the ``(d, d)`` blocks of R, the same value by Sylvester's identity (:func:`_mi_from_gram`);
    otherwise from R (:func:`_mi_from_covariance`). Either way the Ledoit-Wolf intensity reuses
    the matrix already built and stays a device tensor: no host sync.

    Args:
        z_s: ``(B, d_s)`` samples of the first variable.
        z_t: ``(B, d_t)`` samples of the second variable.
        shrinkage: ``"auto"`` or a float in [0, 1].
        jitter: added to the diagonal.

    Raises:
        ValueError: naming ``z_s`` / ``z_t`` for wrong shapes or fewer than 2 samples, and
            ``shrinkage`` when out of range.
    """
    if z_s.ndim != 2 or z_t.ndim != 2:
        raise ValueError(f"z_s and z_t must be (B, d), got {tuple(z_s.shape)} and {tuple(z_t.shape)}")
    if z_s.shape[0] != z_t.shape[0]:
        raise ValueError(f"z_s and z_t need the same batch size, got {z_s.shape[0]} and {z_t.shape[0]}")
    if z_s.shape[0] < 2:
        raise ValueError(f"z_s: the redundancy estimate needs >= 2 samples, got {z_s.shape[0]}")
    if shrinkage != "auto" and not (isinstance(shrinkage, (int, float)) and 0.0 <= shrinkage <= 1.0):
        raise ValueError(f"shrinkage must be 'auto' or in [0, 1], got {shrinkage!r}")
    x = _standardize(torch.cat([z_s, z_t], dim=1).double())  # (B, d_s + d_t)
    n, d = x.shape
    estimate = _mi_from_gram if n < d else _mi_from_covariance
    mi = estimate(x, z_s.shape[1], shrinkage, jitter)
    # Fischer's inequality makes mi >= 0; clamp only float64 round-off.
    return mi.clamp_min(0.0).float()


def normalized_hsic(z_s: Tensor, z_t: Tensor) -> Tensor:
    """Normalised HSIC with Gaussian kernels (median-distance bandwidth), in [0, 1].

    ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))`` with the biased estimator ``tr(K H L H)``; a
    dependence measure (0 for independence), not a mutual information in nats.
    """
    if z_s.ndim != 2 or z_t.ndim != 2 or z_s.shape[0] != z_t.shape[0]:
        raise ValueError(
            f"z_s and z_t must be (B, d) with the same B, got {tuple(z_s.shape)}, {tuple(z_t.shape)}"
        )
    if z_s.shape[0] < 2:
        raise ValueError(f"z_s: HSIC needs >= 2 samples, got {z_s.shape[0]}")

    def centred_kernel(z: Tensor) -> Tensor:
        sq = torch.cdist(z, z).square()  # (B, B)
        with torch.no_grad():
            off = sq[~torch.eye(len(z), dtype=torch.bool, device=z.device)]
            bw = off.median().clamp_min(1e-12)
        k = torch.exp(-sq / bw)
        return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()

    k, lm = centred_kernel(z_s.float()), centred_kernel(z_t.float())
    kl, kk, ll = (k * lm).sum(), (k * k).sum(), (lm * lm).sum()
    return (kl / (kk * ll).sqrt().clamp_min(1e-12)).clamp_min(0.0)


def redundancy(z_s: Tensor, z_t: Tensor, estimator: Literal["gaussian", "hsic"] = "gaussian") -> Tensor:
    """The redundancy I(Z_s; Z_t) estimate used by the objective (penalised with +beta_2)."""
    if estimator == "gaussian":
        return gaussian_mutual_information(z_s, z_t)
    if estimator == "hsic":
        return normalized_hsic(z_s, z_t)
    raise ValueError(f"estimator must be 'gaussian' or 'hsic', got {estimator!r}")


def _check_attn(attn: Tensor) -> Tensor:
    if attn.ndim != 4:
        raise ValueError(f"attn must be (B, H, N_s, N_t), got shape {tuple(attn.shape)}")
    return attn.float()


def attention_diversity(attn: Tensor, eps: float = 1e-12) -> Tensor:
    """Diversity loss: minus the mean pairwise Frobenius distance between heads' attention maps.

    Each row of an attention map lies on the simplex, so ``||A_h - A_g||_F^2 <= 2 N_s``; distances
    are divided by ``sqrt(2 N_s)`` and the loss lies in [-1, 0] (-1: heads attend to disjoint keys,
    0: identical heads). One head gives 0.

    Args:
        attn: ``(B, H, N_s, N_t)`` row-stochastic attention maps.
    """
    attn = _check_attn(attn)
    b, h, n_s, _ = attn.shape
    if h < 2:
        return attn.new_zeros(())
    flat = attn.reshape(b, h, -1)  # (B, H, N_s*N_t)
    gram = flat @ flat.transpose(1, 2)  # (B, H, H)
    sq_norm = gram.diagonal(dim1=1, dim2=2)  # (B, H)
    sq_dist = (sq_norm[:, :, None] + sq_norm[:, None, :] - 2.0 * gram).clamp_min(0.0)  # (B, H, H)
    iu = torch.triu_indices(h, h, offset=1, device=attn.device)
    pair = sq_dist[:, iu[0], iu[1]] / (2.0 * n_s)  # (B, H(H-1)/2) in [0, 1]
    return -(pair + eps).sqrt().mean()


def attention_entropy_nats(attn: Tensor) -> Tensor:
    """Mean entropy in nats of each head's attention rows (over samples and queries); shape ``(H,)``.

    The quantity of the paper's Fig. 4 (between 0 and ``log N_t``); the training monitor logs it and
    :func:`attention_entropy` divides it by ``log N_t``.
    """
    attn = _check_attn(attn)
    # a * log(max(a, tiny)): value and gradient finite at a = 0.
    ent = -(attn * attn.clamp_min(1e-12).log()).sum(dim=-1)  # (B, H, N_s)
    return ent.mean(dim=(0, 2))


def attention_entropy(attn: Tensor) -> Tensor:
    """:func:`attention_entropy_nats` divided by ``log N_t`` (so in [0, 1]); shape ``(H,)``.

    The penalty uses the normalised value so its weight does not depend on the token count.
    """
    n_t = attn.shape[-1]
    if n_t < 2:
        return _check_attn(attn).new_zeros(attn.shape[1])
    return attention_entropy_nats(attn) / math.log(n_t)


class AttentionEntropyRegularizer(nn.Module):
    """Entropy regularisation with learned per-head weights (paper §4.3).

    ``loss = sum_h softmax(w)_h * H_h`` with ``H_h`` the normalised attention entropy of head h.
    Minimising it sharpens attention ("focused attention when beneficial"); the softmax keeps the
    weights positive and summing to 1, so they cannot collapse to zero. The weights ``w`` are
    parameters: put ``objective.parameters()`` in the optimiser.
    """

    def __init__(self, num_heads: int):
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        self.num_heads = num_heads
        self.head_logits = nn.Parameter(torch.zeros(num_heads))  # uniform weights at the start

    @property
    def weights(self) -> Tensor:
        """The normalised per-head weights ``(H,)`` (sum to 1)."""
        return self.head_logits.softmax(dim=0)

    def forward(self, attn: Tensor) -> Tensor:
        if attn.ndim != 4 or attn.shape[1] != self.num_heads:
            raise ValueError(
                f"num_heads: the regulariser has {self.num_heads} heads but attn has shape {tuple(attn.shape)} "
                "(pass num_heads=cfg.model.fusion.heads to Objective)"
            )
        return (self.weights * attention_entropy(attn)).sum()

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"


def orthogonality(f_s: Tensor, f_att: Tensor) -> Tensor:
    """Mean squared cosine similarity between each sample's flattened ``F_s`` and ``F_att``, in [0, 1].

    Args:
        f_s: ``(B, ...)`` spatial features (e.g. ``(B, D, h, w)``).
        f_att: attended features of the same shape.
    """
    if f_s.shape != f_att.shape:
        raise ValueError(f"f_s {tuple(f_s.shape)} and f_att {tuple(f_att.shape)} must have the same shape")
    cos = F.cosine_similarity(f_s.float().flatten(1), f_att.float().flatten(1), dim=1, eps=1e-8)  # (B,)
    return cos.square().mean()


def ramp_weight(
    value: float, progress: float, *, schedule: Literal["ramp", "fixed"] = "ramp", ramp_epochs: float = 10.0
) -> float:
    """beta at ``progress`` epochs into the ramp: linear from 0 to ``value`` over ``ramp_epochs``.

    ``schedule="fixed"`` (and ``ramp_epochs=0``) gives ``value`` at once.
    """
    if schedule not in ("ramp", "fixed"):
        raise ValueError(f"schedule must be 'ramp' or 'fixed', got {schedule!r}")
    if not math.isfinite(progress) or progress < 0:
        raise ValueError(f"progress must be finite and >= 0, got {progress}")
    if schedule == "fixed" or ramp_epochs <= 0:
        return float(value)
    return float(value) * min(1.0, progress / ramp_epochs)
