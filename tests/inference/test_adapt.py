"""Test-time adaptations (cmafnet.inference.adapt) against answers known by construction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from cmafnet.data.reinhard import ReinhardNormalizer, reference_stats
from cmafnet.data.stain import HE_REF
from cmafnet.errors import ConfigError
from cmafnet.evaluation.metrics import threshold_for_sensitivity
from cmafnet.evaluation.transfer import site_calibrate, site_calibration_split
from cmafnet.inference.adapt import (
    adapt_batchnorm,
    balanced_indices,
    tta_logits,
)
from cmafnet.inference.temperature import threshold_at_temperature


# ----------------------------------------------------------------------------------------- TTA
def _linear_forward(c: int, s: int, k: int = 3, seed: int = 0):
    """A forward that sees the pixel layout (flatten + linear): not invariant to any flip/rotation."""
    w = torch.randn(c * s * s, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return lambda x: x.flatten(1) @ w  # (B, C, S, S) -> (B, K)


def _d4_numpy(img: np.ndarray) -> list[np.ndarray]:
    """The 8 symmetries of the square of a (C, S, S) image, written out one by one (not via rot90 k)."""
    t = img.transpose(0, 2, 1)  # transpose over the main diagonal
    return [
        img,
        img[:, :, ::-1],  # mirror left-right
        img[:, ::-1, :],  # mirror up-down
        img[:, ::-1, ::-1],  # rotation by 180
        t,
        t[:, ::-1, ::-1],  # anti-diagonal transpose
        t[:, ::-1, :],  # rotation by 90 (one direction)
        t[:, :, ::-1],  # rotation by 90 (the other)
    ]


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_tta_of_an_invariant_model_changes_nothing():
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    w = torch.randn(3, 2, dtype=torch.float64)

    def pooled(v: torch.Tensor) -> torch.Tensor:
        return v.mean((2, 3)) @ w  # global average pooling: invariant to every flip and rotation

    plain = torch.softmax(pooled(x), -1)
    for mode in ("flips", "d4", "none"):
        out = tta_logits(pooled, x, mode)
        assert out.shape == (4, 2)
        torch.testing.assert_close(torch.softmax(out.double(), -1), plain, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode,n_views", [("d4", 8), ("flips", 4)])
def test_tta_is_the_mean_of_the_views_probabilities(mode, n_views):
    x = torch.randn(5, 2, 8, 8, dtype=torch.float64)
    fwd = _linear_forward(2, 8)
    seen: list[torch.Tensor] = []

    def recording(v: torch.Tensor) -> torch.Tensor:
        seen.append(v.clone())
        return fwd(v)

    out = tta_logits(recording, x, mode)
    views = [np.ascontiguousarray(v) for v in _d4_numpy(x[0].numpy())]
    expected_views = views if mode == "d4" else views[:4]
    # the views are the expected transforms, each exactly once
    got = [v[0].numpy() for v in seen]
    assert len(got) == n_views
    for e in expected_views:
        assert sum(np.array_equal(g, e) for g in got) == 1
    probs = np.mean(
        [_softmax(fwd(torch.from_numpy(np.stack([_d4_numpy(xi)[i] for xi in x.numpy()]).copy())).numpy())
         for i in range(n_views)],
        axis=0,
    )  # fmt: skip
    np.testing.assert_allclose(torch.softmax(out.double(), -1).numpy(), probs, atol=1e-6)
    # the views disagree, so this is not the plain prediction
    assert np.abs(probs - _softmax(fwd(x).numpy())).max() > 1e-3


def test_tta_unknown_mode():
    with pytest.raises(ConfigError, match="d4"):
        tta_logits(lambda v: v.mean((2, 3)), torch.zeros(1, 2, 4, 4), "rot45")


# --------------------------------------------------------------------------------------- AdaBN
class _TinyNet(nn.Module):
    """BN on the input, 1x1 conv, BN, ReLU, pooling, dropout, linear: (B, 3, H, W) -> (B, 2)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bn0 = nn.BatchNorm2d(3)
        self.conv = nn.Conv2d(3, 6, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(6, momentum=0.3)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv(self.bn0(x))))  # (B, 6, H, W)
        return self.fc(self.drop(h.mean((2, 3))))  # (B, 2)


