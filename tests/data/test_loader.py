"""BatchLoader: exact order per (seed, epoch), mid-epoch resume, drop_last."""

from __future__ import annotations

import numpy as np
import torch

from cmafnet.data.loader import BatchLoader


def _data(n: int = 53) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 6, 5, 3), dtype=np.uint8), rng.integers(0, 2, n)


def test_batches_match_store_rows() -> None:
    images, labels = _data()
    idx = np.arange(3, 50)
    loader = BatchLoader(images, labels, idx, 8, shuffle=True, seed=1)
    seen = []
    for x, y, i in loader:
        assert x.shape[1:] == (3, 6, 5) and x.dtype == torch.uint8
        np.testing.assert_array_equal(x.permute(0, 2, 3, 1).numpy(), images[i.numpy()])
        np.testing.assert_array_equal(y.numpy(), labels[i.numpy()])
        seen += i.tolist()
    assert sorted(seen) == idx.tolist() and len(loader) == 6


def test_order_by_seed_epoch_and_resume() -> None:
    images, labels = _data()
    loader = BatchLoader(images, labels, np.arange(53), 10, shuffle=True, seed=7)
    loader.set_epoch(2)
    full = [i.clone() for _, _, i in loader]
    loader.set_epoch(2)
    assert all(torch.equal(a, b) for a, b in zip(full, [i for _, _, i in loader]))
    loader.set_epoch(3)
    assert not torch.equal(full[0], next(iter(loader))[2])
    loader.set_epoch(2, start_batch=3)
    resumed = [i for _, _, i in loader]
    assert len(resumed) == len(full) - 3 and all(torch.equal(a, b) for a, b in zip(full[3:], resumed))
    assert len([i for _, _, i in loader]) == len(full)  # start_batch applies to one pass only


def test_drop_last() -> None:
    images, labels = _data()
    loader = BatchLoader(images, labels, np.arange(53), 10, drop_last=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 5 and all(len(b[0]) == 10 for b in batches)
