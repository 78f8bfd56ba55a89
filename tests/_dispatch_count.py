"""Counting aten ops and device-to-host reads in a block (for the fast-path tests)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """Records aten ops; ``.item()``/``float()``/``bool()`` dispatch to ``_local_scalar_dense``."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_ops() -> Iterator[OpCounter]:
    """Counts aten ops and host reads (``.tolist()`` does not dispatch: it is patched)."""
    counter = OpCounter()
    tolist = torch.Tensor.tolist

    def counted_tolist(t: torch.Tensor):
        counter.syncs += 1
        return tolist(t)

    torch.Tensor.tolist = counted_tolist  # type: ignore[method-assign]
    try:
        with counter:
            yield counter
    finally:
        torch.Tensor.tolist = tolist  # type: ignore[method-assign]
