"""Batches straight from a store-wide array: one ``index_select`` per batch, no per-row Python.

The array is the uint8 image store (277k IDC patches are ~2 GB) or a probe's cached float32
embeddings of it (:mod:`cmafnet.data.features`). It is either kept on the training device
(``resident``) or read from host memory into a pinned buffer and copied with
``non_blocking=True``. The order of an epoch is a pure function of ``(seed, epoch)``, so a run
resumed at ``start_batch`` sees exactly the batches it would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


class BatchLoader:
    """Yields ``(x, y (B,), idx (B,))`` on ``device``: store rows ``idx`` of ``data`` and their labels.

    For images ``x`` is uint8 ``(B, 3, H, W)``, a channels-last view (``permute`` of the NHWC
    store), which is what the models want; for embeddings it is ``(B, D)`` as stored.

    Args:
        data: uint8 images ``(N, H, W, 3)`` or embeddings ``(N, D)``: a numpy array / memory map
            or a torch tensor (one already on ``device`` is used in place when resident).
        labels: store-wide integer labels ``(N,)``.
        indices: the store rows this loader walks over (a split, maybe undersampled).
        shuffle: reshuffle every epoch (seeded by ``seed`` and the epoch).
        resident: keep ``data`` on ``device`` (default: always for CPU; for CUDA, when ``data``
            is on the GPU already or takes less than half of the free memory).
    """

    def __init__(
        self,
        data: np.ndarray | torch.Tensor,
        labels: np.ndarray | torch.Tensor,
        indices: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = False,
        seed: int = 0,
        device: str | torch.device = "cpu",
        drop_last: bool = False,
        resident: bool | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.device = torch.device(device)
        self.indices = np.asarray(indices, np.int64)
        self.batch_size = int(batch_size)
        self.shuffle, self.seed, self.drop_last = shuffle, int(seed), drop_last
        self.epoch = 0
        self.start_batch = 0  # consumed by the next iteration, then reset to 0
        host = data if isinstance(data, torch.Tensor) else as_tensor(data)
        self._images = host.ndim == 4  # NHWC images, yielded channels-first; else (N, D) rows
        if not (self._images and host.dtype == torch.uint8 and host.shape[-1] == 3) and host.ndim != 2:
            raise ValueError(
                "data must be uint8 (N, H, W, 3) images or (N, D) embeddings, "
                f"got {host.dtype} {tuple(host.shape)}"
            )
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= host.shape[0]):
            raise ValueError("indices out of range for the data array")
        cuda = self.device.type == "cuda"
        if resident is None:
            resident = not cuda or host.is_cuda or host.nbytes < 0.5 * torch.cuda.mem_get_info(self.device)[0]
        self.resident = resident
        self.data = host.to(self.device) if resident else host
        self.labels = torch.as_tensor(labels).to(self.device, torch.int64)
        self._pin = cuda and not resident
        self._buffers: list[torch.Tensor] = []
        self._events: list[torch.cuda.Event | None] = [None, None]

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order; ``start_batch`` skips that many batches (exact resume)."""
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def __len__(self) -> int:
        """Batches in a full epoch (``start_batch`` not subtracted)."""
        n = len(self.indices)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _host_batch(self, sel: torch.Tensor, slot: int) -> torch.Tensor:
        # gather into one of two pinned buffers; wait until its previous copy has finished
        b = sel.numel()
        if len(self._buffers) < 2:
            shape = (self.batch_size, *self.data.shape[1:])
            self._buffers = [torch.empty(shape, dtype=self.data.dtype).pin_memory() for _ in range(2)]
        if self._events[slot] is not None:
            self._events[slot].synchronize()
        buf = self._buffers[slot][:b]
        torch.index_select(self.data, 0, sel, out=buf)
        x = buf.to(self.device, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record()
        self._events[slot] = ev
        return x

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        order = self.indices
        if self.shuffle:  # a permutation seeded by (seed, epoch)
            order = order[np.random.default_rng([self.seed, self.epoch]).permutation(len(order))]
        order = torch.from_numpy(order)
        start, self.start_batch = self.start_batch, 0
        order_dev = order.to(self.device)
        for b in range(start, len(self)):
            sel = order[b * self.batch_size : (b + 1) * self.batch_size]
            sel_dev = order_dev[b * self.batch_size : (b + 1) * self.batch_size]
            if self.resident:
                x = self.data.index_select(0, sel_dev)
            elif self._pin:
                x = self._host_batch(sel, b % 2)
            else:
                x = self.data.index_select(0, sel)
            # images: (B, H, W, 3) -> (B, 3, H, W) as a channels-last view, no copy
            x = x.permute(0, 3, 1, 2) if self._images else x
            yield x, self.labels.index_select(0, sel_dev), sel_dev


def as_tensor(data: np.ndarray) -> torch.Tensor:
    """Wrap a numpy array / read-only memory map without copying (it is never written to)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "array is not writable"
        return torch.from_numpy(data)
