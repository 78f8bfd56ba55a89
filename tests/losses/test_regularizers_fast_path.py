"""The GPU fast path of the objective: no host sync, no graph break, same values as float64 sklearn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.covariance import ledoit_wolf_shrinkage as sk_ledoit_wolf_shrinkage

from _dispatch_count import count_ops as count_syncs
from cmafnet.config import LossConfig, RegularizerConfig
from cmafnet.losses import Objective, gaussian_mutual_information
from cmafnet.losses.regularizers import ledoit_wolf_shrinkage
from cmafnet.models.output import ModelOutput


def test_sync_counter_can_fail() -> None:
    """The counter sees the reads the fast path must not do (else the tests below prove nothing)."""
    t = torch.randn(3)
    with count_syncs() as c:
        t.sum().item()
        bool(t.max() > 0)
        t.tolist()
    assert c.syncs == 3


def test_ledoit_wolf_is_a_device_tensor_without_sync_and_matches_sklearn() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(24, 12)) @ rng.normal(size=(12, 12))
    x = x - x.mean(0)
    xt = torch.from_numpy(x)
    with count_syncs() as c:
        lam = ledoit_wolf_shrinkage(xt)
    assert c.syncs == 0
    assert isinstance(lam, torch.Tensor) and lam.ndim == 0 and lam.dtype == torch.float64
    assert lam.item() == pytest.approx(float(sk_ledoit_wolf_shrinkage(x)), rel=1e-10)
    # float32 input: a float32 intensity (no float64 work), within float32 round-off of sklearn.
    lam32 = ledoit_wolf_shrinkage(xt.float())
    assert lam32.dtype == torch.float32
    assert lam32.item() == pytest.approx(float(sk_ledoit_wolf_shrinkage(x)), rel=1e-4)


def test_ledoit_wolf_zero_distance_to_target_gives_zero_not_nan() -> None:
    # Orthogonal columns of equal norm: the covariance is already mu * I, delta == 0.
    x = torch.eye(6, dtype=torch.float64) * 3.0
    lam = ledoit_wolf_shrinkage(x)
    assert torch.isfinite(lam) and lam.item() == 0.0
    assert float(sk_ledoit_wolf_shrinkage(x.numpy(), assume_centered=True)) == 0.0


def test_gaussian_mi_has_no_sync_and_no_graph_break() -> None:
    z_s = torch.randn(32, 16, requires_grad=True)
    z_t = (0.6 * z_s + 0.4 * torch.randn(32, 16)).detach()
    with count_syncs() as c:
        mi = gaussian_mutual_information(z_s, z_t)
        mi.backward()
    assert c.syncs == 0
    assert z_s.grad is not None and torch.isfinite(z_s.grad).all()
    # fullgraph=True raises on any graph break (a Python float read from a tensor would be one).
    torch._dynamo.reset()
    compiled = torch.compile(gaussian_mutual_information, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(z_s.detach(), z_t), mi.detach())


def _output(b: int = 8, d: int = 6, hw: int = 2, h: int = 2) -> ModelOutput:
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).requires_grad_(True)

    n = hw * hw
    return ModelOutput(
        logits=r(b, 2),
        f_s=r(b, d, hw, hw),
        f_att=r(b, d, hw, hw),
        attn=r(b, h, n, n).softmax(-1),
        mu_s=r(b, n, d),
        logvar_s=r(b, n, d),
        mu_t=r(b, n, d),
        logvar_t=r(b, n, d),
        z_s=r(b, d),
        z_t=r(b, d),
    )


def _one_hot_without_range_check(target: torch.Tensor, num_classes: int = -1) -> torch.Tensor:
    """``F.one_hot`` minus its range check: aten checks ``min``/``max`` with ``.item()`` on CPU only
    (on CUDA it relies on the scatter's device assert, no sync), so on CPU the check is masked."""
    out = torch.zeros(*target.shape, num_classes, dtype=torch.long, device=target.device)
    return out.scatter_(-1, target.unsqueeze(-1), 1)


@pytest.mark.parametrize("loss", ["acbfl", "ce"])
def test_objective_with_every_regularizer_never_reads_a_device_value(
    loss: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.nn.functional, "one_hot", _one_hot_without_range_check)
    reg = RegularizerConfig(
        beta_schedule="fixed", beta1=0.01, beta2=0.005, diversity=0.02, entropy=0.03, orthogonality=0.04
    )
    obj = Objective(LossConfig(name=loss), reg, [30, 10], num_heads=2)
    out = _output()
    y = torch.tensor([0, 1, 0, 0, 1, 0, 0, 1])
    with count_syncs() as c:
        total, terms = obj(out, y, epoch=1.0, beta_ramp=1.0)
        total.backward()
    assert c.syncs == 0
    for name in ("cls", "kl_s", "kl_t", "redundancy", "diversity", "attn_entropy", "orthogonality", "total"):
        assert isinstance(terms[name], torch.Tensor) and not terms[name].requires_grad, name
