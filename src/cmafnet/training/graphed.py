"""The trainer's step replayed from a CUDA graph (``train.cuda_graph: true``).

:func:`cmafnet.training.step.train_step` reads values back to the host mid-step (the finite checks,
AutoClip's threshold) and so cannot be captured. :class:`DeviceStep` does the same update with device
values only, so a whole step (both SAM passes, clipping, the skip of a non-finite step, AdamW) is
one CUDA graph (:class:`cmafnet.training.graphs.GraphedStep`), replayed per batch; the host reads the
loss, the terms, the gradient norm and the skip flag once per step, after the replay, as the eager
step does. On an H100 the eager-model stage-3 step went from 66.9 ms (host-bound) to 63.0 ms,
about its kernel time, and the compiled one from 52.9 to 46.7 ms (docs/performance.md).

How each host decision of the eager step becomes a device one:

- **skip a non-finite step**: fused AdamW's ``found_inf`` input (the mechanism ``GradScaler`` uses)
  leaves weights, moments and the step count untouched when the flag is set, and BatchNorm running
  statistics are put back with ``torch.where``. With SAM a non-finite first pass perturbs to
  non-finite weights; ``SAM.restore`` copies ``w`` back exactly and the update is skipped, as eagerly.
- **AutoClip**: the gradient-norm history is a device ring buffer (NaN = empty slot) and the
  threshold its ``nanquantile``, the same percentile of the same values as the host deque.
- **the learning rate** is a device tensor in the param groups, written before each replay.

What is frozen at capture, and therefore re-captured at every epoch start: Python values the loss
reads (the beta ramp, the A-CBFL alpha schedule). They are taken at the epoch's midpoint, so a linear
ramp averages to the same value over the epoch (docs/decisions/fast_path.md).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from cmafnet.config import ClipConfig
from cmafnet.training.sam import SAM
from cmafnet.training.step import StepResult, sdpa_context

LossFn = Callable[[object, Tensor], tuple[Tensor, dict]]


class DeviceClipper:
    """Gradient clipping without host reads: AutoClip (device ring buffer), norm, AGC, none.

    ``__call__(params, total, finite)`` clips in place given the pre-clipping total norm; a
    non-finite step (``finite`` false) records nothing, like :class:`GradClipper`.
    """

    def __init__(self, cfg: ClipConfig, device: torch.device):
        self.cfg = cfg
        # float64 like the host deque of Python floats, so the percentile is the same number
        self.history = torch.full((cfg.history,), math.nan, dtype=torch.float64, device=device)  # NaN = empty
        self.count = torch.zeros((), dtype=torch.long, device=device)  # norms recorded so far

    def __call__(self, params: list[nn.Parameter], total: Tensor, finite: Tensor) -> None:
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            return
        kind = self.cfg.kind
        if kind == "autoclip":
            slot = (self.count % self.cfg.history).reshape(1)
            old = self.history.index_select(0, slot)
            self.history.index_copy_(0, slot, torch.where(finite, total.double().reshape(1), old))
            self.count.add_(finite.long())
            self._clip(with_grad, self._percentile(), total)
        elif kind == "norm":
            self._clip(with_grad, torch.full_like(total, self.cfg.max_norm), total)
        elif kind == "agc":
            from timm.utils import adaptive_clip_grad

            adaptive_clip_grad(with_grad, clip_factor=self.cfg.agc_clip)

    def _percentile(self) -> Tensor:
        """``np.percentile(history, percentile)`` (linear interpolation) of the recorded norms, on
        the device. Written out: ``torch.nanquantile`` and ``clip_grads_with_norm_`` (which calls
        ``float(max_norm)``) would read back to the host."""
        n = self.count.clamp(max=self.cfg.history)  # recorded norms in the buffer
        ordered = torch.sort(self.history).values  # NaN (empty slots) sort last
        pos = (n - 1).clamp(min=0).double() * (self.cfg.percentile / 100.0)
        lo = pos.floor().long()
        hi = torch.minimum(lo + 1, (n - 1).clamp(min=0))
        a, b = ordered.gather(0, lo.reshape(1)), ordered.gather(0, hi.reshape(1))
        t = pos - lo
        # numpy's linear interpolation, both branches as it writes them (same rounding)
        value = torch.where(t >= 0.5, b - (b - a) * (1 - t), a + (b - a) * t)
        return value.reshape(()).float()

    @staticmethod
    def _clip(params: list[nn.Parameter], max_norm: Tensor, total: Tensor) -> None:
        """Scale gradients by ``min(1, max_norm / (total + 1e-6))``, torch's clipping formula (in its
        operation order: a Python float divided by a tensor is ``reciprocal(tensor) * float``)."""
        coef = ((total + 1e-6).reciprocal() * max_norm).clamp(max=1.0)
        torch._foreach_mul_([p.grad for p in params], coef.to(params[0].grad.dtype))

    def state_dict(self) -> dict:
        """The history in recording order (oldest first), as :class:`GradClipper` saves it."""
        n, h = int(self.count), self.cfg.history
        vals = self.history.tolist()
        if n >= h:
            start = n % h
            vals = vals[start:] + vals[:start]
        return {"history": [v for v in vals if not math.isnan(v)]}

    def load_state_dict(self, state: dict) -> None:
        vals = [float(v) for v in state["history"]][-self.cfg.history :]
        self.history.fill_(math.nan)
        if vals:
            self.history[: len(vals)] = torch.tensor(vals, device=self.history.device)
        self.count.fill_(len(vals))


class DeviceStep:
    """One training update with no host synchronisation: capturable in a CUDA graph.

    ``step(x, y)`` returns a 1-d float32 tensor ``[loss, *terms, grad_norm, skipped]`` (keys in
    :attr:`term_keys`, known after the first call); :meth:`result` turns it into a
    :class:`StepResult` with one host read.

    Args:
        model: the module to call as ``model(x, return_aux=True)`` (possibly compiled).
        loss_fn: ``loss_fn(out, y) -> (loss, terms)``; must not read device values on the host.
        optimizer: fused AdamW (its ``found_inf`` input skips a non-finite update).
        params: the trainable parameters.
        clipper: a :class:`DeviceClipper`.
        sam: the SAM helper or None.
        amp: ``bf16`` or ``none`` (fp16's GradScaler decides on the host).
        autocast_cache: False inside a CUDA graph (weight casts must be graph kernels).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer,
        params: list[nn.Parameter],
        *,
        clipper: DeviceClipper,
        sam: SAM | None = None,
        amp: str = "bf16",
        sdpa_backend: str = "auto",
        autocast_cache: bool = False,
    ) -> None:
        if amp == "fp16":
            raise ValueError("the device step supports amp bf16 or none (fp16's GradScaler syncs)")
        if not all(g.get("fused") for g in optimizer.param_groups):
            raise ValueError("the device step needs fused AdamW (its found_inf input skips an update)")
        self.model, self.loss_fn, self.optimizer, self.params = model, loss_fn, optimizer, params
        self.clipper, self.sam, self.amp, self.sdpa_backend = clipper, sam, amp, sdpa_backend
        self.autocast_cache = autocast_cache
        self.buffers = [b for b in model.buffers() if b.numel()]
        self.term_keys: list[str] | None = None

    def _autocast(self) -> contextlib.AbstractContextManager:
        device = self.params[0].device
        if self.amp == "none":
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=self.autocast_cache)

    def _forward_backward(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict]:
        with self._autocast(), sdpa_context(self.sdpa_backend):
            out = self.model(x, return_aux=True)
            loss, terms = self.loss_fn(out, y)
        loss.backward()
        return loss, terms

    def _grad_norm(self) -> Tensor:
        grads = [p.grad for p in self.params if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads)

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        saved = [b.clone() for b in self.buffers]  # BatchNorm statistics, put back on a skip
        self.optimizer.zero_grad(set_to_none=True)
        loss, terms = self._forward_backward(x, y)
        finite = torch.isfinite(loss.detach())
        if self.sam is not None and self.sam.rho > 0:
            norm1 = self._grad_norm()
            finite = finite & torch.isfinite(norm1)
            self.sam.perturb(self.sam.grad_norm() if self.sam.adaptive else norm1)
            self.optimizer.zero_grad(set_to_none=True)
            try:
                self._forward_backward(x, y)
            finally:
                self.sam.restore()
        norm = self._grad_norm()
        finite = finite & torch.isfinite(norm)
        self.clipper(self.params, norm, finite)
        self.optimizer.grad_scale = None
        self.optimizer.found_inf = (~finite).float()
        try:
            self.optimizer.step()
        finally:
            self.optimizer.found_inf = None
        with torch.no_grad():
            for b, s in zip(self.buffers, saved, strict=True):
                b.copy_(torch.where(finite, b, s))
        if self.term_keys is None:
            self.term_keys = list(terms)
        vals = [loss.detach().float().reshape(())]
        for k in self.term_keys:
            v = terms[k]
            # a Python float becomes a fill kernel (torch.tensor would copy from the host: not capturable)
            vals.append(
                v.detach().float().reshape(())
                if isinstance(v, Tensor)
                else torch.full((), float(v), dtype=torch.float32, device=loss.device)
            )
        vals += [norm.detach().float().reshape(()), (~finite).float().reshape(())]
        return torch.stack(vals)

    def result(self, packed: Tensor) -> StepResult:
        """The step's outcome from its packed output (one device-to-host read)."""
        vals = packed.tolist()
        keys = self.term_keys or []
        loss, terms = vals[0], dict(zip(keys, vals[1 : 1 + len(keys)], strict=True))
        norm, skipped = vals[1 + len(keys)], vals[2 + len(keys)] > 0
        return StepResult(skipped, loss, terms, norm)


