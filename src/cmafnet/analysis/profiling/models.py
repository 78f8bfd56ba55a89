"""One model's bench: training (and SAM) throughput, inference throughput, batch-1 latency, memory."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cmafnet.analysis.profiling.steps import (
    LossFn,
    ObjectiveFn,
    cross_entropy_loss,
    make_optimizer,
    make_train_step,
    step_breakdown,
)
from cmafnet.analysis.profiling.timing import (
    Timing,
    check_cuda_graph,
    cuda_graph_forward,
    forward_gmacs,
    latency_ms,
    peak_memory_gib,
    profile_steps,
    reset_peak_memory,
    time_per_step,
)

log = logging.getLogger(__name__)


@dataclass
class ModelBench:
    """What to measure for one model."""

    name: str
    build: Callable[[], nn.Module]
    loss_fn: LossFn = cross_entropy_loss
    channels_last: bool = True
    sam_rho: float | None = None  # also time a SAM step
    aux_infer: bool = False  # also time ``forward(x, return_aux=True)`` inference
    compile: bool = False
    # capture the whole training step (and the batch inference forward) in a CUDA graph, replayed
    # per batch (cmafnet.training.graphs; CUDA only)
    cuda_graph: bool = False
    fused_adamw: bool = True
    # optimizer(model, fused) -> Optimizer; None = AdamW over the model's trainable parameters
    optimizer: Callable[[nn.Module, bool], torch.optim.Optimizer] | None = None
    sam: Callable[[torch.optim.Optimizer], Any] | None = None  # SAM object factory; None = inline
    # device_step(model, optimizer, with_sam, amp) -> step(x, y): the trainer's capturable step
    # (cmafnet.training.graphed.DeviceStep), timed for ``cuda_graph``; None = the generic step
    device_step: Callable[..., Callable[[torch.Tensor, torch.Tensor], Any]] | None = None
    # called with ``compile`` before the model is timed (CMAF-Net compiles its regularisers too)
    setup: Callable[[bool], None] | None = None
    train: bool = True
    infer: bool = True
    latency: bool = True
    gmacs: bool = True
    breakdown: bool = False  # time the parts of a training step (branches, loss, optimiser)
    # objective_fn(model, x, y) -> run: the loss alone on a fixed model output, for the breakdown
    objective_fn: ObjectiveFn | None = None
    profile_path: str | None = None  # write a torch.profiler op table of a few training steps here


def _param_count(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def _fmt_error(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"


def _attempt(record: dict, key: str, fn: Callable[[], Any]) -> Any:
    """Run one measurement; on failure note the error under ``record['errors'][key]`` and go on."""
    try:
        return fn()
    except Exception as err:  # a failed measurement must not lose the others
        log.warning("%s: %s failed: %s", record.get("name", "?"), key, _fmt_error(err))
        record.setdefault("errors", {})[key] = _fmt_error(err)
        return None


def make_inputs(
    batch: int, size: int, num_classes: int, timing: Timing, channels_last: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random batch ``(x, y)`` on the timing device (``x`` channels-last when asked)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g).to(timing.device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,), generator=g).to(timing.device)
    return x, y


def bench_model(
    spec: ModelBench,
    timing: Timing,
    *,
    size: int,
    batch: int,
    infer_batch: int,
    num_classes: int = 2,
) -> dict[str, Any]:
    """Training (and SAM) throughput, inference throughput, batch-1 latency and peak memory of a model.

    Returns a flat dict of numbers (img/s, ms, GiB) plus ``errors`` for measurements that failed.
    """
    dev = timing.device
    rec: dict[str, Any] = {
        "name": spec.name,
        "channels_last": spec.channels_last,
        "compiled": spec.compile,
        "cuda_graph": spec.cuda_graph,
        "fused_adamw": spec.fused_adamw and dev.type == "cuda",  # fused AdamW is used on CUDA only
        "amp": timing.amp,
    }
    if spec.setup is not None:
        spec.setup(spec.compile)
    torch.manual_seed(0)
    model = _attempt(rec, "build", spec.build)
    if model is None:
        return rec
    model = model.to(dev)
    if spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    rec["params_M"] = _param_count(model)
    if spec.gmacs and not spec.compile:
        x1 = torch.randn(1, 3, size, size, device=dev)
        rec["gmacs"] = _attempt(rec, "gmacs", lambda: forward_gmacs(model, x1))
    run_model = (
        torch.compile(model, dynamic=False) if spec.compile else model
    )  # static shapes: B differs per measurement

    if spec.train:
        x, y = make_inputs(batch, size, num_classes, timing, spec.channels_last)
        opt = (
            spec.optimizer(model, rec["fused_adamw"])
            if spec.optimizer
            else make_optimizer(model, fused=rec["fused_adamw"])
        )
        if spec.sam_rho:
            rec["sam_impl"] = "project" if spec.sam else "inline_foreach"

        def time_train(rho: float | None) -> float:
            model.train()
            graphed = spec.cuda_graph and dev.type == "cuda"
            reset_peak_memory(dev)
            if graphed and spec.device_step is not None and timing.amp != "fp16":
                step = spec.device_step(run_model, opt, bool(rho), timing.amp)
                rec["graph_step"] = "trainer"  # clipping and the non-finite skip included
            else:
                sam = spec.sam(opt) if rho and spec.sam else None
                step = make_train_step(
                    run_model, spec.loss_fn, opt, timing, sam_rho=rho, sam=sam, autocast_cache=not graphed
                )
            if graphed:
                from cmafnet.training.graphs import GraphedStep

                step = GraphedStep(step, [x, y], optimizer=opt)
            return time_per_step(lambda: step(x, y), timing)

        s = _attempt(rec, "train", lambda: time_train(None))
        if s is not None:
            rec["train_step_ms"] = s * 1e3
            rec["train_img_s"] = batch / s
            rec["train_peak_GiB"] = peak_memory_gib(dev)
        if spec.sam_rho:
            s = _attempt(rec, "train_sam", lambda: time_train(spec.sam_rho))
            if s is not None:
                rec["sam_step_ms"] = s * 1e3
                rec["train_sam_img_s"] = batch / s
                rec["train_sam_peak_GiB"] = peak_memory_gib(dev)
        if spec.breakdown:
            parts = _attempt(
                rec,
                "breakdown",
                lambda: step_breakdown(run_model, spec.loss_fn, opt, x, y, timing, spec.objective_fn),
            )
            if parts:
                rec["breakdown_ms"] = parts
        if spec.profile_path:
            step = make_train_step(run_model, spec.loss_fn, opt, timing)
            _attempt(rec, "profile", lambda: profile_steps(lambda: step(x, y), timing, spec.profile_path))
        del opt, x, y

    model.eval()
    if spec.infer:
        xi, _ = make_inputs(infer_batch, size, num_classes, timing, spec.channels_last)

        def time_infer(aux: bool) -> float:
            reset_peak_memory(dev)
            if spec.cuda_graph and dev.type == "cuda" and not aux:
                replay = cuda_graph_forward(run_model, xi, timing)
                return time_per_step(lambda: replay(xi), timing)
            with torch.inference_mode(), timing.autocast():
                if aux:
                    return time_per_step(lambda: run_model(xi, return_aux=True), timing)
                return time_per_step(lambda: run_model(xi), timing)

        s = _attempt(rec, "infer", lambda: time_infer(False))
        if s is not None:
            rec["infer_img_s"] = infer_batch / s
            rec["infer_peak_GiB"] = peak_memory_gib(dev)
        if spec.aux_infer:
            s = _attempt(rec, "infer_aux", lambda: time_infer(True))
            if s is not None:
                rec["infer_aux_img_s"] = infer_batch / s
        del xi

    if spec.latency:
        x1, _ = make_inputs(1, size, num_classes, timing, spec.channels_last)

        def eager_latency() -> dict[str, float]:
            with torch.inference_mode(), timing.autocast():
                return latency_ms(lambda: run_model(x1), timing)

        lat = _attempt(rec, "latency", eager_latency)
        if lat:
            rec["latency_ms"], rec["latency_p90_ms"] = lat["median"], lat["p90"]
        if dev.type == "cuda" and not spec.compile:
            replay = _attempt(rec, "latency_cuda_graph", lambda: cuda_graph_forward(model, x1, timing))
            if replay is not None:
                # The replayed graph must compute what eager does: on the captured input and on a
                # fresh one (which shows the graph reads its input buffer), in float32.
                x2 = torch.randn_like(x1)
                checked = _attempt(
                    rec, "cuda_graph_check", lambda: check_cuda_graph(model, replay, [x1, x2], timing)
                )
                if checked is not None:
                    rec["cuda_graph_max_abs_diff"], rec["cuda_graph_matches_eager"] = checked
                lat = _attempt(rec, "latency_cuda_graph", lambda: latency_ms(replay, timing))
                if lat:
                    rec["latency_cuda_graph_ms"] = lat["median"]
        if spec.compile:
            # "reduce-overhead" records CUDA graphs for the compiled graph (CUDA only)
            mode = "reduce-overhead" if dev.type == "cuda" else "default"
            fast = torch.compile(model, mode=mode, dynamic=False)

            def compiled_latency() -> dict[str, float]:
                with torch.inference_mode(), timing.autocast():
                    return latency_ms(lambda: fast(x1), timing)

            lat = _attempt(rec, f"latency_compile_{mode}", compiled_latency)
            if lat:
                rec["latency_compiled_ms"] = lat["median"]
    reset_peak_memory(dev)
    return rec
