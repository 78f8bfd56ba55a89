"""Timing primitives for `cmafnet bench`: training / inference throughput, batch-1 latency, memory.

Every measurement follows the same recipe: build the inputs on the device, run ``warmup`` untimed
iterations (cuDNN autotuning, allocator growth, compilation), synchronise the device, time
``steps`` iterations with ``time.perf_counter``, synchronise again. On CUDA the synchronisation is
``torch.cuda.synchronize()``, so the host clock brackets all queued kernels; batch-1 latency is
synchronised after every call, because that is what a user waiting for one answer sees.

Nothing here knows about CMAF-Net: a training step is built from a model, a ``loss_fn(model, x, y)``
and an optimiser, so the same code times CMAF-Net with its objective and a timm baseline with
cross-entropy. SAM is timed with a minimal inline step (two forward/backward passes, the weights
perturbed along the normalised gradient by ``rho`` in between), which is the cost any SAM
implementation pays.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]
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


def cross_entropy_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """The baselines' training loss (plain cross-entropy on ``model(x)``)."""
    return F.cross_entropy(model(x), y)


def make_optimizer(model: nn.Module, *, lr: float = 1e-4, weight_decay: float = 1e-4, fused: bool = True):
    """AdamW over the trainable parameters; ``fused`` uses the single-kernel implementation.

    Weight-decay grouping does not change the cost of a step, so the bench uses one group.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if fused:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def make_train_step(
    model: nn.Module,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    timing: Timing,
    *,
    sam_rho: float | None = None,
    sam: Any = None,
) -> Callable[[Tensor, Tensor], Tensor]:
    """One optimiser step on a batch: forward + loss under autocast, backward, (SAM), AdamW.

    With ``sam_rho`` the step is SAM (Foret et al., 2021): after the first backward the weights move
    by ``rho * g / ||g||``, a second forward/backward at the perturbed weights gives the gradient the
    optimiser uses, and the weights move back before ``optimizer.step()``. ``sam`` may be an object
    with ``perturb()`` / ``restore()`` (``cmafnet.training.sam.SAM``); without it an inline version
    with ``torch._foreach`` kernels is used. fp16 uses a GradScaler; ``g / ||g||`` does not depend on
    the loss scale, so the inline version needs no unscale before the perturbation.
    """
    params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
    scaler = torch.amp.GradScaler(timing.device.type) if timing.amp == "fp16" else None

    def loss_of(x: Tensor, y: Tensor) -> Tensor:
        with timing.autocast():
            return loss_fn(model, x, y)

    def backward(loss: Tensor) -> None:
        (scaler.scale(loss) if scaler else loss).backward()

    @torch.no_grad()
    def inline_perturb() -> list[Tensor]:
        with_grad = [p for p in params if p.grad is not None]
        grads = [p.grad for p in with_grad]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        eps = torch._foreach_mul(grads, sam_rho / (norm + 1e-12))
        torch._foreach_add_(with_grad, eps)  # w + e(w)
        return [with_grad, eps]

    def step(x: Tensor, y: Tensor) -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of(x, y)
        backward(loss)
        if sam_rho:
            if sam is not None:
                if scaler:  # the project's SAM wants the true gradient (its contract)
                    with torch.no_grad():
                        torch._foreach_mul_(
                            [p.grad for p in params if p.grad is not None], 1 / scaler.get_scale()
                        )
                sam.perturb()
            else:
                moved, eps = inline_perturb()
            optimizer.zero_grad(set_to_none=True)
            backward(loss_of(x, y))
            if sam is not None:
                sam.restore()
            else:
                with torch.no_grad():
                    torch._foreach_sub_(moved, eps)  # back to w
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        return loss.detach()

    return step


def _param_count(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def forward_gmacs(model: nn.Module, x1: Tensor) -> float:
    """Multiply-accumulates of one eval forward in G (FLOPs / 2, as papers' "GFLOPs" usually are)."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x1)
    model.train(was_training)
    return counter.get_total_flops() / 2e9


def cuda_graph_forward(model: nn.Module, x1: Tensor, timing: Timing) -> Callable[[], Tensor]:
    """Capture one eval forward in a CUDA graph; the returned function replays it.

    Warm-up runs on a side stream (as ``torch.cuda.graphs`` requires); autocast's weight-cast cache
    is disabled so the casts are part of the captured graph rather than stale tensors.
    """
    static_x = x1.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.inference_mode(), timing.autocast(cache_enabled=False):
        for _ in range(3):
            model(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(), timing.autocast(cache_enabled=False), torch.cuda.graph(graph):
        static_y = model(static_x)

    def replay() -> Tensor:
        graph.replay()
        return static_y

    return replay


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
    fused_adamw: bool = True
    # optimizer(model, fused) -> Optimizer; None = AdamW over the model's trainable parameters
    optimizer: Callable[[nn.Module, bool], torch.optim.Optimizer] | None = None
    sam: Callable[[torch.optim.Optimizer], Any] | None = None  # SAM object factory; None = inline
    train: bool = True
    infer: bool = True
    latency: bool = True
    gmacs: bool = True
    breakdown: bool = False  # time the parts of a training step (branches, loss, optimiser)
    profile_path: str | None = None  # write a torch.profiler op table of a few training steps here


def step_breakdown(
    model: nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, timing: Timing
) -> dict[str, float]:
    """Where a training step's time goes, in ms per step (each part timed on its own, train mode).

    ``forward_backward_ce``: plain ``model(x)`` + cross-entropy + backward (the model alone);
    ``forward_backward_loss``: ``loss_fn`` (for CMAF-Net: ``return_aux=True`` + the objective) +
    backward, so the difference is what the auxiliary outputs and regularisers cost;
    ``<branch>_forward_backward``: each branch (``model.spatial`` / ``model.contextual`` when the
    model has them) alone; ``optimizer_step``: the AdamW update alone.
    """
    inner = getattr(model, "_orig_mod", model)  # a compiled model's branches are the eager ones
    model.train()

    def fwd_bwd(fn: Callable[[], Tensor]) -> Callable[[], None]:
        def run() -> None:
            optimizer.zero_grad(set_to_none=True)
            with timing.autocast():
                out = fn()
            out.backward()

        return run

    def branch_scalar(branch: nn.Module) -> Tensor:
        out = branch(x)
        out = out[-1] if isinstance(out, (list, tuple)) else out  # timm features_only gives a list
        return out.float().mean()

    parts = {
        "forward_backward_ce": time_per_step(fwd_bwd(lambda: F.cross_entropy(model(x), y)), timing),
        "forward_backward_loss": time_per_step(fwd_bwd(lambda: loss_fn(model, x, y)), timing),
    }
    for name in ("spatial", "contextual"):
        branch = getattr(inner, name, None)
        if isinstance(branch, nn.Module):
            parts[f"{name}_forward_backward"] = time_per_step(
                fwd_bwd(lambda b=branch: branch_scalar(b)), timing
            )
    fwd_bwd(lambda: loss_fn(model, x, y))()  # gradients for every parameter the optimiser holds
    parts["optimizer_step"] = time_per_step(optimizer.step, timing)
    optimizer.zero_grad(set_to_none=True)
    return {k: v * 1e3 for k, v in parts.items()}


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
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(f"{steps} training steps, sorted by {key}\n{table}\n")


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


def _inputs(batch: int, size: int, num_classes: int, timing: Timing, channels_last: bool):
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
        "fused_adamw": spec.fused_adamw and dev.type == "cuda",  # fused AdamW is used on CUDA only
        "amp": timing.amp,
    }
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
        x, y = _inputs(batch, size, num_classes, timing, spec.channels_last)
        opt = (
            spec.optimizer(model, rec["fused_adamw"])
            if spec.optimizer
            else make_optimizer(model, fused=rec["fused_adamw"])
        )
        if spec.sam_rho:
            rec["sam_impl"] = "project" if spec.sam else "inline_foreach"

        def time_train(rho: float | None) -> float:
            model.train()
            sam = spec.sam(opt) if rho and spec.sam else None
            step = make_train_step(run_model, spec.loss_fn, opt, timing, sam_rho=rho, sam=sam)
            reset_peak_memory(dev)
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
                rec, "breakdown", lambda: step_breakdown(run_model, spec.loss_fn, opt, x, y, timing)
            )
            if parts:
                rec["breakdown_ms"] = parts
        if spec.profile_path:
            step = make_train_step(run_model, spec.loss_fn, opt, timing)
            _attempt(rec, "profile", lambda: profile_steps(lambda: step(x, y), timing, spec.profile_path))
        del opt, x, y

    model.eval()
    if spec.infer:
        xi, _ = _inputs(infer_batch, size, num_classes, timing, spec.channels_last)

        def time_infer(aux: bool) -> float:
            reset_peak_memory(dev)
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
        x1, _ = _inputs(1, size, num_classes, timing, spec.channels_last)

        def eager_latency() -> dict[str, float]:
            with torch.inference_mode(), timing.autocast():
                return latency_ms(lambda: run_model(x1), timing)

        lat = _attempt(rec, "latency", eager_latency)
        if lat:
            rec["latency_ms"], rec["latency_p90_ms"] = lat["median"], lat["p90"]
        if dev.type == "cuda" and not spec.compile:
            replay = _attempt(rec, "latency_cuda_graph", lambda: cuda_graph_forward(model, x1, timing))
            if replay is not None:
                # the replayed graph must compute what eager does (same weights, same input)
                with torch.inference_mode(), timing.autocast():
                    ref = model(x1).float()
                got = replay().float()
                rec["cuda_graph_matches_eager"] = bool(torch.allclose(got, ref, rtol=2e-2, atol=2e-2))
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


