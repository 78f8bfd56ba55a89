"""Classification losses: degenerate cases equal cross-entropy, published formulas, stability, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cmafnet.config import LossConfig, config_from_dict
from cmafnet.errors import ConfigError
from cmafnet.losses import (
    LOSSES,
    create_loss,
    create_loss_from_config,
    effective_number_weights,
    ldam_margins,
)

BINARY = [716, 284]
EIGHT = [444, 1014, 453, 569, 3451, 626, 792, 560]  # BreakHis-like subtype counts

# (name, kwargs) that make each loss plain cross-entropy; counts are imbalanced on purpose except
# where the degenerate setting is "uniform prior" / "uniform alpha".
DEGENERATE = [
    ("ce", {}, False),
    ("focal", {"gamma": 0.0}, False),
    ("cb", {"beta": 0.0}, False),
    ("cb", {"beta": 0.0, "loss_type": "focal", "gamma": 0.0}, False),
    ("ldam", {"max_margin": 0.0, "s": 1.0, "drw": False}, False),
    ("balanced_softmax", {}, True),
    (
        "acbfl",
        {"gamma_base": 0.0, "entropy_weight": 0.0, "margin": False},
        True,  # uniform counts -> uniform alpha (both weightings normalised to mean 1)
    ),
]


def _data(num_classes: int, n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, num_classes, generator=g) * 3, torch.randint(0, num_classes, (n,), generator=g)


@pytest.mark.parametrize("counts", [BINARY, EIGHT], ids=["binary", "8class"])
@pytest.mark.parametrize(
    ("name", "kw", "uniform"), DEGENERATE, ids=[f"{n}-{i}" for i, (n, *_) in enumerate(DEGENERATE)]
)
def test_degenerate_setting_equals_cross_entropy(name, kw, uniform, counts) -> None:
    c = len(counts)
    counts = [100] * c if uniform else counts
    logits, target = _data(c)
    logits.requires_grad_(True)
    loss = create_loss(name, class_counts=counts, **kw)
    ours = loss(logits, target, epoch=5.0)
    ref = F.cross_entropy(logits, target)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_ref,) = torch.autograd.grad(F.cross_entropy(logits, target), logits)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-6)


def test_non_degenerate_settings_differ_from_cross_entropy() -> None:
    """Guards the test above: the same losses with their defaults are *not* cross-entropy."""
    logits, target = _data(2)
    ref = F.cross_entropy(logits, target)
    for name in ("focal", "cb", "balanced_softmax", "acbfl"):
        assert not torch.allclose(create_loss(name, class_counts=BINARY)(logits, target), ref), name
    ldam = create_loss("ldam", class_counts=BINARY, drw_epoch=1)
    assert not torch.allclose(ldam(logits, target), ref)


def test_focal_matches_lin_formula() -> None:
    logits, target = _data(3, n=16)
    p = logits.softmax(1)[torch.arange(16), target]
    alpha = torch.tensor([0.2, 0.3, 0.5])
    expected = (-alpha[target] * (1 - p) ** 2 * p.log()).mean()
    got = create_loss("focal", gamma=2.0, alpha=alpha)(logits, target)
    torch.testing.assert_close(got, expected)
    # Binary alpha as a float: class 1 gets alpha, class 0 gets 1 - alpha (Lin et al.).
    lb, tb = _data(2, n=16)
    pb = lb.softmax(1)[torch.arange(16), tb]
    w = torch.where(tb == 1, 0.25, 0.75)
    torch.testing.assert_close(
        create_loss("focal", alpha=0.25)(lb, tb), (-w * (1 - pb) ** 2 * pb.log()).mean()
    )


def test_cb_weights_follow_effective_number() -> None:
    n = torch.tensor(BINARY, dtype=torch.float64)
    beta = 0.9999
    raw = (1 - beta) / (1 - beta**n)
    torch.testing.assert_close(effective_number_weights(n, beta), (raw / raw.sum() * 2).float())
    loss = create_loss("cb", class_counts=BINARY)
    assert loss.weight[1] > loss.weight[0]  # the minority class weighs more


def test_ldam_margins_follow_cao_formula() -> None:
    n = torch.tensor(EIGHT, dtype=torch.float64)
    m = ldam_margins(n, 0.5).double()
    assert m.max().item() == pytest.approx(0.5)
    # m_j = C / n_j^{1/4}: m_j * n_j^{1/4} is one constant C.
    c = m * n**0.25
    torch.testing.assert_close(c, torch.full_like(c, c[0].item()), rtol=1e-6, atol=0)
    assert m.argmax().item() == int(n.argmin())
    # The loss subtracts m_y from the true logit and scales by s.
    logits, target = _data(8, n=32)
    loss = create_loss("ldam", class_counts=EIGHT, s=30.0, drw=False)
    adj = logits.clone()
    adj[torch.arange(32), target] -= m.float()[target]
    torch.testing.assert_close(loss(logits, target), F.cross_entropy(30 * adj, target))


def test_ldam_drw_switches_on_at_drw_epoch() -> None:
    logits, target = _data(2)
    loss = create_loss("ldam", class_counts=BINARY, drw_epoch=8)
    before = loss(logits, target, epoch=7.9)
    assert loss.class_weight(7.9) is None
    after = loss(logits, target, epoch=8.0)
    assert loss.class_weight(8.0) is not None and not torch.allclose(before, after)
    # the clock as a 0-d tensor (a captured step): the switch is taken on the device, same values
    for t, expected in ((7.9, before), (8.0, after)):
        torch.testing.assert_close(loss(logits, target, epoch=torch.tensor(t)), expected)
    w = effective_number_weights(torch.tensor(BINARY, dtype=torch.float64), 0.9999)
    adj = logits.clone()
    adj[torch.arange(len(target)), target] -= loss.margins[target]
    torch.testing.assert_close(after, F.cross_entropy(30 * adj, target, weight=w))
    # drw_epoch unset: 80% of total_epochs (Cao et al. re-weight at epoch 160 of 200).
    assert create_loss("ldam", class_counts=BINARY, total_epochs=30).drw_epoch == pytest.approx(24.0)


def test_balanced_softmax_adds_log_prior() -> None:
    logits, target = _data(8)
    prior = torch.tensor(EIGHT, dtype=torch.float32) / sum(EIGHT)
    got = create_loss("balanced_softmax", class_counts=EIGHT)(logits, target)
    torch.testing.assert_close(got, F.cross_entropy(logits + prior.log(), target))


@pytest.mark.parametrize("name", ["ce", "focal", "cb", "ldam", "balanced_softmax", "acbfl"])
@pytest.mark.parametrize("gamma", [2.0, 0.5])
def test_finite_gradients_at_extreme_logits(name: str, gamma: float) -> None:
    kw: dict = {"drw_epoch": 0} if name == "ldam" else {}
    if name in ("focal", "cb"):
        kw["gamma"] = gamma
    if name == "cb":
        kw["loss_type"] = "focal"
    if name == "acbfl":
        kw["gamma_base"] = gamma
    loss = create_loss(name, class_counts=BINARY, **kw)
    target = torch.tensor([0, 1, 0, 1, 0, 1])
    # Rows: p_y = 1 exactly, p_y = 0 exactly (both at +-1e4), p_y very near 1 and near 0, moderate.
    logits = torch.tensor(
        [[1e4, -1e4], [1e4, -1e4], [-1e4, 1e4], [30.0, -30.0], [20.0, 0.0], [0.3, -0.2]], requires_grad=True
    )
    value = loss(logits, target)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(logits.grad).all(), (name, logits.grad)


def test_acbfl_under_bf16_autocast_is_float32() -> None:
    loss = create_loss("acbfl", class_counts=BINARY)
    logits, target = _data(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(logits.bfloat16(), target)
    assert value.dtype == torch.float32 and torch.isfinite(value)


def test_bad_arguments_raise_value_error_naming_the_argument() -> None:
    with pytest.raises(ValueError, match="class_counts"):
        create_loss("acbfl", class_counts=[10, 0])
    with pytest.raises(ValueError, match="class_counts"):
        create_loss("cb", class_counts=None)
    with pytest.raises(ValueError, match="weight"):
        create_loss("ce", weight=[1.0, -0.5])
    with pytest.raises(ValueError, match="alpha"):
        create_loss("focal", alpha=[0.5, -1.0])
    with pytest.raises(ValueError, match="class_counts"):
        create_loss("balanced_softmax", class_counts=BINARY)(*_data(8))
    with pytest.raises(ValueError, match="gamma_base"):
        create_loss("acbfl", class_counts=BINARY, gamma_base=-1.0)
    with pytest.raises(ValueError, match="drw_epoch"):
        create_loss("ldam", class_counts=BINARY)
    with pytest.raises(ValueError, match="epoch"):
        create_loss("ldam", class_counts=BINARY, drw_epoch=1)(*_data(2), epoch=-1)
    with pytest.raises(ValueError, match="epoch"):
        create_loss("acbfl", class_counts=BINARY)(*_data(2), epoch=float("nan"))
    with pytest.raises(ConfigError, match="Did you mean 'focal'"):
        create_loss("focall")


def test_registry_and_config_mapping() -> None:
    assert set(LOSSES.names()) == {"ce", "focal", "cb", "ldam", "balanced_softmax", "acbfl"}
    cfg = LossConfig(name="acbfl", gamma_base=1.5, class_dependent_gamma=False, entropy_weight=0.0)
    loss = create_loss_from_config(cfg, BINARY)
    assert loss.gamma.tolist() == [1.5, 1.5] and loss.entropy_weight == 0.0
    ldam = create_loss_from_config(LossConfig(name="ldam", ldam_s=10.0, drw_epoch=3), BINARY)
    assert ldam.s == 10.0 and ldam.drw_epoch == 3.0
    cb = create_loss_from_config(LossConfig(name="cb", cb_loss_type="focal", focal_gamma=1.0), EIGHT)
    assert cb.loss_type == "focal" and cb.gamma == 1.0
    from cmafnet.experiments.paper_tables import LOSS, TABLES

    # The Table 6 loss rows (overrides of the paper config) build finite losses.
    for row in (r for r in TABLES["table6"].rows if r.group == LOSS):
        built = create_loss_from_config(config_from_dict({}, list(row.overrides)).loss, BINARY)
        assert math.isfinite(built(*_data(2)).item())
