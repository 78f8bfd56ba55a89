"""Multiply-accumulates of a model's forward pass: one counter for ``cmafnet info``, the benchmark and the
trainer's compute records.

MACs are counted with ``torch.utils.flop_counter.FlopCounterMode`` (convolutions, linear layers and
matmuls; element-wise operations are not counted) on one image in eval mode, with the math SDPA backend
so that attention's matmuls are seen; MACs = counted FLOPs / 2, the convention of papers' "FLOPs".
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

NOTE = "MACs = FlopCounterMode FLOPs / 2 (conv, linear, matmul; element-wise ops not counted)"


@contextmanager
def counting(model: nn.Module) -> Iterator[object]:
    """Count the FLOPs of the forward passes run inside (eval mode, no gradient, math attention); the
    model's train/eval mode is restored afterwards and no random number is drawn from the global RNG."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
            yield counter
    finally:
        model.train(was_training)


def forward_macs(model: nn.Module, img_size: int, device: torch.device | str | None = None) -> int:
    """MACs of one forward pass on one ``img_size`` x ``img_size`` image."""
    param = next(model.parameters(), None)
    device = device if device is not None else (param.device if param is not None else "cpu")
    x = torch.randn(1, 3, img_size, img_size, device=device)
    with counting(model) as counter:
        model(x)
    return int(counter.get_total_flops() // 2)
