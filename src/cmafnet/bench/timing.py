"""Timing primitives: device synchronisation, per-step time, batch-1 latency, memory, MACs, CUDA graphs.

Every measurement follows the same recipe: build the inputs on the device, run ``warmup`` untimed
iterations (cuDNN autotuning, allocator growth, compilation), synchronise the device, time
``steps`` iterations with ``time.perf_counter``, synchronise again. On CUDA the synchronisation is
``torch.cuda.synchronize()``, so the host clock brackets all queued kernels; batch-1 latency is
synchronised after every call, because that is what a user waiting for one answer sees.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


@dataclass(frozen=True)
class Timing:
    """How to time: steps after warm-up, on which device, in which precision."""

    device: torch.device
    steps: int = 20
    warmup: int = 5
    amp: str = "bf16"  # bf16 | fp16 | none
    latency_steps: int = 50

    def autocast(self, *, cache_enabled: bool = True) -> contextlib.AbstractContextManager:
        """The autocast context for this precision (a no-op for ``none``)."""
        dtype = AMP_DTYPES[self.amp]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype, cache_enabled=cache_enabled)


def synchronize(device: torch.device) -> None:
    """Wait for every queued kernel on ``device`` (no-op on CPU, where ops are synchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated device memory since the last reset, in GiB (None off CUDA)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def time_per_step(fn: Callable[[], Any], timing: Timing, *, steps: int | None = None) -> float:
    """Mean seconds per call of ``fn`` over ``steps`` calls after ``timing.warmup`` untimed calls."""
    steps = steps or timing.steps
    for _ in range(timing.warmup):
        fn()
    synchronize(timing.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(timing.device)
    return (time.perf_counter() - t0) / steps


def latency_ms(fn: Callable[[], Any], timing: Timing) -> dict[str, float]:
    """Per-call latency with a device synchronisation after every call: median and 90th percentile."""
    for _ in range(max(timing.warmup, 1)):
        fn()
    synchronize(timing.device)
    samples = []
    for _ in range(timing.latency_steps):
        t0 = time.perf_counter()
        fn()
        synchronize(timing.device)
        samples.append((time.perf_counter() - t0) * 1e3)
    samples.sort()
    p90 = samples[min(len(samples) - 1, int(0.9 * len(samples)))]
    return {"median": statistics.median(samples), "p90": p90}


def forward_gmacs(model: nn.Module, x1: Tensor) -> float:
    """Multiply-accumulates of one eval forward in G (FLOPs / 2, as papers' "GFLOPs" usually are)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x1)
    model.train(was_training)
    return counter.get_total_flops() / 2e9


# Largest |graph - eager| allowed, relative to max |eager output|, per autocast precision. Replay runs
# the kernels eager ran, so the difference is normally 0; the margin only absorbs a different
# kernel/algorithm choice, whose reordered reductions move the result by a few units in the last
# place of the autocast dtype (bf16 has 8 significant bits, fp16 11; "none" may use TF32 matmuls).
CUDA_GRAPH_RTOL = {"bf16": 5e-2, "fp16": 1e-2, "none": 2e-3}


class CudaGraphForward:
    """A captured eval forward: ``fn(x)`` copies ``x`` into the static input, replays, returns the output.

    The object owns the graph's static input and output. Keeping the input alive is essential: the
    graph reads the input's device address on every replay, and a freed input buffer goes back to
    the caching allocator, whose next allocation (e.g. an eager forward) overwrites it, so replays
    silently compute on garbage. ``fn()`` without an argument replays on the current static input.
    The returned tensor is the graph's static output, overwritten by the next replay (clone it to keep).
    """

    def __init__(self, graph: Any, static_input: Tensor, static_output: Tensor) -> None:
        self.graph = graph  # torch.cuda.CUDAGraph (anything with ``replay()``)
        self.static_input = static_input
        self.static_output = static_output

    def __call__(self, x: Tensor | None = None) -> Tensor:
        if x is not None:
            if x.shape != self.static_input.shape:
                raise ValueError(
                    f"CUDA graph captured for input {tuple(self.static_input.shape)}, got {tuple(x.shape)}"
                )
            self.static_input.copy_(x)  # queued on the current stream, before the replay
        self.graph.replay()
        return self.static_output


def cuda_graph_forward(model: nn.Module, x1: Tensor, timing: Timing) -> CudaGraphForward:
    """Capture one eval forward of ``model`` on inputs shaped like ``x1`` in a CUDA graph.

    Warm-up runs on a side stream (as ``torch.cuda.graphs`` requires); autocast's weight-cast cache
    is disabled so the casts are part of the captured graph rather than stale tensors.
    """
    static_x = x1.clone()  # the graph's input buffer, owned (kept alive) by the returned object
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode(), timing.autocast(cache_enabled=False):
        for _ in range(3):
            model(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), timing.autocast(cache_enabled=False), torch.cuda.graph(graph):
        static_y = model(static_x)
    return CudaGraphForward(graph, static_x, static_y)


def outputs_match(got: Tensor, ref: Tensor, amp: str) -> tuple[float, bool]:
    """``(max |got - ref|, within tolerance)``, compared in float32.

    The tolerance is ``CUDA_GRAPH_RTOL[amp] * max |ref|`` (relative to the output's scale, so small
    random-init logits do not hide a wrong result behind a fixed absolute tolerance).
    """
    if got.shape != ref.shape:
        raise ValueError(f"output shapes differ: {tuple(got.shape)} vs {tuple(ref.shape)}")
    got, ref = got.detach().float(), ref.detach().float()
    diff = float((got - ref).abs().max()) if ref.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    ok = bool(torch.isfinite(got).all()) and diff <= CUDA_GRAPH_RTOL[amp] * max(scale, 1e-6)
    return diff, ok


def check_cuda_graph(
    model: nn.Module, graphed: Callable[[Tensor], Tensor], inputs: list[Tensor], timing: Timing
) -> tuple[float, bool]:
    """Replay ``graphed`` on each input and compare with an eager forward in the same precision.

    Use at least one input other than the one captured: it shows the graph reads its input buffer.
    The eager forward runs under the same autocast settings as the capture (weight-cast cache off).

    Returns:
        ``(max abs difference over the inputs, every input within tolerance)``.
    """
    worst, all_ok = 0.0, True
    for x in inputs:
        with torch.inference_mode(), timing.autocast(cache_enabled=False):
            ref = model(x).float()
        got = graphed(x).float()  # copied out of the static output before the next replay
        synchronize(timing.device)
        diff, ok = outputs_match(got, ref, timing.amp)
        worst, all_ok = max(worst, diff), all_ok and ok
    return worst, all_ok


def profile_steps(fn: Callable[[], Any], timing: Timing, path: str, steps: int = 3) -> None:
    """Run ``fn`` under ``torch.profiler`` and write the ops table (top 40 by self device time)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if timing.device.type == "cuda" else [])
    fn()
    synchronize(timing.device)
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        synchronize(timing.device)
    key = "self_cuda_time_total" if timing.device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=40)

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(f"{steps} training steps, sorted by {key}\n{table}\n")
