"""One model's bench: training (and SAM) throughput, inference throughput, batch-1 latency, memory."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cmafnet.bench.steps import (
    LossFn,
    ObjectiveFn,
    cross_entropy_loss,
    make_optimizer,
    plain_ce_step,
    step_breakdown,
)
from cmafnet.bench.timing import (
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
    loss_fn: LossFn = cross_entropy_loss  # the plain step's loss; the breakdown's for every model
    channels_last: bool = True
    sam: bool = False  # also time a SAM step (through ``trainer``)
    aux_infer: bool = False  # also time ``forward(x, return_aux=True)`` inference
    compile: bool = False
    # capture the whole training step (train.cuda_graph) and the batch inference forward in CUDA
    # graphs, replayed per batch (cmafnet.training.graphs; CUDA only)
    cuda_graph: bool = False
    fused_adamw: bool = True
    # trainer(model, sam=, compile=, cuda_graph=, fused=, channels_last=, amp=) -> (step(x, y), optimizer):
    # the trainer's own step (cmafnet.training.prepare_stage), timed as the trainer runs it. None = the
    # references' plain cross-entropy step (steps.plain_ce_step)
    trainer: Callable[..., Any] | None = None
    train: bool = True
    infer: bool = True
    latency: bool = True
    gmacs: bool = True
    breakdown: bool = False  # time the parts of a training step (branches, loss, optimiser)
    # objective_fn(model, x, y) -> run: the loss alone on a fixed model output, for the breakdown
    objective_fn: ObjectiveFn | None = None
    profile_path: str | None = None  # write a torch.profiler op table of a few training steps here


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
    torch.manual_seed(0)
    model = _attempt(rec, "build", spec.build)
    if model is None:
        return rec
    model = model.to(dev)
    if spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    rec["params_M"] = sum(p.numel() for p in model.parameters()) / 1e6
    if spec.gmacs and not spec.compile:
        x1 = torch.randn(1, 3, size, size, device=dev)
        rec["gmacs"] = _attempt(rec, "gmacs", lambda: forward_gmacs(model, x1))
    # static shapes: the batch differs per measurement
    run_model = torch.compile(model, dynamic=False) if spec.compile else model
    if spec.train:
        x, y = make_inputs(batch, size, num_classes, timing, spec.channels_last)
        _bench_training(spec, model, run_model, rec, timing, x, y)
        del x, y
    model.eval()
    if spec.infer:
        xi, _ = make_inputs(infer_batch, size, num_classes, timing, spec.channels_last)
        _bench_inference(spec, run_model, rec, timing, xi)
        del xi
    if spec.latency:
        x1, _ = make_inputs(1, size, num_classes, timing, spec.channels_last)
        _bench_latency(spec, model, run_model, rec, timing, x1)
    reset_peak_memory(dev)
    return rec


def _training_step(
    spec: ModelBench, model: nn.Module, run_model: nn.Module, rec: dict, timing: Timing, sam: bool
) -> tuple[Callable[[torch.Tensor, torch.Tensor], Any], torch.optim.Optimizer]:
    """The step to time and its optimiser: the trainer's own for CMAF-Net, the plain one for references."""
    if spec.trainer is not None:
        return spec.trainer(
            model, sam=sam, compile=spec.compile, cuda_graph=spec.cuda_graph and timing.device.type == "cuda",
            fused=rec["fused_adamw"], channels_last=spec.channels_last, amp=timing.amp,
        )  # fmt: skip
    opt = make_optimizer(model, fused=rec["fused_adamw"])
    return plain_ce_step(run_model, spec.loss_fn, opt, timing), opt


def _bench_training(
    spec: ModelBench, model: nn.Module, run_model: nn.Module, rec: dict, timing: Timing, x: Tensor, y: Tensor
) -> None:
    """Training step time and throughput (SAM on and off), the breakdown and the profile, into ``rec``."""
    dev, batch = timing.device, x.shape[0]

    def time_train(sam: bool) -> float:
        model.train()
        reset_peak_memory(dev)
        step, _ = _training_step(spec, model, run_model, rec, timing, sam)
        return time_per_step(lambda: step(x, y), timing)

    rec["train_step_impl"] = "trainer" if spec.trainer is not None else "plain_ce"
    for sam, key in ((False, "train"), (True, "train_sam")):
        if sam and not (spec.sam and spec.trainer is not None):
            continue
        s = _attempt(rec, key, lambda sam=sam: time_train(sam))
        if s is not None:
            prefix = "sam" if sam else "train"
            rec[f"{prefix}_step_ms"] = s * 1e3
            rec[f"{key}_img_s"] = batch / s
            rec[f"{key}_peak_GiB"] = peak_memory_gib(dev)
    if not (spec.breakdown or spec.profile_path):
        return
    made = _attempt(rec, "breakdown", lambda: _training_step(spec, model, run_model, rec, timing, False))
    if made is None:
        return
    step, opt = made
    if spec.breakdown:
        parts = _attempt(
            rec,
            "breakdown",
            lambda: step_breakdown(run_model, spec.loss_fn, opt, x, y, timing, spec.objective_fn),
        )
        if parts:
            rec["breakdown_ms"] = parts
    if spec.profile_path:
        _attempt(rec, "profile", lambda: profile_steps(lambda: step(x, y), timing, spec.profile_path))


def _bench_inference(spec: ModelBench, run_model: nn.Module, rec: dict, timing: Timing, xi: Tensor) -> None:
    """Batch inference throughput (plain and, for CMAF-Net, with the auxiliary outputs), into ``rec``."""
    dev, infer_batch = timing.device, xi.shape[0]

    def time_infer(aux: bool) -> float:
        reset_peak_memory(dev)
        if spec.cuda_graph and dev.type == "cuda" and not aux:
            replay = cuda_graph_forward(run_model, xi, timing)
            return time_per_step(lambda: replay(xi), timing)
        kw = {"return_aux": True} if aux else {}
        with torch.inference_mode(), timing.autocast():
            return time_per_step(lambda: run_model(xi, **kw), timing)

    s = _attempt(rec, "infer", lambda: time_infer(False))
    if s is not None:
        rec["infer_img_s"] = infer_batch / s
        rec["infer_peak_GiB"] = peak_memory_gib(dev)
    if spec.aux_infer:
        s = _attempt(rec, "infer_aux", lambda: time_infer(True))
        if s is not None:
            rec["infer_aux_img_s"] = infer_batch / s


def _bench_latency(
    spec: ModelBench, model: nn.Module, run_model: nn.Module, rec: dict, timing: Timing, x1: Tensor
) -> None:
    """Batch-1 latency: eager, from a CUDA graph (checked against eager) and compiled, into ``rec``."""
    dev = timing.device

    def forward_latency(m: nn.Module) -> dict[str, float]:
        with torch.inference_mode(), timing.autocast():
            return latency_ms(lambda: m(x1), timing)

    lat = _attempt(rec, "latency", lambda: forward_latency(run_model))
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
        lat = _attempt(rec, f"latency_compile_{mode}", lambda: forward_latency(fast))
        if lat:
            rec["latency_compiled_ms"] = lat["median"]
