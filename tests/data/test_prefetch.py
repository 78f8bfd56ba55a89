"""The prefetcher yields exactly the serial loop's batches (also after a resume) and leaves the global RNG alone."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cmafnet.config import DataConfig
from cmafnet.data.loader import BatchLoader
from cmafnet.data.prefetch import Prefetcher, batch_seed, seeded_rng
from cmafnet.data.transforms import GPUPreprocess

SEED = 7


def _store(n: int = 24, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.integers(30, 230, (n, size, size, 3), dtype=np.uint8), rng.integers(0, 2, n)


def _setup(device: str, stain: bool = False, n: int = 24, size: int = 16, bs: int = 4, out: int = 24):
    images, labels = _store(n, size)
    loader = BatchLoader(
        images, labels, np.arange(n), bs, shuffle=True, seed=SEED, device=device, drop_last=True
    )
    cfg = DataConfig.model_validate({"stain": {"enabled": stain}})  # augmentation on (the default)
    pre = GPUPreprocess(cfg, out, train=True).to(device)

    def prep(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x8, y, idx = batch
        return pre(x8), y, idx

    return loader, prep


def _serial(
    loader: BatchLoader, prep, epoch: int, device: str, start: int = 0
) -> list[tuple[torch.Tensor, ...]]:
    """The reference: the plain loop, each batch prepared under its position's seed."""
    loader.set_epoch(epoch, start)
    out = []
    for b, batch in enumerate(loader, start=start):
        with seeded_rng(batch_seed(SEED, epoch, b), device):
            out.append(tuple(t.clone() for t in prep(batch)))
    return out


def _prefetched(
    loader, prep, epoch: int, device: str, start: int = 0, **kw
) -> list[tuple[torch.Tensor, ...]]:
    loader.set_epoch(epoch, start)
    pf = Prefetcher(loader, prep, device=device, seed=lambda b: batch_seed(SEED, epoch, b), start=start, **kw)
    return [tuple(t.clone() for t in batch) for batch in pf]


def _assert_same(a: list, b: list) -> None:
    assert len(a) == len(b) > 0
    for i, (ba, bb) in enumerate(zip(a, b, strict=True)):
        for ta, tb in zip(ba, bb, strict=True):
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), f"batch {i} differs"


def test_batch_seed_depends_on_every_coordinate() -> None:
    base = batch_seed(1, 2, 3, 0)
    assert base == batch_seed(1, 2, 3, 0)
    others = {batch_seed(2, 2, 3, 0), batch_seed(1, 3, 3, 0), batch_seed(1, 2, 4, 0), batch_seed(1, 2, 3, 1)}
    assert base not in others and len(others) == 4
    with pytest.raises(ValueError, match="non-negative"):
        batch_seed(-1, 0, 0)


@pytest.mark.parametrize("overlap", [None, True, False])
def test_prefetcher_cpu_matches_serial_loop(overlap) -> None:
    loader, prep = _setup("cpu")
    ref = _serial(loader, prep, epoch=1, device="cpu")
    got = _prefetched(loader, prep, epoch=1, device="cpu", overlap=overlap)
    _assert_same(got, ref)
    assert len(got) == 6  # 24 images / batch 4
    # the augmentation is on: batch 0's images under batch 1's seed come out differently
    loader.set_epoch(1)
    first = next(iter(loader))
    with seeded_rng(batch_seed(SEED, 1, 1), "cpu"):
        other = prep(first)[0]
    assert not torch.equal(other, ref[0][0])


@pytest.mark.parametrize("start", [1, 4])
def test_prefetcher_resume_at_start_batch_is_the_tail_of_the_full_epoch(start: int) -> None:
    loader, prep = _setup("cpu")
    full = _prefetched(loader, prep, epoch=3, device="cpu")
    _assert_same(_prefetched(loader, prep, epoch=3, device="cpu", start=start), full[start:])
    _assert_same(_serial(loader, prep, epoch=3, device="cpu", start=start), full[start:])


def test_preparation_leaves_the_global_rng_untouched() -> None:
    loader, prep = _setup("cpu")
    torch.manual_seed(123)
    before = torch.get_rng_state()
    _prefetched(loader, prep, epoch=0, device="cpu")
    assert torch.equal(torch.get_rng_state(), before)


def test_limit_stops_without_asking_for_more_batches() -> None:
    asked = []

    def batches():
        for b in range(10):
            asked.append(b)
            yield (torch.full((2,), float(b)),)

    pf = Prefetcher(batches(), lambda batch: (batch[0] * 2,), device="cpu", start=3, limit=6, overlap=True)
    assert not pf.overlap  # nothing to overlap with on the CPU
    out = [t.tolist() for (t,) in pf]
    assert out == [[0.0, 0.0], [2.0, 2.0], [4.0, 4.0]]  # batch indices 3, 4, 5 (the first 3 yielded)
    assert asked == [0, 1, 2]


