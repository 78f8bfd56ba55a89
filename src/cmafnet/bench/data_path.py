"""The data-path measurement: the real input path against pre-made tensors, on a generated store."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cmafnet.bench.timing import Timing, time_per_step
from cmafnet.data.datasets import IDC
from cmafnet.data.prefetch import Prefetcher, batch_seed

IDC_SIZE = IDC.PUBLISHED["images"]
IDC_CLASS_COUNTS = tuple(IDC.PUBLISHED["per_class"].values())  # IDC negatives / positives (paper §5.1)


def cycle_batches(loader: Any) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Endless iteration over a ``BatchLoader``, moving to the next epoch when one ends."""
    for epoch in itertools.count():
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the loader yields no batches (store smaller than one batch?)")


def measure_data_path(
    batches: Iterator[tuple[Tensor, Tensor, Tensor]],
    preprocess: Callable[[Tensor], Tensor],
    step: Callable[[Tensor, Tensor], Any],
    premade: tuple[Tensor, Tensor],
    timing: Timing,
    *,
    steps: int,
) -> dict[str, Any]:
    """End-to-end training steps through the real input path against the same steps on pre-made tensors.

    ``batches`` yields uint8 ``(B, 3, h, w)`` batches on the device, ``preprocess`` turns one into the
    model input (stain normalisation, augmentation, resize, mean/std), ``step(x, y)`` is the training
    step. The overhead is ``(t_end_to_end - t_premade) / t_premade``: the share of an epoch the
    model spends waiting for (or computing) its input. ``overhead_pct`` is the trainer's path (on
    CUDA the next batch is prepared on a side stream during the step, :mod:`cmafnet.data.prefetch`);
    ``overhead_serial_pct`` prepares each batch before its step. The input path alone is timed too.
    """

    def prep(batch: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            return preprocess(batch[0]), batch[1]

    device = premade[0].device

    def prepared(overlap: bool) -> Iterator[tuple[Tensor, ...]]:
        # as the trainer does it: one RNG seed per batch position; the overlapped path prepares
        # batch i + 1 on a side CUDA stream during step i (serial on the CPU)
        seed = lambda b: batch_seed(0, 0, b)  # noqa: E731
        return iter(Prefetcher(batches, prep, device=device, seed=seed, overlap=overlap))

    overlapped, serial = prepared(True), prepared(False)
    t_e2e = time_per_step(lambda: step(*next(overlapped)), timing, steps=steps)
    t_serial = time_per_step(lambda: step(*next(serial)), timing, steps=steps)
    t_pre = time_per_step(lambda: step(*premade), timing, steps=steps)
    t_data = time_per_step(lambda: next(serial), timing, steps=steps)
    batch = premade[0].shape[0]
    return {
        "steps": steps,
        "overlapped": device.type == "cuda",
        "end_to_end_step_ms": t_e2e * 1e3,
        "end_to_end_serial_step_ms": t_serial * 1e3,
        "premade_step_ms": t_pre * 1e3,
        "data_only_step_ms": t_data * 1e3,
        "data_only_img_s": batch / t_data,
        "end_to_end_img_s": batch / t_e2e,
        "overhead_pct": 100.0 * (t_e2e - t_pre) / t_pre,
        "overhead_serial_pct": 100.0 * (t_serial - t_pre) / t_pre,
    }


def make_store(n: int, *, seed: int = 0, size: int = 50, bank: int = 1024):
    """``n`` generated H&E-coloured uint8 patches ``(n, size, size, 3)`` and labels (28.4% positive).

    A bank of random patches (pink stroma / purple nuclei mixtures with noise, so Macenko sees a
    two-stain image) is repeated to ``n``: the timing depends on the size, not on the content.
    """
    rng = np.random.default_rng(seed)
    bank = min(bank, n)
    eosin, hema = np.array([230.0, 150.0, 190.0]), np.array([110.0, 60.0, 150.0])
    mix = rng.random((bank, size, size, 1)) ** 2  # share of haematoxylin per pixel
    img = (1 - mix) * eosin + mix * hema + rng.normal(0, 12, (bank, size, size, 3))
    patches = np.clip(img, 0, 255).astype(np.uint8)
    images = np.resize(patches, (n, size, size, 3))  # repeats the bank (a contiguous copy)
    labels = (rng.random(n) < IDC_CLASS_COUNTS[1] / sum(IDC_CLASS_COUNTS)).astype(np.int64)
    return images, labels
