"""The feature cache: written once, reused, invalidated by a changed input; BatchLoader walks its embeddings
like the store's images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cmafnet.data.features import (
    FEATURES_FILE,
    KEY_FILE,
    cache_key,
    default_cache_dir,
    load_or_extract,
)
from cmafnet.data.loader import BatchLoader, as_tensor
from cmafnet.errors import CmafnetError

N, D = 10, 4
IMAGES = torch.arange(N * 3, dtype=torch.float32).view(N, 3)


def _batches():
    for start in range(0, N, 4):  # the last batch is short
        idx = torch.arange(start, min(start + 4, N))
        yield idx, IMAGES[idx]


class Embed:
    """Counts its calls: a reused cache never embeds."""

    def __init__(self, scale: float = 1.0) -> None:
        self.calls, self.scale = 0, scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.cat([x, x.sum(1, keepdim=True)], 1) * self.scale  # (B, D)


def test_written_once_then_reused_and_a_changed_input_extracts_again(tmp_path) -> None:
    parts = {"store_hash": "abc", "backbone": {"fingerprint": "f0"}, "preprocess": {"img_size": 32}}
    embed = Embed()
    first = load_or_extract(tmp_path, parts, (N, D), _batches, embed)
    assert not first.reused and embed.calls == 3 and first.seconds > 0
    assert np.array_equal(first.features, embed(IMAGES).numpy())
    assert isinstance(first.features, np.memmap)  # memory-mapped from disk, not held in memory
    doc = json.loads((first.folder / KEY_FILE).read_text())
    assert doc["key"] == first.key == cache_key(parts) and doc["parts"] == parts

    again = load_or_extract(tmp_path, dict(parts), (N, D), _batches, Embed())
    assert again.reused and again.folder == first.folder and np.array_equal(again.features, first.features)

    for change in (
        {"store_hash": "abd"},
        {"backbone": {"fingerprint": "f1"}},
        {"preprocess": {"img_size": 64}},
    ):
        other = Embed(scale=2.0)
        res = load_or_extract(tmp_path, {**parts, **change}, (N, D), _batches, other)
        assert not res.reused and other.calls == 3 and res.folder != first.folder
    assert len(list(tmp_path.iterdir())) == 4


def test_an_incomplete_or_foreign_entry_is_extracted_again(tmp_path) -> None:
    parts = {"store_hash": "abc"}
    first = load_or_extract(tmp_path, parts, (N, D), _batches, Embed())
    (first.folder / KEY_FILE).write_text(json.dumps({"key": "someone else's"}))
    embed = Embed()
    assert not load_or_extract(tmp_path, parts, (N, D), _batches, embed).reused and embed.calls == 3
    (first.folder / KEY_FILE).unlink()  # an extraction that died before its key was written
    assert not load_or_extract(tmp_path, parts, (N, D), _batches, Embed()).reused
    assert sorted(p.name for p in first.folder.iterdir()) == [FEATURES_FILE, KEY_FILE]  # no temporary left


def test_non_finite_or_missing_embeddings_are_refused(tmp_path) -> None:
    with pytest.raises(CmafnetError, match=r"non-finite embeddings for store rows \[4"):
        load_or_extract(
            tmp_path,
            {"a": 1},
            (N, D),
            _batches,
            lambda x: torch.where(x[:, :1] >= 12, np.nan, 0.0).expand(-1, D),
        )
    with pytest.raises(CmafnetError, match="2 store rows were not embedded"):
        load_or_extract(tmp_path, {"a": 2}, (N, D), lambda: list(_batches())[:2], Embed())
    assert not list(tmp_path.glob("*/" + FEATURES_FILE))


def test_embeddings_are_walked_like_the_images() -> None:
    feats = as_tensor(np.arange(N * D, dtype=np.float32).reshape(N, D))
    labels, idx = np.arange(N) % 2, np.array([1, 3, 4, 6, 7, 8, 9])
    images = np.zeros((N, 2, 2, 3), np.uint8)
    for shuffle, drop in ((True, True), (False, False)):
        a = BatchLoader(feats, labels, idx, 3, shuffle=shuffle, seed=5, drop_last=drop)
        b = BatchLoader(images, labels, idx, 3, shuffle=shuffle, seed=5, drop_last=drop)
        for epoch in (0, 1):
            a.set_epoch(epoch, 1)
            b.set_epoch(epoch, 1)
            got, want = list(a), list(b)
            assert len(got) == len(want) == len(a) - 1
            for (z, y, i), (_, y2, i2) in zip(got, want, strict=True):
                assert torch.equal(i, i2) and torch.equal(y, y2) and torch.equal(z, feats[i])
                assert z.shape == (len(i), D) and z.dtype == torch.float32  # (B, D), not permuted
    assert [i.tolist() for _, _, i in a] == [[1, 3, 4], [6, 7, 8], [9]]  # shuffle=False: the given order
    with pytest.raises(ValueError, match=r"\(N, D\) embeddings"):
        BatchLoader(feats.view(N, 2, 2), labels, idx, 3)  # neither images nor (N, D) rows


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("CMAFNET_FEATURE_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CMAFNET_FEATURE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x" / "cmafnet" / "features"
