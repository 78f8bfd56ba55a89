"""Whole-step CUDA graphs: capture one training step (forward, loss, backward(s), optimiser) once and
replay it per batch.

Why: an eager CMAF-Net step launches a few thousand small kernels (MobileViT's norms, activations,
reshapes; the regularisers; the optimiser), and on the H200 the host could not launch them as fast
as the GPU ran them: 82 ms per step against 61 ms of kernel time (profiled, 2026-11-27). A replayed
graph launches the same kernels with one call, so the step costs its kernel time.

What a captured step requires (checked by the tests on CUDA):

- static shapes (``drop_last`` batches) and inputs copied into the graph's own buffers;
- no host synchronisation inside the step (``.item()``, ``torch.linalg.cholesky``'s error check,
  boolean indexing): the objective is written without them;
- an optimiser whose ``step`` is capturable (AdamW ``capturable=True``, set here), created state
  (the warm-up steps create it), and hyper-parameters that are either fixed or device tensors;
- autocast without its weight-cast cache (the casts must be kernels of the graph).

Python-side values read during the step (a schedule's float, a ``beta > 0`` branch) are frozen at
capture: re-capture when they change, or keep them in device tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Mark every param group capturable (AdamW/Adam/SGD keep their step counts on the device)."""
    for group in optimizer.param_groups:
        if "capturable" not in group:
            raise ValueError(f"{type(optimizer).__name__} has no 'capturable' option: it cannot be graphed")
        group["capturable"] = True


class GraphedStep:
    """A step function captured in a CUDA graph: ``graphed(*inputs)`` copies the inputs into the
    graph's buffers, replays, and returns the step's (static) outputs.

    Args:
        step: ``step(*inputs) -> Tensor | tuple of Tensors``, the eager step to capture. It must
            allocate nothing the graph cannot own (see the module docstring).
        example_inputs: tensors shaped and typed like every later call's inputs (copied).
        optimizer: made capturable before the warm-up (``None`` when the step has none).
        warmup: eager calls on a side stream before capture (cuDNN autotuning, optimiser state,
            autograd's lazy initialisation). They are real steps: they update the weights.

    The outputs are overwritten by the next replay: read or clone them before calling again.
    """

    def __init__(
        self,
        step: Callable[..., Tensor | tuple[Tensor, ...]],
        example_inputs: Sequence[Tensor],
        *,
        optimizer: torch.optim.Optimizer | None = None,
        warmup: int = 3,
    ) -> None:
        if not torch.cuda.is_available() or any(t.device.type != "cuda" for t in example_inputs):
            raise ValueError("CUDA-graph capture needs CUDA tensors as inputs")
        if optimizer is not None:
            make_capturable(optimizer)
        # The graph reads these addresses on every replay: the object owns them.
        self.static_inputs = [t.detach().clone() for t in example_inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                step(*self.static_inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_outputs = step(*self.static_inputs)

    def __call__(self, *inputs: Tensor) -> Tensor | tuple[Tensor, ...]:
        if len(inputs) != len(self.static_inputs):
            raise ValueError(f"expected {len(self.static_inputs)} inputs, got {len(inputs)}")
        for buf, t in zip(self.static_inputs, inputs, strict=True):
            if t.shape != buf.shape:
                raise ValueError(f"graph captured for shape {tuple(buf.shape)}, got {tuple(t.shape)}")
            if t.data_ptr() != buf.data_ptr():
                buf.copy_(t, non_blocking=True)  # queued before the replay on the current stream
        self.graph.replay()
        return self.static_outputs
