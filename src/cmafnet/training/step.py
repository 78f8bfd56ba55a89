"""One optimiser update: the only implementation of a training step in the package.

The trainer runs it eagerly, ``train.cuda_graph`` captures the very same object in a CUDA graph
(:mod:`cmafnet.training.graphs`), and ``cmafnet bench`` times it through the trainer's stage set-up.
The loop passes each step its :class:`~cmafnet.training.schedules.ScheduleValues` (learning rate, loss
clock, beta ramp: numbers, or 0-d device tensors in a captured step) and, optionally, a hook to run
once the first forward pass is queued. The order of operations::

    lr        every parameter group's learning rate := the schedule's (in place when a device tensor)
    pass 1    for each micro-batch: autocast forward -> loss(out, y, schedule) / k -> backward
              (scaled with fp16)
    SAM       unscale (fp16) -> gradient norm -> w + e -> pass 2 over the micro-batches -> back to w
    clip      unscale (fp16) -> total norm -> finite? -> clip (AutoClip records only finite norms)

SAM's radius and the clipping act per *group* of parameters, each with its own gradient norm: one
group holding every trainable parameter, or (stage 1) one per branch with its temporary head, so that
each branch takes the update it would take if it were trained alone.
    update    skip when not finite: fused AdamW's ``found_inf`` input skips it on the device (no host
              read, so the step can be captured); otherwise one host read of the flag decides (the
              GradScaler of fp16, the foreach AdamW of CPU runs)
    restore   BatchNorm running statistics of a skipped step are put back

A skipped step leaves weights, optimiser moments and step count, the clipping history and BatchNorm
statistics untouched and counts as one skipped step. Nothing reads a device value on the host except
that one flag (when the optimiser cannot skip by itself) and :meth:`TrainStep.result`, which fetches
the loss, the terms, the gradient norm and the skip flag together once per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cmafnet.training.clipping import GradClipper
from cmafnet.training.sam import SAM, unscale_grads
from cmafnet.training.schedules import ScheduleValues

LossFn = Callable[[object, Tensor, ScheduleValues], tuple[Tensor, dict]]


@dataclass
class StepResult:
    skipped: bool
    loss: float  # mean loss of pass 1 over the micro-batches
    terms: dict[str, float]
    grad_norm: float  # total norm before clipping (pass 2 with SAM)


def autocast_context(device: torch.device, amp: str, cache: bool = True) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for the device type; a no-op context for ``amp: none``.

    ``cache=False`` re-casts the weights at every use: inside a CUDA graph the casts must be kernels
    of the graph, not tensors cached from before the capture.
    """
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


def sdpa_context(backend: str) -> contextlib.AbstractContextManager:
    """Restrict ``scaled_dot_product_attention`` to one backend; ``auto`` lets torch choose."""
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kinds = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    return sdpa_kernel(kinds[backend])


