"""A-CBFL: class-dependent gamma, the alpha schedule, the entropy sign, margins and switches."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from cmafnet.losses import create_loss

PRIORS = [0.716, 0.284]  # IDC: 198,738 / 78,786 patches


def test_gamma_for_idc_priors() -> None:
    loss = create_loss("acbfl", class_counts=PRIORS, gamma_base=2.0)
    assert loss.gamma[0].item() == pytest.approx(2.0)
    assert loss.gamma[1].item() == pytest.approx(2.0 * (0.716 / 0.284) ** 0.25, rel=1e-6)
    off = create_loss("acbfl", class_counts=PRIORS, gamma_base=2.0, class_dependent_gamma=False)
    assert off.gamma.tolist() == [2.0, 2.0]


def test_alpha_starts_at_inverse_frequency_and_approaches_sqrt_weighting() -> None:
    counts = [198738, 78786]
    loss = create_loss("acbfl", class_counts=counts, alpha_decay=0.1)
    pi = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    a0 = loss.alpha(0.0).double()
    # Inverse frequency: w1 / w0 = pi0 / pi1, mean 1.
    assert (a0[1] / a0[0]).item() == pytest.approx((pi[0] / pi[1]).item(), rel=1e-5)
    assert a0.mean().item() == pytest.approx(1.0, rel=1e-6)
    a_late = loss.alpha(200.0).double()
    assert (a_late[1] / a_late[0]).item() == pytest.approx(math.sqrt(pi[0] / pi[1]), rel=1e-5)
    # Monotone exponential move between the two: ratio decreases with t, halfway-point formula.
    ratios = [(loss.alpha(t)[1] / loss.alpha(t)[0]).item() for t in (0, 1, 5, 10, 30)]
    assert all(a > b for a, b in itertools.pairwise(ratios))
    t = 7.0
    expected = loss.w_sqrt + (loss.w_inv - loss.w_sqrt) * math.exp(-0.1 * t)
    torch.testing.assert_close(loss.alpha(t), expected)
    # a 0-d tensor clock (what a captured step reads) gives the same weights, to float32 round-off
    torch.testing.assert_close(loss.alpha(torch.tensor(t)), expected)
    # dynamic_alpha off: fixed square-root weights at every epoch.
    fixed = create_loss("acbfl", class_counts=counts, dynamic_alpha=False)
    r0 = (fixed.alpha(0.0)[1] / fixed.alpha(0.0)[0]).item()
    assert r0 == pytest.approx(math.sqrt(pi[0] / pi[1]), rel=1e-5)


def test_entropy_term_is_a_confidence_penalty() -> None:
    """Higher predictive entropy lowers the loss (SPEC: not the sign Eq. 14 prints)."""
    target = torch.tensor([0, 0])
    kw = {"class_counts": [100, 100], "gamma_base": 0.0, "margin": False}
    plain = create_loss("acbfl", entropy_weight=0.0, **kw)
    penal = create_loss("acbfl", entropy_weight=0.5, **kw)
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.0]])
    p = logits.softmax(1)
    h = -(p * p.log()).sum(1)
    torch.testing.assert_close(penal(logits, target), plain(logits, target) - 0.5 * h.mean())
    assert penal(logits, target) < plain(logits, target)


def test_margin_is_subtracted_from_true_logit() -> None:
    counts = [700, 300]
    kw = {"gamma_base": 0.0, "entropy_weight": 0.0}
    loss = create_loss("acbfl", class_counts=counts, dynamic_alpha=False, **kw)
    assert loss.margins.max().item() == pytest.approx(0.5)
    assert loss.margins[1] > loss.margins[0]  # minority class gets the larger margin
    logits = torch.randn(16, 2)
    target = torch.randint(0, 2, (16,))
    adj = logits.clone()
    adj[torch.arange(16), target] -= loss.margins[target]
    expected = (loss.alpha(0.0)[target] * F.cross_entropy(adj, target, reduction="none")).mean()
    torch.testing.assert_close(loss(logits, target), expected)
    no_margin = create_loss("acbfl", class_counts=counts, dynamic_alpha=False, margin=False, **kw)
    assert no_margin.margins.abs().max().item() == 0.0


def test_full_formula_multiclass() -> None:
    counts = [50, 200, 400, 1000, 80, 120, 300, 90]
    loss = create_loss("acbfl", class_counts=counts, entropy_weight=0.1)
    logits = torch.randn(32, 8) * 2
    target = torch.randint(0, 8, (32,))
    adj = logits - F.one_hot(target, 8) * loss.margins[target][:, None]
    p_t = adj.softmax(1)[torch.arange(32), target]
    p = logits.softmax(1)
    expected = (
        -loss.alpha(3.0)[target] * (1 - p_t) ** loss.gamma[target] * p_t.log() + 0.1 * (p * p.log()).sum(1)
    ).mean()
    torch.testing.assert_close(loss(logits, target, epoch=3.0), expected, rtol=1e-5, atol=1e-6)
