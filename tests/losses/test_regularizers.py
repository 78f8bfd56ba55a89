"""Regularisers: KL, redundancy estimators, attention diversity / entropy, orthogonality, schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.covariance import ledoit_wolf_shrinkage as sk_ledoit_wolf_shrinkage

from cmafnet.losses import (
    AttentionEntropyRegularizer,
    attention_diversity,
    attention_entropy,
    gaussian_kl,
    gaussian_mutual_information,
    normalized_hsic,
    orthogonality,
    ramp_weight,
)
from cmafnet.losses.regularizers import ledoit_wolf_shrinkage


def _pairs(rho: float, n: int = 4000, d: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``d`` independent pairs (z_s[:, i], z_t[:, i]) with correlation ``rho``."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g)
    b = torch.randn(n, d, generator=g)
    return a, rho * a + math.sqrt(1 - rho**2) * b


def test_kl_is_zero_at_the_prior_and_matches_closed_form() -> None:
    assert gaussian_kl(torch.zeros(4, 7, 16), torch.zeros(4, 7, 16)).item() == 0.0
    mu, logvar = torch.randn(3, 5, 8), torch.randn(3, 5, 8)
    # torch.distributions as the reference: sum over latent dims, mean over batch and tokens.
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    ref = torch.distributions.kl_divergence(q, p).sum(-1).mean()
    torch.testing.assert_close(gaussian_kl(mu, logvar), ref)
    with pytest.raises(ValueError, match="logvar"):
        gaussian_kl(torch.zeros(2, 3), torch.zeros(2, 4))


def test_gaussian_mi_matches_analytic_value() -> None:
    for rho in (0.5, 0.9):
        z_s, z_t = _pairs(rho)
        analytic = -0.5 * math.log(1 - rho**2) * 4
        est = gaussian_mutual_information(z_s, z_t, shrinkage=0.0).item()
        assert est == pytest.approx(analytic, rel=0.05), (rho, est, analytic)


@pytest.mark.parametrize("estimator", ["gaussian", "hsic"])
def test_redundancy_near_zero_when_independent_and_grows_with_correlation(estimator: str) -> None:
    # HSIC (in [0, 1]) has an O(1/n) positive bias under independence; the Gaussian MI is in nats.
    n, near_zero = (4000, 0.02) if estimator == "gaussian" else (300, 0.05)
    fn = gaussian_mutual_information if estimator == "gaussian" else normalized_hsic
    values = [fn(*_pairs(rho, n=n)).item() for rho in (0.0, 0.5, 0.9)]
    assert values[0] < near_zero, values
    assert values[0] < values[1] < values[2], values


def test_gaussian_mi_is_finite_and_differentiable_with_more_dims_than_samples() -> None:
    """The training regime (B=32, d=2x64): singular sample covariance, Ledoit-Wolf shrinkage keeps it finite."""
    z_s = torch.randn(32, 64, requires_grad=True)
    z_t = (0.8 * z_s + 0.2 * torch.randn(32, 64)).detach().requires_grad_(True)
    mi = gaussian_mutual_information(z_s, z_t)
    mi.backward()
    assert torch.isfinite(mi) and mi > 0
    assert torch.isfinite(z_s.grad).all() and z_s.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="z_s"):
        gaussian_mutual_information(torch.randn(1, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match="shrinkage"):
        gaussian_mutual_information(z_s, z_t, shrinkage=1.5)


def test_ledoit_wolf_intensity_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    for n, d in ((40, 10), (16, 30)):
        x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
        x = x - x.mean(0)
        ours = ledoit_wolf_shrinkage(torch.from_numpy(x))
        assert ours == pytest.approx(float(sk_ledoit_wolf_shrinkage(x)), rel=1e-6)


@pytest.mark.parametrize("shrinkage", ["auto", 0.3])
@pytest.mark.parametrize(("n", "d_s", "d_t"), [(12, 20, 16), (64, 5, 7)])
def test_gaussian_mi_gram_and_covariance_forms_agree(
    shrinkage: str | float, n: int, d_s: int, d_t: int
) -> None:
    """The (n, n) Gram form (used when n < d) equals the (d, d) form in value and gradient, both ways round."""
    from cmafnet.losses.regularizers import _mi_from_covariance, _mi_from_gram, _standardize

    g = torch.Generator().manual_seed(n + d_s)
    z = torch.randn(n, d_s + d_t, generator=g, dtype=torch.float64)
    z[:, d_s:] += 0.7 * z[:, : min(d_s, d_t)].repeat(1, d_t // min(d_s, d_t) + 1)[:, :d_t]
    values, grads = [], []
    for form in (_mi_from_gram, _mi_from_covariance):
        zz = z.clone().requires_grad_(True)
        mi = form(_standardize(zz), d_s, shrinkage, 1e-6)
        mi.backward()
        values.append(mi.detach())
        grads.append(zz.grad)
    assert values[0] > 0.05  # a real dependence, not two zeros agreeing
    torch.testing.assert_close(values[0], values[1], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-7, atol=1e-10)
    # The reference: 1/2 [log det R_ss + log det R_tt - log det R] from slogdet of the shrunk R.
    x = _standardize(z)
    r = x.T @ x / n
    lam = ledoit_wolf_shrinkage(x) if shrinkage == "auto" else shrinkage
    r = (1 - lam) * r + (lam * torch.diagonal(r).mean() + 1e-6) * torch.eye(d_s + d_t, dtype=torch.float64)
    ref = 0.5 * (
        torch.linalg.slogdet(r[:d_s, :d_s])[1]
        + torch.linalg.slogdet(r[d_s:, d_s:])[1]
        - torch.linalg.slogdet(r)[1]
    )
    torch.testing.assert_close(values[0], ref, rtol=1e-9, atol=1e-12)


def _one_hot_attn(keys: list[list[int]], n_t: int) -> torch.Tensor:
    """(1, H, N_s, N_t) maps where head h's query i attends only to key keys[h][i]."""
    return torch.nn.functional.one_hot(torch.tensor(keys), n_t).float()[None]