def _source_target() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    src = torch.randn(32, 3, 8, 8, generator=g) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    src = src + torch.randn(32, 3, 1, 1, generator=g)  # per-image offsets: images differ
    scale = torch.tensor([3.0, 0.5, 2.0]).view(1, 3, 1, 1)
    shift = torch.tensor([4.0, -2.0, 1.5]).view(1, 3, 1, 1)
    return src, src * scale + shift  # target: the same images under a per-channel affine "site" change


def test_adabn_restores_source_predictions_on_shifted_target():
    src, tgt = _source_target()
    net = _TinyNet()
    adapt_batchnorm(net, src.split(16))  # "training": the BN statistics of the source
    net.eval()
    with torch.no_grad():
        pred_src = net(src).argmax(1)
        logits_src = net(src)
        before = net(tgt)
    assert (before.argmax(1) == pred_src).float().mean() < 0.5  # the site change breaks the predictions

    summary = adapt_batchnorm(net, tgt.split(16))
    assert summary["layers"] == 2 and summary["images"] == 32 and summary["batches"] == 2
    # bn0 sees the raw target: its running mean is the target's per-channel mean, its variance the
    # average of the two batches' unbiased per-channel variances
    torch.testing.assert_close(net.bn0.running_mean, tgt.mean((0, 2, 3)), atol=1e-4, rtol=1e-5)
    var = torch.stack([b.var((0, 2, 3), unbiased=True) for b in tgt.split(16)]).mean(0)
    torch.testing.assert_close(net.bn0.running_var, var, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        after = net(tgt)
    assert torch.equal(after.argmax(1), pred_src)
    torch.testing.assert_close(after, logits_src, atol=1e-3, rtol=1e-3)


def test_adabn_weights_batches_by_images():
    net = nn.Sequential(nn.BatchNorm2d(2)).eval()
    x = torch.randn(11, 2, 4, 4, generator=torch.Generator().manual_seed(2)) * 3 + 1
    adapt_batchnorm(net, x.split(4))  # batches of 4, 4, 3
    torch.testing.assert_close(net[0].running_mean, x.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)


def test_adabn_flags_momentum_and_modes_restored():
    net = _TinyNet()
    net.bn0.momentum = None
    net.eval()
    during: dict[str, bool] = {}

    def record(name: str):
        def hook(m: nn.Module, _inputs, _output) -> None:
            during.setdefault(name, m.training)

        return hook

    for name in ("bn0", "bn1", "drop", "conv"):
        getattr(net, name).register_forward_hook(record(name))
    adapt_batchnorm(net, [torch.randn(4, 3, 8, 8)])
    assert during == {"bn0": True, "bn1": True, "conv": False, "drop": False}
    assert net.bn0.momentum is None and net.bn1.momentum == 0.3
    assert not any(m.training for m in net.modules())
    # a model in train mode comes back in train mode
    net.train()
    adapt_batchnorm(net, [torch.randn(4, 3, 8, 8)])
    assert all(m.training for m in net.modules())


def test_adabn_without_batchnorm_and_without_data():
    lin = nn.Sequential(nn.Flatten(), nn.Linear(12, 2)).eval()
    w = lin[1].weight.clone()
    s = adapt_batchnorm(lin, [torch.randn(2, 3, 2, 2)])
    assert s["layers"] == 0 and s["images"] == 0
    assert torch.equal(lin[1].weight, w)

    net = _TinyNet().eval()
    net.bn0.running_mean.fill_(7.0)
    with pytest.raises(ValueError, match="no images"):
        adapt_batchnorm(net, [])
    assert torch.all(net.bn0.running_mean == 7.0) and net.bn1.momentum == 0.3
    assert not any(m.training for m in net.modules())


def test_balanced_indices():
    y = np.array([0] * 30 + [1] * 10 + [2] * 12)
    idx = balanced_indices(y, seed=3)
    assert np.bincount(y[idx]).tolist() == [10, 10, 10]
    assert len(np.unique(idx)) == len(idx) and np.all(np.diff(idx) > 0)
    assert np.array_equal(idx, balanced_indices(y, seed=3))
    assert not np.array_equal(idx, balanced_indices(y, seed=4))
    assert np.array_equal(balanced_indices(np.ones(5, int), 0), np.arange(5))


# ------------------------------------------------------------------------------------ Reinhard
_H, _E = torch.tensor(HE_REF).T  # hematoxylin, eosin OD vectors (3,)
_WHITE = 250.0


def _he_images(p_nuclei: np.ndarray, size: int = 32, seed: int = 0, bg_rows: int = 8) -> torch.Tensor:
    """Synthetic H&E uint8 ``(B, 3, S, S)``: nuclei (hematoxylin-rich, purple) with probability
    ``p_nuclei`` per tissue pixel, eosin-rich pink stroma otherwise, and white glass in the top rows."""
    g = torch.Generator().manual_seed(seed)
    b = len(p_nuclei)

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, size, size, generator=g)

    nuc = torch.rand(b, size, size, generator=g) < torch.as_tensor(p_nuclei, dtype=torch.float32).view(
        b, 1, 1
    )
    ch = torch.where(nuc, u(1.0, 1.2), u(0.0, 0.1))
    ce = torch.where(nuc, u(0.2, 0.3), u(0.5, 0.9))
    ch[:, :bg_rows] = 0.0
    ce[:, :bg_rows] = 0.0
    od = ch[:, None] * _H.view(1, 3, 1, 1) + ce[:, None] * _E.view(1, 3, 1, 1)  # (B, 3, S, S)
    return (_WHITE * torch.exp(-od)).round().to(torch.uint8)