def set_tensor_lr(optimizer: torch.optim.Optimizer) -> None:
    """Turn every group's learning rate into a 0-d device tensor (written in place from then on)."""
    for g in optimizer.param_groups:
        if not isinstance(g["lr"], Tensor):
            g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float32, device=g["params"][0].device)


def write_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate: in place when it is a device tensor (read by a captured step)."""
    for g in optimizer.param_groups:
        if isinstance(g["lr"], Tensor):
            g["lr"].fill_(lr)
        else:
            g["lr"] = lr


def plain_optimizer_state(state: dict) -> dict:
    """An optimiser ``state_dict`` with tensor learning rates as floats (a checkpoint loads into an
    eager run, whose foreach AdamW refuses tensor learning rates)."""
    for g in state.get("param_groups", []):
        if isinstance(g.get("lr"), Tensor):
            g["lr"] = float(g["lr"])
    return state


def check_graph_mode(tc: object, device: torch.device, *, distributed: bool) -> None:
    """Refuse ``train.cuda_graph`` where the captured step cannot run (a ConfigError naming the key)."""
    from cmafnet.errors import ConfigError

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
    """The trainer's captured step for one stage: warm-up, capture per epoch, replay.

    The first ``warmup`` steps of a stage run the :class:`DeviceStep` eagerly on a side stream (they
    create the optimiser state, autotune cuDNN, compile when ``train.compile``); later steps replay a
    graph captured at the first step of each epoch (after :meth:`new_epoch`). Warm-up and replayed
    steps compute the same update.
    """

    WARMUP = 2  # eager steps per stage before the first capture

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        params: list[nn.Parameter],
        tc: object,
        *,
        sam: SAM | None,
        device: torch.device,
        warmup: int | None = None,
    ) -> None:
        self.optimizer, self.device = optimizer, device
        self.warmup = self.WARMUP if warmup is None else warmup
        self.clipper = DeviceClipper(tc.clip, device)
        self.prepare_optimizer()
        self.step_fn = DeviceStep(
            model, _unset_loss, optimizer, params, clipper=self.clipper, sam=sam, amp=tc.amp,
            sdpa_backend=tc.sdpa_backend, autocast_cache=False,
        )  # fmt: skip
        self.graph: object | None = None
        self.warm_steps = 0
        self.captures = 0

    def prepare_optimizer(self) -> None:
        """Capturable param groups with device-tensor learning rates (after any state load)."""
        from cmafnet.training.graphs import make_capturable

        make_capturable(self.optimizer)
        set_tensor_lr(self.optimizer)

    def new_epoch(self, loss_fn: LossFn) -> None:
        """Drop the previous graph: the next step captures one with this epoch's loss function."""
        self.graph = None
        self.step_fn.loss_fn = loss_fn
        self.step_fn.term_keys = None

    def step(self, x: Tensor, y: Tensor, after_launch: Callable[[], None] | None = None) -> StepResult:
        """One update on ``(x, y)``; ``after_launch`` runs once the step is queued (the next batch's
        preprocessing goes onto its side stream while the GPU trains), before the one host read."""
        if self.graph is None and self.warm_steps >= self.warmup:
            from cmafnet.training.graphs import GraphedStep

            self.graph = GraphedStep(self.step_fn, [x, y], warmup=0)
            self.captures += 1
        if self.graph is not None:
            packed = self.graph(x, y)
        elif self.device.type == "cuda":  # warm-up on a side stream, as CUDA-graph capture requires
            main = torch.cuda.current_stream(self.device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                packed = self.step_fn(x, y)
            main.wait_stream(side)
            self.warm_steps += 1
        else:  # never captured off CUDA (check_graph_mode refuses it); eager, for the CPU tests
            packed = self.step_fn(x, y)
            self.warm_steps += 1
        if after_launch is not None:
            after_launch()
        return self.step_fn.result(packed)


def _unset_loss(out: object, y: Tensor) -> tuple[Tensor, dict]:
    raise RuntimeError("GraphMode.new_epoch(loss_fn) must be called before the first step")
