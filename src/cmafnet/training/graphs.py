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

:class:`GraphMode` is how the trainer uses it (``train.cuda_graph``): the stage's
:class:`~cmafnet.training.step.TrainStep` (built ``graph_safe``) runs eagerly for a few warm-up steps,
then is captured once and replayed for the rest of the stage. The step's schedule (learning rate, loss
clock, beta ramp) lives in 0-d device tensors that the captured step reads and that are written
before every replay, so a replayed step follows the per-step schedule exactly as an eager one does
(docs/decisions/fast_path.md). On an H100 the eager-model stage-3 step went from 66.9 ms (host-bound)
to 63.0 ms, about its kernel time, and the compiled one from 52.9 to 46.7 ms (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor

from cmafnet.errors import ConfigError
from cmafnet.training.schedules import ScheduleValues
from cmafnet.training.step import StepResult, TrainStep


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
        step: ``step(*inputs) -> Tensor | tuple of Tensors``, the eager step to capture, already warmed
            up (:class:`GraphMode`). It must allocate nothing the graph cannot own (see the module docstring).
        example_inputs: tensors shaped and typed like every later call's inputs (copied).

    The outputs are overwritten by the next replay: read or clone them before calling again.
    """

    def __init__(
        self,
        step: Callable[..., Tensor | tuple[Tensor, ...]],
        example_inputs: Sequence[Tensor],
    ) -> None:
        if not torch.cuda.is_available() or any(t.device.type != "cuda" for t in example_inputs):
            raise ValueError("CUDA-graph capture needs CUDA tensors as inputs")
        # The graph reads these addresses on every replay: the object owns them.
        self.static_inputs = [t.detach().clone() for t in example_inputs]
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


def set_tensor_lr(optimizer: torch.optim.Optimizer) -> None:
    """Turn every group's learning rate into a 0-d device tensor (written in place from then on)."""
    for g in optimizer.param_groups:
        if not isinstance(g["lr"], Tensor):
            g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float32, device=g["params"][0].device)


def plain_optimizer_state(state: dict) -> dict:
    """An optimiser ``state_dict`` with tensor learning rates as floats (a checkpoint loads into an
    eager run, whose foreach AdamW refuses tensor learning rates)."""
    for g in state.get("param_groups", []):
        if isinstance(g.get("lr"), Tensor):
            g["lr"] = float(g["lr"])
    return state


def check_graph_mode(tc: Any, device: torch.device, *, distributed: bool) -> None:
    """Refuse ``train.cuda_graph`` where the captured step cannot run (a ConfigError naming the key)."""
    problems = []
    if device.type != "cuda":
        problems.append(f"a CUDA device (this run uses {device})")
    if tc.amp == "fp16":
        problems.append("train.amp bf16 or none (fp16's GradScaler decides on the host)")
    if not tc.fused_adamw:
        problems.append("train.fused_adamw: true (its found_inf input skips a non-finite update)")
    if distributed:
        problems.append("a single process (DDP's gradient all-reduce is not captured here)")
    if problems:
        raise ConfigError("train.cuda_graph: true needs " + "; ".join(problems))


class GraphMode:
    """A stage's :class:`TrainStep` warmed up, captured once and replayed.

    The first ``warmup`` steps of a stage run the step eagerly on a side stream (they create the
    optimiser state, autotune cuDNN, compile when ``train.compile``); the next step is captured and
    every later one replays it. Every step, warm-up or replayed, reads its schedule from
    :attr:`schedule`, persistent 0-d float32 device tensors written before it runs (the static-input
    pattern): warm-up and replayed steps compute the same update, with the current step's schedule.
    Off CUDA (the CPU tests of this flow) every step runs eagerly, on the same tensors.
    """

    WARMUP = 2  # eager steps per stage before the first capture

    def __init__(self, step: TrainStep, warmup: int | None = None) -> None:
        self.step_fn = step
        self.optimizer = step.optimizer
        self.device = step.params[0].device
        self.warmup = self.WARMUP if warmup is None else warmup
        self.prepare_optimizer()
        self.schedule = ScheduleValues(
            *(torch.zeros((), dtype=torch.float32, device=self.device) for _ in fields(ScheduleValues))
        )
        self.graph: GraphedStep | None = None
        self.warm_steps = 0
        self.captures = 0

    def prepare_optimizer(self) -> None:
        """Capturable param groups with device-tensor learning rates (after any state load)."""
        make_capturable(self.optimizer)
        set_tensor_lr(self.optimizer)

    def __call__(
        self, x: Tensor, y: Tensor, sched: ScheduleValues, after_forward: Callable[[], None] | None = None
    ) -> StepResult:
        """One update on ``(x, y)`` with the schedule ``sched``; ``after_forward`` runs once the step is
        queued (the next batch's preprocessing goes onto its side stream while the GPU trains), before
        the one host read."""
        for f in fields(ScheduleValues):  # queued before the step on the current stream: no host read
            getattr(self.schedule, f.name).fill_(getattr(sched, f.name))
        if self.graph is None and self.warm_steps >= self.warmup:
            self.graph = GraphedStep(lambda x, y: self.step_fn(x, y, self.schedule), [x, y])
            self.captures += 1
        if self.graph is not None:
            packed = self.graph(x, y)
        elif self.device.type == "cuda":  # warm-up on a side stream, as CUDA-graph capture requires
            main = torch.cuda.current_stream(self.device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                packed = self.step_fn(x, y, self.schedule)
            main.wait_stream(side)
            self.warm_steps += 1
        else:  # never captured off CUDA (check_graph_mode refuses it); eager, for the CPU tests
            packed = self.step_fn(x, y, self.schedule)
            self.warm_steps += 1
        if after_forward is not None:
            after_forward()
        return self.step_fn.result(packed)
