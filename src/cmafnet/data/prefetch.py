"""Overlap the input path with compute: batch ``b + 1`` is prepared on a side CUDA stream during step ``b``.

The input path (loader ``index_select`` + :class:`~cmafnet.data.transforms.GPUPreprocess`: Macenko,
augmentation, bicubic resize, normalisation) is ~19 ms per batch of 128 on an H200 against a ~100 ms
training step. Run serially it adds ~26% to every step; on a side stream it runs while the model trains.

Determinism: augmentation draws from the global torch RNGs (kornia and :class:`HEDJitter` call
``torch.rand``). Prepared one batch early, those draws would land before the training step's own draws
(dropout, ...) and change both. So every batch is prepared inside :func:`seeded_rng`: the global CPU
and device generators are forked, seeded with :func:`batch_seed` ``(seed, epoch, batch, rank)`` and
restored afterwards. A batch's augmentation is then a function of its position alone, identical on the
serial and the overlapped path, after a mid-epoch resume, and whether or not a prefetched batch is ever
used; the training step sees the same global RNG stream as if no preprocessing had run.

CUDA stream rules followed here: the side stream first waits for the current stream (the uint8 store and
the module buffers were made there); before a batch is handed over the current stream waits for the side
stream, and every produced tensor is ``record_stream``-ed on the current stream so the caching allocator
does not give its memory to the side stream's next batch while the step still reads it. On a CPU device
(or with ``overlap=False``) the same preparation runs serially, in the same order, with the same seeds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

Batch = tuple[torch.Tensor, ...]


def batch_seed(seed: int, epoch: int, batch: int, rank: int = 0) -> int:
    """The RNG seed of one batch's preprocessing: a hash of its position (via ``numpy.SeedSequence``).

    Args:
        seed: the run's seed (``train.seed``).
        epoch: the loader epoch (the one that also seeds the batch order).
        rank: the distributed rank (ranks hold different images, so they get different parameters).
    """
    if min(seed, epoch, batch, rank) < 0:
        raise ValueError(f"batch_seed needs non-negative values, got {(seed, epoch, batch, rank)}")
    return int(np.random.SeedSequence([seed, epoch, batch, rank]).generate_state(1, np.uint64)[0])


@contextmanager
def seeded_rng(seed: int, device: str | torch.device) -> Iterator[None]:
    """Run the body with the CPU generator (and ``device``'s CUDA generator) seeded by ``seed``.

    The previous generator states come back on exit, so the body neither depends on nor changes the
    global random stream. Only host-side generator state is touched (no device synchronisation).
    """
    device = torch.device(device)
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.default_generators[devices[0]].manual_seed(seed)
        yield


class Prefetcher:
    """Iterates ``prepare(batch)`` over ``batches``, preparing the next batch on a side CUDA stream.

    When batch ``b + 1`` starts: with ``early=True`` just before batch ``b`` is handed over. With
    ``early=False`` when the consumer calls :meth:`launch_next` (the trainer does it once the model's
    forward pass for batch ``b`` is launched, so the host launches the preprocessing kernels while the
    GPU runs the forward pass: a step that reads the loss back cannot hide host time spent before it);
    a batch nobody launched is prepared when it is asked for.

    Args:
        batches: iterable of tensor tuples on ``device`` (e.g. a :class:`BatchLoader` epoch).
        prepare: turns one batch into what the consumer needs (e.g. shard + ``GPUPreprocess``);
            returns a tuple of tensors. It must not depend on state the consumer changes per step.
        device: the device the batches live on; overlap happens only for CUDA.
        seed: ``seed(b) -> int`` for batch index ``b`` (see :func:`batch_seed`); each ``prepare``
            then runs inside :func:`seeded_rng`. None: ``prepare`` uses the global RNG as it stands,
            which is deterministic only on the serial path.
        start: index of the first batch ``batches`` yields (a loader resumed at ``start_batch``).
        limit: stop before batch index ``limit`` (the loader is not asked for, nor is anything
            prepared for, batches the consumer will not use).
        overlap: use the side stream (default: when ``device`` is CUDA). False, or a CPU device:
            serial, same order and same seeds; :meth:`launch_next` does nothing.
        early: start the next batch before handing over the current one (see above).
    """

    def __init__(
        self,
        batches: Iterable[Batch],
        prepare: Callable[[Batch], Batch],
        *,
        device: str | torch.device,
        seed: Callable[[int], int] | None = None,
        start: int = 0,
        limit: int | None = None,
        overlap: bool | None = None,
        early: bool = True,
    ) -> None:
        self.batches, self.prepare, self.seed = batches, prepare, seed
        self.device = torch.device(device)
        self.start, self.limit, self.early = int(start), limit, bool(early)
        # nothing to overlap with on the CPU: the serial path
        self.overlap = self.device.type == "cuda" and (overlap is None or bool(overlap))
        self._it: Iterator[Batch] | None = None
        self._side: torch.cuda.Stream | None = None
        self._next_b = self.start  # index of the next batch to prepare
        self._pending: Batch | None = None  # prepared (enqueued on the side stream), not handed over
        self._done = False

    def _prepare(self, batch: Batch, b: int) -> Batch:
        with seeded_rng(self.seed(b), self.device) if self.seed is not None else nullcontext():
            return tuple(self.prepare(tuple(batch)))

    def _produce(self) -> Batch | None:
        """Prepare the next batch (on the side stream when overlapping); None at the end."""
        if self._done or (self.limit is not None and self._next_b >= self.limit):
            self._done = True
            return None
        stream = torch.cuda.stream(self._side) if self._side is not None else nullcontext()
        with stream:  # the loader's index_select runs on the side stream too
            batch = next(self._it, None)
            if batch is None:
                self._done = True
                return None
            out = self._prepare(batch, self._next_b)
        self._next_b += 1
        return out

    def launch_next(self) -> None:
        """Start preparing the next batch on the side stream now (once; no-op when serial or at the end)."""
        if self.overlap and self._it is not None and self._pending is None and not self._done:
            self._pending = self._produce()

    def __iter__(self) -> Iterator[Batch]:
        self._it, self._next_b, self._pending, self._done = iter(self.batches), self.start, None, False
        if not self.overlap:
            return iter(self._produce, None)
        main = torch.cuda.current_stream(self.device)
        self._side = torch.cuda.Stream(self.device)
        self._side.wait_stream(main)  # the store, the order and module buffers may have been written on main
        return self._overlapped(main)

    def _overlapped(self, main: torch.cuda.Stream) -> Iterator[Batch]:
        self.launch_next()
        while True:
            cur, self._pending = self._pending, None
            if cur is None:
                cur = self._produce()  # nobody launched it: prepare it now
                if cur is None:
                    return
            main.wait_stream(self._side)  # this batch is complete before main reads it
            for t in cur:
                if isinstance(t, torch.Tensor) and t.is_cuda:
                    t.record_stream(main)  # its memory stays main's until main's work on it is done
            if self.early:
                self.launch_next()  # batch b + 1 goes onto the side stream before main gets batch b
            yield cur