def test_attention_diversity_is_bounded_and_rewards_distinct_heads() -> None:
    same = _one_hot_attn([[0, 1, 2], [0, 1, 2]], 4)
    disjoint = _one_hot_attn([[0, 1, 2], [1, 2, 3]], 4)
    assert attention_diversity(same).item() == pytest.approx(0.0, abs=1e-5)
    assert attention_diversity(disjoint).item() == pytest.approx(-1.0, abs=1e-5)
    rand = torch.randn(2, 8, 5, 6).softmax(-1)
    v = attention_diversity(rand).item()
    assert -1.0 <= v <= 0.0
    # Matches the direct pairwise definition.
    flat = rand.flatten(2)
    d = [
        ((flat[:, i] - flat[:, j]).norm(dim=1) / math.sqrt(2 * 5)).mean()
        for i in range(8)
        for j in range(i + 1, 8)
    ]
    assert v == pytest.approx(-torch.stack(d).mean().item(), abs=1e-5)
    assert attention_diversity(rand[:, :1]).item() == 0.0  # one head: nothing to diversify
    # Identical heads (a stationary point) still give finite gradients.
    same.requires_grad_(True)
    attention_diversity(same).backward()
    assert torch.isfinite(same.grad).all()


def test_attention_entropy_and_learned_head_weights() -> None:
    uniform = torch.full((2, 3, 4, 5), 1 / 5)
    torch.testing.assert_close(attention_entropy(uniform), torch.ones(3))
    peaked = _one_hot_attn([[0, 1], [2, 3], [4, 0]], 5)
    peaked.requires_grad_(True)
    torch.testing.assert_close(attention_entropy(peaked), torch.zeros(3))
    attention_entropy(peaked).sum().backward()
    assert torch.isfinite(peaked.grad).all()  # a = 0 entries do not give -inf gradients

    reg = AttentionEntropyRegularizer(3)
    assert reg.weights.sum().item() == pytest.approx(1.0)
    attn = torch.randn(2, 3, 4, 5).softmax(-1)
    torch.testing.assert_close(reg(attn), (attention_entropy(attn) / 3).sum())
    # Optimising the weights alone cannot drive them (or the loss) to zero: they stay a distribution.
    opt = torch.optim.SGD(reg.parameters(), lr=50.0)
    for _ in range(20):
        opt.zero_grad()
        reg(attn).backward()
        opt.step()
    w = reg.weights.detach()
    assert w.sum().item() == pytest.approx(1.0, abs=1e-6) and (w >= 0).all()
    assert reg(attn).item() >= attention_entropy(attn).min().item() - 1e-6
    with pytest.raises(ValueError, match="num_heads"):
        reg(torch.randn(2, 4, 4, 5).softmax(-1))


def test_orthogonality_is_squared_cosine() -> None:
    a = torch.randn(4, 8, 3, 3)
    assert orthogonality(a, a).item() == pytest.approx(1.0, abs=1e-5)
    assert orthogonality(a, -2 * a).item() == pytest.approx(1.0, abs=1e-5)
    b = torch.randn(4, 8, 3, 3)
    b = (
        b
        - (b * a).flatten(1).sum(1)[:, None, None, None]
        / a.flatten(1).square().sum(1)[:, None, None, None]
        * a
    )
    assert orthogonality(a, b).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="f_att"):
        orthogonality(a, torch.randn(4, 8, 2, 2))


def test_beta_ramp_and_fixed_schedules() -> None:
    assert ramp_weight(0.01, 0.0, ramp_epochs=10) == 0.0
    assert ramp_weight(0.01, 5.0, ramp_epochs=10) == pytest.approx(0.005)
    assert ramp_weight(0.01, 25.0, ramp_epochs=10) == pytest.approx(0.01)
    assert ramp_weight(0.01, 0.0, schedule="fixed") == pytest.approx(0.01)
    assert ramp_weight(0.01, 0.0, ramp_epochs=0) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="progress"):
        ramp_weight(0.01, -1.0)


def test_redundancy_not_positive_definite_is_nan_not_an_exception() -> None:
    """A failed Cholesky gives NaN (the step is skipped as non-finite), never a host-side error check."""
    from cmafnet.losses.regularizers import _logdet_pd

    assert torch.isnan(_logdet_pd(torch.tensor([[1.0, 2.0], [2.0, 1.0]])))
    spd = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    torch.testing.assert_close(_logdet_pd(spd), torch.logdet(spd))
