"""Clipping, lr schedules, AdamW groups and checkpoints."""

from __future__ import annotations

import itertools
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from cmafnet.config import ClipConfig
from cmafnet.errors import RunFolderError
from cmafnet.training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from cmafnet.training.clipping import GradClipper
from cmafnet.training.optim import param_groups
from cmafnet.training.schedules import CYCLIC_FLOOR, lr_factor


def _grads(values):
    ps = []
    for v in values:
        p = nn.Parameter(torch.zeros(len(v)))
        p.grad = torch.tensor(v, dtype=torch.float32)
        ps.append(p)
    return ps


def _clip(clipper: GradClipper, ps: list[nn.Parameter]) -> torch.Tensor:
    """Clip as the step does: the total norm and its finiteness, then the clipper; returns the norm."""
    total = torch.nn.utils.get_total_norm([p.grad for p in ps])
    clipper(ps, total, torch.isfinite(total))
    return total


def test_autoclip_clips_at_history_percentile():
    clip = GradClipper(ClipConfig(kind="autoclip", percentile=50, history=10))
    for n in (1.0, 2.0, 3.0):
        _clip(clip, _grads([[n, 0.0]]))
    big = _grads([[0.0, 10.0]])
    pre = _clip(clip, big)
    assert float(pre) == pytest.approx(10.0)
    # history [1, 2, 3, 10] -> median 2.5
    assert float(big[0].grad.norm()) == pytest.approx(2.5, rel=1e-4)
    state = clip.state_dict()
    other = GradClipper(ClipConfig(kind="autoclip", percentile=50, history=10))
    other.load_state_dict(state)
    assert other.state_dict()["history"] == [1.0, 2.0, 3.0, 10.0]


def test_norm_clip_and_agc():
    ps = _grads([[3.0, 4.0]])
    _clip(GradClipper(ClipConfig(kind="norm", max_norm=1.0)), ps)
    assert float(ps[0].grad.norm()) == pytest.approx(1.0, rel=1e-5)
    p = nn.Parameter(torch.ones(4, 4))
    p.grad = torch.full((4, 4), 100.0)
    _clip(GradClipper(ClipConfig(kind="agc", agc_clip=0.01)), [p])
    # AGC: per-row grad norm <= 0.01 * per-row weight norm (= 0.02)
    assert float(p.grad[0].norm()) == pytest.approx(0.01 * 2.0, rel=1e-4)


def test_nonfinite_norm_is_not_recorded():
    clip = GradClipper(ClipConfig(kind="autoclip"))
    assert not torch.isfinite(_clip(clip, _grads([[float("nan"), 1.0]])))
    assert clip.state_dict()["history"] == []


def test_schedules():
    assert lr_factor("cosine", 0, 100) == pytest.approx(1.0)
    assert lr_factor("cosine", 50, 100) == pytest.approx(0.5)
    warm = [lr_factor("warmup_cosine", s, 100, warmup=10) for s in range(100)]
    assert all(a < b for a, b in itertools.pairwise(warm[:11])) and max(warm) == pytest.approx(1.0)
    assert warm[-1] < 0.01
    cyc = [lr_factor("cyclic", s, 100, cycles=2) for s in range(100)]
    peaks = [i for i in range(1, 99) if cyc[i] >= cyc[i - 1] and cyc[i] > cyc[i + 1]]
    assert len(peaks) == 2 and min(cyc) == pytest.approx(CYCLIC_FLOOR) and max(cyc) == pytest.approx(1.0)
    assert lr_factor("constant", 7, 10) == 1.0
    with pytest.raises(ValueError):
        lr_factor("step", 0, 1)


def test_param_groups_exempt_biases_norms_temperatures_embeddings():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.log_tau = nn.Parameter(torch.zeros(8))
            self.pos_embed = nn.Parameter(torch.zeros(1, 16, 4))
            self.fc = nn.Linear(4, 2)
            self.frozen = nn.Linear(2, 2)
            self.frozen.requires_grad_(False)

    m = M()
    extra = nn.Parameter(torch.ones(3, 3))  # e.g. the objective's learned weights
    groups = {g["name"]: g for g in param_groups(m.named_parameters(), 1e-4, extra_no_decay=[extra])}
    decay = {id(p) for p in groups["decay"]["params"]}
    assert decay == {id(m.conv.weight), id(m.fc.weight)} and groups["decay"]["weight_decay"] == 1e-4
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    assert {id(m.log_tau), id(m.pos_embed), id(m.bn.weight), id(m.fc.bias), id(extra)} <= no_decay
    assert id(m.frozen.weight) not in decay | no_decay and groups["no_decay"]["weight_decay"] == 0.0


def test_rng_state_roundtrip_through_checkpoint(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    save_checkpoint(tmp_path / "c.pt", {"rng": rng_state()})
    a = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"])
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def crash(fd):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "fsync", crash)  # dies after the bytes were written to the temp file
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp file left behind


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_loading_refuses_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": 1, "payload": _Evil()}, path)
    with pytest.raises(RunFolderError, match="refused"):
        load_checkpoint(path)
    torch.save({"format": 1, "obj": nn.Linear(2, 2)}, tmp_path / "module.pt")  # a pickled module, too
    with pytest.raises(RunFolderError, match="refused"):
        load_checkpoint(tmp_path / "module.pt")
    (tmp_path / "torn.pt").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(RunFolderError):
        load_checkpoint(tmp_path / "torn.pt")
