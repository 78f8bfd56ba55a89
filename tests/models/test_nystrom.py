"""Attention kernels: exact SDPA, Nystrom attention and its iterative pseudo-inverse."""

from __future__ import annotations

import itertools

import pytest
import torch

from cmafnet.errors import ConfigError
from cmafnet.models.nystrom import (
    ATTENTION,
    SelfAttention,
    full_attention,
    iterative_pinv,
    nystrom_approximation,
    nystrom_attention,
)

SCALE = 8**-0.5


def _well_conditioned(batch: int, n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``(batch, n, n)`` softmax kernels whose rows peak on the diagonal (condition number < 3)."""
    g = torch.Generator().manual_seed(0)
    return torch.softmax(torch.randn(batch, n, n, generator=g) + 6 * torch.eye(n), dim=-1).to(dtype)


def _peaked_tokens(n: int, d: int = 8) -> torch.Tensor:
    """``(2, 3, n, d)`` tokens; with q = k the softmax kernel peaks on its diagonal (logit 16 there)."""
    x = torch.randn(2, 3, n, d, generator=torch.Generator().manual_seed(1))
    return 4 * d**0.25 * x / x.norm(dim=-1, keepdim=True)  # q.k / sqrt(d) = 16 for q = k


def test_nystrom_formula_with_all_tokens_as_landmarks_is_exact_attention() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 12, 8) for _ in range(3))
    exact = full_attention(q, k, v, scale=SCALE)
    got = nystrom_approximation(q, k, v, scale=SCALE, num_landmarks=12, pinv="exact")
    torch.testing.assert_close(got, exact, rtol=1e-4, atol=1e-4)
    # More landmarks than tokens is clamped to the token count.
    got = nystrom_approximation(q, k, v, scale=SCALE, num_landmarks=50, pinv="exact")
    torch.testing.assert_close(got, exact, rtol=1e-4, atol=1e-4)


def test_iterative_pinv_formula_is_exact_on_a_well_conditioned_kernel() -> None:
    """With m == N the iterative pseudo-inverse reproduces exact attention once it has converged."""
    q = k = _peaked_tokens(12).double()
    v = torch.randn(2, 3, 12, 8, dtype=torch.float64)
    exact = full_attention(q, k, v, scale=SCALE)
    got = nystrom_approximation(q, k, v, scale=SCALE, num_landmarks=12, pinv="iterative", pinv_iters=6)
    torch.testing.assert_close(got, exact, rtol=1e-7, atol=1e-7)


def test_kernel_computes_exact_attention_when_landmarks_cover_the_tokens() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8) for _ in range(3))
    exact = full_attention(q, k, v, scale=SCALE)
    for m in (16, 40):
        torch.testing.assert_close(nystrom_attention(q, k, v, scale=SCALE, num_landmarks=m), exact)
    # Fewer landmarks than tokens: the approximation, not the exact attention.
    approx = nystrom_attention(q, k, v, scale=SCALE, num_landmarks=4)
    assert (approx - exact).abs().max() > 1e-3
    torch.testing.assert_close(approx, nystrom_approximation(q, k, v, scale=SCALE, num_landmarks=4))


@pytest.mark.parametrize("shape", [(4, 16, 16), (3, 2, 8, 8), (2, 6, 4)])
def test_iterative_pinv_converges_to_linalg_pinv(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    m, n = shape[-2:]
    # Random matrices with singular values in [0.6, 1] (condition number <= 1.7).
    u = torch.linalg.qr(torch.randn(*shape[:-2], m, m, generator=g, dtype=torch.float64)).Q
    w = torch.linalg.qr(torch.randn(*shape[:-2], n, n, generator=g, dtype=torch.float64)).Q
    s = 0.6 + 0.4 * torch.rand(*shape[:-2], min(m, n), generator=g, dtype=torch.float64)
    a = u[..., :, : s.shape[-1]] @ torch.diag_embed(s) @ w[..., :, : s.shape[-1]].mT
    torch.testing.assert_close(iterative_pinv(a, 6), torch.linalg.pinv(a), rtol=1e-9, atol=1e-9)
    # The landmark kernels Nystrom attention inverts: softmax rows, here diagonal-dominant.
    kern = _well_conditioned(4, 16)
    torch.testing.assert_close(iterative_pinv(kern, 6), torch.linalg.pinv(kern), rtol=1e-9, atol=1e-9)
    # float32 in, float32 out, to float32 accuracy
    got = iterative_pinv(kern.float(), 6)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), torch.linalg.pinv(kern), rtol=1e-4, atol=1e-4)


def test_iterative_pinv_residual_shrinks_cubically() -> None:
    """R_{j+1} = R_j^3 (3I + R_j) / 4 for R = I - A Z (Razavi et al.), seen through its spectral norm."""
    a = torch.softmax(torch.randn(3, 10, 10, generator=torch.Generator().manual_seed(2)), -1).double()
    eye = torch.eye(10, dtype=torch.float64)
    norms = [torch.linalg.matrix_norm(eye - a @ iterative_pinv(a, j), ord=2) for j in range(1, 9)]
    for r, r_next in itertools.pairwise(norms):
        assert (r_next <= r**3 * (3 + r) / 4 + 1e-12).all()
        assert (r_next <= r).all()
    # A random softmax kernel is ill-conditioned: six iterations have not converged (the small
    # singular values are damped, not inverted) but twenty have.
    assert (norms[5] > 0.5).any()
    torch.testing.assert_close(iterative_pinv(a, 20), torch.linalg.pinv(a), rtol=1e-8, atol=1e-8)


def test_iterative_pinv_is_per_matrix_and_safe_on_zero() -> None:
    kern = _well_conditioned(3, 8)
    batch = iterative_pinv(kern, 6)
    for i in range(3):  # each matrix's result does not depend on the others in the batch
        torch.testing.assert_close(iterative_pinv(kern[i : i + 1], 6), batch[i : i + 1], rtol=0, atol=0)
    assert torch.equal(iterative_pinv(torch.zeros(2, 4, 4), 6), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="iters"):
        iterative_pinv(kern, 0)


@pytest.mark.parametrize("pinv", ["iterative", "exact"])
def test_nystrom_gradients(pinv: str) -> None:
    q, k, v = (
        torch.randn(
            1, 2, 10, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(i)
        ).requires_grad_()
        for i in range(3)
    )

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return nystrom_approximation(q, k, v, scale=0.5, num_landmarks=3, pinv=pinv)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-5)


def test_iterative_pinv_gradient_matches_exact_on_a_well_conditioned_kernel() -> None:
    a = _well_conditioned(2, 6).requires_grad_()
    w = torch.randn(2, 6, 6, dtype=torch.float64)
    (g_iter,) = torch.autograd.grad((iterative_pinv(a, 6) * w).sum(), a)
    (g_exact,) = torch.autograd.grad((torch.linalg.pinv(a) * w).sum(), a)
    torch.testing.assert_close(g_iter, g_exact, rtol=1e-7, atol=1e-7)


def test_nystrom_approximates_with_few_landmarks() -> None:
    torch.manual_seed(0)
    anchors = torch.randn(2, 6, 8, 4)  # tokens varying smoothly along the sequence

    def smooth(n: int) -> torch.Tensor:
        x = torch.nn.functional.interpolate(anchors[0], size=n, mode="linear", align_corners=True)
        return x.reshape(2, 3, 8, n).transpose(-1, -2)  # (2, 3, n, 8)

    q, k, v = smooth(64), smooth(64), torch.randn(2, 3, 64, 8)
    exact = full_attention(q, k, v, scale=SCALE)
    for pinv in ("iterative", "exact"):
        err = {
            m: (nystrom_attention(q, k, v, scale=SCALE, num_landmarks=m, pinv=pinv) - exact)
            .abs()
            .mean()
            .item()
            for m in (4, 16)
        }
        assert err[4] > 1e-4  # an approximation, not a copy of exact attention
        assert err[16] < err[4] < 0.1 * exact.abs().mean().item()


def test_nystrom_uneven_segments_and_layer() -> None:
    torch.manual_seed(0)
    attn_full = SelfAttention(16, 2, kind="full").eval()
    attn_ny = SelfAttention(16, 2, kind="nystrom", num_landmarks=20).eval()
    attn_ny.load_state_dict(attn_full.state_dict())
    x = torch.randn(2, 20, 16)
    with torch.no_grad():
        torch.testing.assert_close(attn_ny(x), attn_full(x), rtol=1e-4, atol=1e-4)
    attn_ny.num_landmarks = 6  # 20 tokens into 6 uneven segments
    out = attn_ny(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert set(ATTENTION.names()) >= {"full", "nystrom"}
    with pytest.raises(ConfigError, match="unknown attention"):
        SelfAttention(16, 2, kind="linformer")
    with pytest.raises(ValueError, match="pinv"):
        SelfAttention(16, 2, kind="nystrom", pinv="svd")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nystrom_under_autocast(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """Half-precision autocast: the landmark maths and the pseudo-inverse run in float32."""
    import cmafnet.models.nystrom as attention

    seen = []

    def spy(a: torch.Tensor, iters: int = 6) -> torch.Tensor:
        seen.append((a.dtype, torch.is_autocast_enabled("cpu")))
        return iterative_pinv(a, iters)

    monkeypatch.setattr(attention, "iterative_pinv", spy)
    torch.manual_seed(0)
    layer = SelfAttention(16, 2, kind="nystrom", num_landmarks=4)
    x = torch.randn(2, 24, 16)
    ref = layer(x)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
    assert seen == [(torch.float32, False)] * 2
    assert y.dtype == dtype  # the output projection runs under autocast
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)
    y.float().square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    with torch.autocast("cpu", dtype=dtype):
        q = torch.randn(1, 2, 24, 8).to(dtype)
        out = nystrom_attention(q, q, q, scale=SCALE, num_landmarks=4, pinv="exact")
    assert out.dtype == dtype and torch.isfinite(out.float()).all()


def test_iterative_pinv_ignores_autocast() -> None:
    kern = _well_conditioned(2, 8, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = iterative_pinv(kern, 6)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, iterative_pinv(kern, 6), rtol=0, atol=0)