def test_launch_next_is_a_noop_on_the_serial_path() -> None:
    loader, prep = _setup("cpu")
    ref = _serial(loader, prep, epoch=0, device="cpu")
    loader.set_epoch(0)
    pf = Prefetcher(loader, prep, device="cpu", seed=lambda b: batch_seed(SEED, 0, b), early=False)
    got = []
    for batch in pf:
        pf.launch_next()
        pf.launch_next()  # twice, as a SAM step calls the loss function twice
        assert pf._pending is None  # nothing prepared ahead on the CPU
        got.append(tuple(t.clone() for t in batch))
    _assert_same(got, ref)


def test_trainer_prepares_batches_with_per_batch_seeds(tmp_path) -> None:
    """The trainer's epoch runs through the prefetcher: its preprocessing leaves the global RNG stream
    alone (so the step's own draws do not depend on it) and gets the same noise for the same batch."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
    toy = importlib.import_module("_training_toy")
    seen: list[torch.Tensor] = []
    data = toy.toy_data(noise=0.5)
    pre = data.preprocess_train

    def recording(x8: torch.Tensor) -> torch.Tensor:
        x = pre(x8)
        seen.append(x.clone())
        return x

    data.preprocess_train = recording
    cfg = toy.toy_config(stages=[{"name": "all", "epochs": 1, "lr": 1e-2, "train": "all"}])
    from cmafnet.training.epoch import _batches

    tr = toy.make_trainer(tmp_path, cfg, data)
    assert tr.device.type == "cpu"  # a CPU run: the serial path
    first = [x for x, _ in _batches(tr, data.make_loader(data.train_idx, 8, True, True, 0, 0))]
    torch.manual_seed(0)
    state = torch.get_rng_state()
    again = [x for x, _ in _batches(tr, data.make_loader(data.train_idx, 8, True, True, 0, 0))]
    assert torch.equal(torch.get_rng_state(), state)
    _assert_same([(a,) for a in again], [(f,) for f in first])
    assert not torch.equal(first[0], first[1])  # different batches, different noise
    assert len(seen) == 2 * tr.steps_per_epoch


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prefetch_on_cuda_launched_by_the_consumer_matches_serial_bitwise() -> None:
    """``early=False``: the consumer launches batch b + 1 after queuing its own work (as the trainer does)."""
    loader, prep = _setup("cuda", stain=True, n=1024, size=50, bs=128, out=224)
    ref = _serial(loader, prep, epoch=1, device="cuda")
    loader.set_epoch(1)
    pf = Prefetcher(loader, prep, device="cuda", seed=lambda b: batch_seed(SEED, 1, b), early=False)
    w = torch.randn(4096, 4096, device="cuda")
    got = []
    for i, batch in enumerate(pf):
        w = torch.tanh(w @ w * 1e-3)  # the "forward pass"
        if i % 3:  # sometimes nobody launches it: prepared on demand
            pf.launch_next()
        torch.manual_seed(i)  # the step's own RNG use must not matter
        w = torch.tanh(w @ w * 1e-3) + 1e-3 * torch.rand_like(w)
        got.append(tuple(t.clone() for t in batch))
    torch.cuda.synchronize()
    _assert_same(got, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_trainer_on_cuda_prefetch_equals_serial(tmp_path) -> None:
    """Whole toy runs (dropout and preprocessing noise on, bf16): overlapped and serial give the same weights."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
    toy = importlib.import_module("_training_toy")
    cfg = toy.toy_config(amp="bf16", stages=[{"name": "all", "epochs": 2, "lr": 1e-2, "train": "all"}])
    prev = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        states = []
        for prefetch in (True, False):
            toy.seed_everything(cfg.train.seed)
            data = toy.toy_data(device="cuda")
            model = toy.ToyNet().cuda()
            objective = toy.Objective(cfg.loss, cfg.regularizers, data.class_counts, num_heads=1).cuda()
            tr = toy.build_run(cfg, model, objective, data, tmp_path / str(prefetch), progress=False)
            assert tr.prefetch
            tr.prefetch = prefetch
            assert toy.run_stages(tr)["status"] == "finished"
            states.append({k: v.detach().cpu() for k, v in tr.model.state_dict().items()})
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prefetch_on_cuda_matches_serial_bitwise() -> None:
    """Side-stream preparation (Macenko + augmentation + bicubic) against the serial loop, with main-stream
    work between the batches so the two streams really run at the same time."""
    loader, prep = _setup("cuda", stain=True, n=1024, size=50, bs=128, out=224)
    ref = _serial(loader, prep, epoch=2, device="cuda")
    loader.set_epoch(2)
    pf = Prefetcher(loader, prep, device="cuda", seed=lambda b: batch_seed(SEED, 2, b))
    assert pf.overlap
    w = torch.randn(4096, 4096, device="cuda")
    got = []
    for batch in pf:
        for _ in range(8):  # a "training step" on the main stream while batch b + 1 is prepared
            w = torch.tanh(w @ w * 1e-3)
        got.append(tuple(t.clone() for t in batch))
    torch.cuda.synchronize()
    _assert_same(got, ref)
    _assert_same(_prefetched(loader, prep, epoch=2, device="cuda", start=3), ref[3:])