def cycle_batches(loader: Any) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Endless iteration over a ``BatchLoader``, moving to the next epoch when one ends."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the loader yields no batches (store smaller than one batch?)")
        epoch += 1


def measure_data_path(
    batches: Iterator[tuple[Tensor, Tensor, Tensor]],
    preprocess: Callable[[Tensor], Tensor],
    step: Callable[[Tensor, Tensor], Any],
    premade: tuple[Tensor, Tensor],
    timing: Timing,
    *,
    steps: int,
) -> dict[str, float]:
    """End-to-end training steps through the real input path against the same steps on pre-made tensors.

    ``batches`` yields uint8 ``(B, 3, h, w)`` batches on the device, ``preprocess`` turns one into the
    model input (stain normalisation, augmentation, resize, mean/std), ``step(x, y)`` is the training
    step. The overhead is ``(t_end_to_end - t_premade) / t_premade``: the share of an epoch the
    model spends waiting for (or computing) its input. The input path alone is timed too.
    """

    def prep(xb: Tensor) -> Tensor:
        with torch.no_grad():
            return preprocess(xb)

    def end_to_end() -> None:
        xb, yb, _ = next(batches)
        step(prep(xb), yb)

    def data_only() -> None:
        xb, _, _ = next(batches)
        prep(xb)

    t_e2e = time_per_step(end_to_end, timing, steps=steps)
    t_pre = time_per_step(lambda: step(*premade), timing, steps=steps)
    t_data = time_per_step(data_only, timing, steps=steps)
    batch = premade[0].shape[0]
    return {
        "steps": steps,
        "end_to_end_step_ms": t_e2e * 1e3,
        "premade_step_ms": t_pre * 1e3,
        "data_only_step_ms": t_data * 1e3,
        "data_only_img_s": batch / t_data,
        "end_to_end_img_s": batch / t_e2e,
        "overhead_pct": 100.0 * (t_e2e - t_pre) / t_pre,
    }