def total_grad_norm(params: list[nn.Parameter]) -> Tensor:
    """Total L2 norm of the gradients (0-d tensor, no sync); non-finite iff some gradient is."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)


@dataclass
class _Group:
    """Parameters with their own SAM perturbation radius and clipping (their own gradient norm)."""

    params: list[nn.Parameter]
    clipper: GradClipper
    sam: SAM | None


class TrainStep:
    """One training update of ``params`` on a batch ``(x, y)``; see the module docstring for the order.

    ``step(x, y, schedule, after_forward=None)`` returns a 1-d float32 tensor
    ``[loss, *terms, grad_norm, skipped]`` (term keys in :attr:`term_keys`, known after the first
    call); :meth:`result` turns it into a :class:`StepResult` with one host read. ``after_forward``
    runs once, when the first forward pass is queued (the prefetcher launches the next batch then, so
    its host time hides behind the step's).

    Args:
        model: the module to call as ``model(x, return_aux=True)`` (possibly DDP-wrapped or compiled).
        loss_fn: ``loss_fn(out, y, schedule) -> (loss, terms)``; reads no device value on the host.
        optimizer: AdamW over ``params``; when fused (and no ``scaler``), its ``found_inf`` input skips
            a non-finite update on the device.
        params: the trainable parameters.
        clipper: the stage's :class:`~cmafnet.training.clipping.GradClipper`.
        sam: the SAM helper, or None for a plain step.
        groups: a partition of ``params`` into groups clipped and SAM-perturbed by their own gradient
            norm (each gets a clipper of ``clipper.cfg`` and a SAM of ``sam``'s radius); None = one group.
        amp: ``bf16``, ``fp16`` (needs ``scaler``) or ``none``.
        scaler: an enabled GradScaler for fp16, else None.
        accumulate: micro-batches per step (the batch is split into ``accumulate`` equal parts, their
            gradients summed with weight ``1/accumulate``; DDP synchronises on the last one only).
        graph_safe: run only what a CUDA graph can capture (autocast without its weight cache).
        sync_ranks: all ranks skip a step when any must (DDP).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer,
        params: list[nn.Parameter],
        *,
        clipper: GradClipper,
        sam: SAM | None = None,
        amp: str = "none",
        sdpa_backend: str = "auto",
        scaler: torch.amp.GradScaler | None = None,
        accumulate: int = 1,
        graph_safe: bool = False,
        sync_ranks: bool = False,
        groups: list[list[nn.Parameter]] | None = None,
    ) -> None:
        if accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {accumulate}")
        self.model, self.loss_fn, self.optimizer, self.params = model, loss_fn, optimizer, params
        self.amp, self.sdpa_backend = amp, sdpa_backend
        if groups is None or len(groups) == 1:
            self.groups = [_Group(params, clipper, sam)]
        else:
            if sorted(id(p) for g in groups for p in g) != sorted(id(p) for p in params):
                raise ValueError("groups must partition params")
            device = params[0].device
            self.groups = [
                _Group(g, GradClipper(clipper.cfg, device), SAM(g, sam.rho, sam.adaptive) if sam else None)
                for g in groups
            ]
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self.accumulate, self.graph_safe, self.sync_ranks = accumulate, graph_safe, sync_ranks
        fused = all(g.get("fused") for g in optimizer.param_groups)
        # skip on the device (fused AdamW's found_inf) or decide on the host (one read of the flag)
        self.device_skip = fused and self.scaler is None
        if graph_safe and not self.device_skip:
            raise ValueError("a captured step needs fused AdamW and no GradScaler (amp bf16 or none)")
        self.buffers = [b for b in model.buffers() if b.numel()]
        self.term_keys: list[str] | None = None

    # ------------------------------------------------------------------------------ passes
    def _micro_batches(self, x: Tensor, y: Tensor) -> Iterator[tuple[Tensor, Tensor, bool]]:
        k = self.accumulate
        if k == 1:
            yield x, y, True
            return
        if x.shape[0] % k:
            raise ValueError(f"a batch of {x.shape[0]} cannot be split into {k} equal micro-batches")
        for i, (xi, yi) in enumerate(zip(x.chunk(k), y.chunk(k), strict=True)):
            yield xi, yi, i == k - 1

    def _no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """DDP's ``no_sync`` on every micro-batch but the last (gradients are reduced once)."""
        if last:
            return contextlib.nullcontext()
        ddp = getattr(self.model, "_orig_mod", self.model)  # compiled DDP: the wrapper underneath
        return ddp.no_sync() if hasattr(ddp, "no_sync") else contextlib.nullcontext()

    def _forward_backward(
        self, x: Tensor, y: Tensor, sched: ScheduleValues, after_forward: Callable[[], None] | None = None
    ) -> tuple[Tensor, dict]:
        """One pass: forward and backward over the micro-batches; returns the mean loss and terms."""
        k = self.accumulate
        device = self.params[0].device
        losses, term_sums = [], {}
        for xi, yi, last in self._micro_batches(x, y):
            with self._no_sync(last):
                with (
                    autocast_context(device, self.amp, cache=not self.graph_safe),
                    sdpa_context(self.sdpa_backend),
                ):
                    out = self.model(xi, return_aux=True)
                    if after_forward is not None:
                        after_forward()
                        after_forward = None
                    loss, terms = self.loss_fn(out, yi, sched)
                scaled = loss if k == 1 else loss / k
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            if k == 1:
                return loss.detach(), terms
            losses.append(loss.detach())
            for key, v in terms.items():
                term_sums[key] = term_sums.get(key, 0.0) + v
        return torch.stack(losses).mean(), {key: v / k for key, v in term_sums.items()}

    # ------------------------------------------------------------------------------ step
    def __call__(
        self, x: Tensor, y: Tensor, sched: ScheduleValues, after_forward: Callable[[], None] | None = None
    ) -> Tensor:
        for group in self.optimizer.param_groups:  # the schedule's learning rate
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(sched.lr)  # a kernel of the step, so a captured step follows the schedule
            else:
                group["lr"] = sched.lr
        saved = [b.clone() for b in self.buffers]  # BatchNorm statistics, put back on a skip
        self.optimizer.zero_grad(set_to_none=True)
        loss, terms = self._forward_backward(x, y, sched, after_forward)
        finite = torch.isfinite(loss)
        if any(g.sam is not None and g.sam.rho > 0 for g in self.groups):
            unscale_grads(self.params, self.scaler)  # SAM's direction needs the true gradient
            for g in self.groups:
                norm1 = total_grad_norm(g.params)
                finite = finite & torch.isfinite(norm1)
                g.sam.perturb(g.sam.grad_norm() if g.sam.adaptive else norm1)
            self.optimizer.zero_grad(set_to_none=True)
            try:
                self._forward_backward(x, y, sched)
            finally:
                for g in self.groups:
                    g.sam.restore()  # back to w, keeping the gradient taken at w + e
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norms = [total_grad_norm(g.params) for g in self.groups]
        for n in norms:
            finite = finite & torch.isfinite(n)
        if self.sync_ranks and dist.is_available() and dist.is_initialized():
            flag = finite.float()
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # device op: every rank skips together
            finite = flag > 0
        for g, n in zip(self.groups, norms, strict=True):
            g.clipper(g.params, n, finite)
        self._update(finite, saved)
        norm = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
        return self._pack(loss, terms, norm, finite)

    def clip_state(self) -> dict:
        """The clipping history of every group (a checkpoint's ``clip``)."""
        if len(self.groups) == 1:
            return self.groups[0].clipper.state_dict()
        return {"groups": [g.clipper.state_dict() for g in self.groups]}

    def load_clip_state(self, state: dict) -> None:
        states = state.get("groups", [state])
        if len(states) != len(self.groups):
            raise ValueError(
                f"the checkpoint clips {len(states)} parameter groups, this step {len(self.groups)}"
            )
        for g, st in zip(self.groups, states, strict=True):
            g.clipper.load_state_dict(st)

    def _update(self, finite: Tensor, saved: list[Tensor]) -> None:
        if self.device_skip:
            self.optimizer.grad_scale = None
            self.optimizer.found_inf = (~finite).float()
            try:
                self.optimizer.step()
            finally:
                self.optimizer.found_inf = None
            with torch.no_grad():
                for b, s in zip(self.buffers, saved, strict=True):
                    b.copy_(torch.where(finite, b, s))
            return
        if bool(finite):  # the one host read of the step
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
            if saved:
                with torch.no_grad():
                    torch._foreach_copy_(self.buffers, saved)
        if self.scaler is not None:
            self.scaler.update()  # backs the scale off when unscale_ saw an inf

    def _pack(self, loss: Tensor, terms: dict, norm: Tensor, finite: Tensor) -> Tensor:
        if self.term_keys is None:
            self.term_keys = list(terms)
        vals = [loss.float().reshape(())]
        for k in self.term_keys:
            v = terms[k]
            # a Python float becomes a fill kernel (torch.tensor would copy from the host: not capturable)
            vals.append(
                v.detach().float().reshape(()).to(loss.device)
                if isinstance(v, Tensor)
                else torch.full((), float(v), dtype=torch.float32, device=loss.device)
            )
        vals += [norm.detach().float().reshape(()).to(loss.device), (~finite).float().reshape(())]
        return torch.stack(vals)

    def result(self, packed: Tensor) -> StepResult:
        """The step's outcome from its packed output (one device-to-host read)."""
        vals = packed.tolist()
        keys = self.term_keys or []
        loss, terms = vals[0], dict(zip(keys, vals[1 : 1 + len(keys)], strict=True))
        norm, skipped = vals[1 + len(keys)], vals[2 + len(keys)] > 0
        return StepResult(skipped, loss, terms, norm)