def _restain(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Another lab / scanner: optical density scaled per channel (per image); glass stays white."""
    od = -torch.log(x.float().clamp_min(1.0) / _WHITE)
    return (_WHITE * torch.exp(-od * factors.view(-1, 3, 1, 1))).round().clamp(0, 255).to(torch.uint8)


def _nuclear_fraction(x: torch.Tensor) -> np.ndarray:
    """A colour-threshold "classifier": the fraction of tissue pixels that look like nuclei (B > R - 15)."""
    x = x.float()
    tissue = x.mean(1) < 220
    nuclear = (x[:, 2] - x[:, 0]) > -15
    return ((nuclear & tissue).sum((1, 2)) / tissue.sum((1, 2))).numpy()


def test_reinhard_brings_a_restained_image_back():
    x = _he_images(np.array([0.3]))
    norm = ReinhardNormalizer().fit(x)
    shifted = _restain(x, torch.tensor([1.3, 0.8, 1.1]))
    out = norm(shifted)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    before = (shifted.float() - x.float()).abs().mean()
    after = (out.float() - x.float()).abs().mean()
    assert before > 5.0 and after < 0.25 * before
    # the glass stays white (untouched), and the reference image maps to itself
    assert torch.equal(out[:, :, :8], x[:, :, :8])
    assert (norm(x).float() - x.float()).abs().mean() < 1.0
    assert not norm.last_fallback.any()

    # float in [0, 255] in, float in [0, 255] out; [0, 1] floats with value_range=1
    f = norm(shifted.float())
    assert f.dtype == torch.float32 and f.max() <= 255.0 and f.max() > 200.0
    assert (f - out.float()).abs().max() <= 0.5 + 1e-3
    unit = ReinhardNormalizer(value_range=1.0)
    unit.load_state_dict(norm.state_dict())
    g = unit(shifted.float() / 255.0)
    assert g.max() <= 1.0 and (g * 255.0 - f).abs().max() < 1e-2


def test_reinhard_restores_a_colour_based_auroc():
    rng = np.random.default_rng(0)
    p = np.r_[rng.uniform(0.1, 0.3, 20), rng.uniform(0.3, 0.5, 20)]  # class 1: more nuclei
    y = np.r_[np.zeros(20), np.ones(20)]
    x = _he_images(p)
    assert roc_auc_score(y, _nuclear_fraction(x)) == 1.0
    factors = 0.5 + 1.2 * torch.rand(40, 3, generator=torch.Generator().manual_seed(2))  # per-image restain
    shifted = _restain(x, factors)
    auc_shifted = roc_auc_score(y, _nuclear_fraction(shifted))
    norm = ReinhardNormalizer.from_dict(reference_stats(x, source="originals"))
    auc_norm = roc_auc_score(y, _nuclear_fraction(norm(shifted)))
    assert auc_shifted < 0.75
    assert auc_norm > 0.95


def test_reinhard_fallbacks_and_reference_round_trip():
    x = _he_images(np.array([0.2, 0.4]))
    ref = reference_stats(x, source="two tiles")
    assert ref["method"] == "reinhard" and ref["source"] == "two tiles" and len(ref["mean_lab"]) == 3
    import json

    again = ReinhardNormalizer.from_dict(json.loads(json.dumps(ref)))
    torch.testing.assert_close(again(x), ReinhardNormalizer().fit(x)(x), atol=1, rtol=0)
    blank = torch.full((1, 3, 32, 32), 245, dtype=torch.uint8)  # glass only
    batch = torch.cat([blank, x[:1]])
    out = again(batch)
    assert again.last_fallback.tolist() == [True, False]
    assert torch.equal(out[0], blank[0])
    with pytest.raises(ValueError, match="too little tissue"):
        ReinhardNormalizer().fit(blank)
    with pytest.raises(RuntimeError, match="fit"):
        ReinhardNormalizer()(x)
    with pytest.raises(ConfigError):
        ReinhardNormalizer.from_dict({"method": "reinhard", "mean_lab": [1, 2]})


def _cohort() -> tuple[np.ndarray, np.ndarray]:
    """10 patients with 3-8 images each; patient-level diagnosis (BreakHis-like): 3 positive patients."""
    rng = np.random.default_rng(0)
    patients, labels = [], []
    for i in range(10):
        n = int(rng.integers(3, 9))
        patients += [f"P{i:02d}"] * n
        labels += [int(i in (2, 5, 8))] * n
    return np.array(patients), np.array(labels)


def test_site_calibration_split():
    pid, y = _cohort()
    for seed in range(20):
        for k in (1, 2, 3, 9):
            cal, ev = site_calibration_split(pid, y, k, seed)
            assert len(set(pid[cal])) == k and len(set(pid[ev])) == 10 - k
            assert not set(pid[cal]) & set(pid[ev])
            assert np.array_equal(np.sort(np.r_[cal, ev]), np.arange(len(pid)))
            if k >= 2:
                assert set(y[cal]) == {0, 1}
        a = site_calibration_split(pid, y, 3, seed)
        b = site_calibration_split(pid, y, 3, seed)
        assert all(np.array_equal(u, v) for u, v in zip(a, b))
    splits = {tuple(site_calibration_split(pid, y, 3, s)[0]) for s in range(10)}
    assert len(splits) > 1  # the seed matters
    for k in (0, 10, 11):
        with pytest.raises(ConfigError, match="k="):
            site_calibration_split(pid, y, k, 0)


def test_site_calibrate_known_temperature_and_threshold():
    rng = np.random.default_rng(0)
    m = rng.normal(0.0, 2.0, 4000)  # true logit margin
    y = (rng.random(4000) < 1.0 / (1.0 + np.exp(-m))).astype(int)
    logits = np.stack([np.zeros_like(m), 3.0 * m], 1)  # over-confident by a factor 3
    pid = np.repeat(np.arange(40), 100)
    out = site_calibrate(logits, y, 0.9, patients_cal=pid)
    assert out["temperature"] == pytest.approx(3.0, rel=0.1)
    assert out["n_images"] == 4000 and out["n_patients"] == 40 and out["n_positive"] == int(y.sum())
    assert out["sensitivity"] >= 0.9 and 0.0 < out["specificity"] < 1.0
    # the same decisions as the threshold chosen on the uncalibrated probabilities, mapped to T
    p1_raw = 1.0 / (1.0 + np.exp(-logits[:, 1]))
    thr_raw = threshold_for_sensitivity(y, p1_raw, 0.9)
    assert out["threshold"] == pytest.approx(
        threshold_at_temperature(thr_raw, 1.0, out["temperature"]), abs=1e-6
    )
    with pytest.raises(ConfigError, match="no positive"):
        site_calibrate(logits[y == 0][:50], y[y == 0][:50], 0.9)
    multi = site_calibrate(np.c_[logits, np.zeros(4000)], y, 0.9)
    assert multi["threshold"] is None and multi["temperature"] > 0
