"""torch.distributed set-up for runs launched by ``torchrun`` (or already initialised by the caller).

Data parallelism keeps one global data order: every rank draws the same shuffled global batch of
``train.batch_size`` indices and takes its contiguous slice of ``batch_size / world`` samples, which
is what ``DistributedSampler`` does per epoch, so a DDP run sees exactly the batches of a
single-process run with the same global batch. Only rank 0 writes files.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from cmafnet.devices import resolve_device
from cmafnet.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # setup() created the process group (and fit tears it down)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device_spec: str) -> DistInfo:
    """Join the process group named by the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK).

    A single process (no WORLD_SIZE, or 1) gets ``DistInfo()`` with the resolved device. When the
    caller already initialised the group (e.g. ``mp.spawn`` in tests) it is reused.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return DistInfo(rank, world, local, resolve_device(device_spec, local, "train.device"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo(device=resolve_device(device_spec, option="train.device"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_spec, local, "train.device")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    log.info("joined process group: rank %d of %d (%s)", rank, world, device)
    return DistInfo(rank, world, local, device, owns_group=True)


def launch_rank() -> int:
    """This process's rank before :func:`setup` runs (the same answer): the initialised group's, else
    torchrun's ``RANK`` when ``WORLD_SIZE`` > 1, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ["RANK"]) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def teardown(info: DistInfo) -> None:
    """Destroy the process group if :func:`setup` created it."""
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def per_rank_batch(global_batch: int, info: DistInfo) -> int:
    """Samples per rank; the global batch must split evenly so the average gradient is unchanged."""
    if global_batch % info.world:
        raise ConfigError(
            f"train.batch_size ({global_batch}) must be divisible by the world size ({info.world})"
        )
    return global_batch // info.world


def shard(batch: tuple[torch.Tensor, ...], info: DistInfo) -> tuple[torch.Tensor, ...]:
    """This rank's contiguous slice of a global batch (B/world samples from each tensor)."""
    if not info.enabled:
        return batch
    b = batch[0].shape[0]
    if b % info.world:
        raise ConfigError(f"a batch of {b} cannot be split evenly over {info.world} ranks")
    n = b // info.world
    return tuple(t[info.rank * n : (info.rank + 1) * n] for t in batch)


def all_reduce_float(value: float, info: DistInfo, op: str = "mean") -> float:
    """A float reduced over ranks (for logging): their ``mean``, or their ``max`` (the slowest rank's time)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return float(t.item()) / (1 if op == "max" else info.world)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
