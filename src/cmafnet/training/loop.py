"""The training loop: stages in order, epochs of steps, validation, run-folder records, resume.

``fit`` prepares data and model and hands them to :class:`Trainer`, whose ``run`` is a plain loop::

    for stage in stages[resume_stage:]:
        enter_stage (freeze roles, fresh AdamW, SAM, clipper)
        for epoch: train_epoch (steps) -> evaluate -> metrics row, best model, early stop, checkpoint

Position and book-keeping live in :class:`Progress`; a checkpoint is ``Progress`` plus the states of
everything that changes, so a resumed run replays exactly the remaining steps of an uninterrupted one.
"""

from __future__ import annotations

import gc
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmafnet import __version__, run
from cmafnet.config import Config, StageConfig, dump_config
from cmafnet.data.prefetch import Prefetcher, batch_seed
from cmafnet.errors import CmafnetError, ConfigError, RunFolderError
from cmafnet.training import distributed as distr
from cmafnet.training.checkpoint import rng_state, save_checkpoint, set_rng_state
from cmafnet.training.clipping import GradClipper
from cmafnet.training.graphed import GraphMode, check_graph_mode, plain_optimizer_state, write_lr
from cmafnet.training.monitors import validate
from cmafnet.training.optim import build_adamw, param_groups
from cmafnet.training.progress import Callback, Progress, TrainData
from cmafnet.training.records import RunRecords
from cmafnet.training.sam import SAM
from cmafnet.training.schedules import lr_factor
from cmafnet.training.stages import configure_trainable, freeze_eval, initial_roles, stage_loss, uses_ramp
from cmafnet.training.step import train_step

log = logging.getLogger(__name__)


class Trainer:
    """Runs ``cfg.train.stages`` on ``data``; writes the run folder on rank 0."""

    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        objective: nn.Module,
        data: TrainData,
        out_dir: str | Path,
        *,
        info: distr.DistInfo | None = None,
        progress: bool = True,
        stop_after_steps: int | None = None,
        callbacks: Iterable[Callback] = (),
    ):
        self.cfg, self.tc = cfg, cfg.train
        self.info = info or distr.DistInfo(device=next(model.parameters()).device)
        self.device = self.info.device
        # the objective holds buffers and parameters: it lives where the model does
        self.model, self.objective, self.data = model, objective.to(self.info.device), data
        self.out = Path(out_dir)
        self.records = RunRecords(self.out, self.info, self.tc)
        self.show_progress = progress and self.info.is_main
        self.stop_after_steps = stop_after_steps
        self.callbacks = list(callbacks)
        self.roles = initial_roles(model)  # before any stage freezes anything
        self.p = Progress()
        self.rows: list[dict] = []
        self.local_batch = distr.per_rank_batch(self.tc.batch_size, self.info)
        n_batches = len(data.train_idx) // self.tc.batch_size
        if n_batches == 0:
            raise ConfigError(
                f"train.batch_size: {self.tc.batch_size} is larger than the training split ({len(data.train_idx)})"
            )
        self.steps_per_epoch = min(n_batches, self.tc.max_steps_per_epoch or n_batches)
        amp = self.tc.amp
        self.scaler = torch.amp.GradScaler(self.device.type) if amp == "fp16" else None
        self._stop_signal: int | None = None
        # set per stage by _enter_stage
        self.optimizer: torch.optim.Optimizer | None = None
        self.trainable: list[nn.Parameter] = []
        self.sam: SAM | None = None
        self.clipper = GradClipper(self.tc.clip)
        self.train_model: nn.Module = model
        # prepare batch i + 1 on a side CUDA stream during step i (serial on the CPU; same results)
        self.prefetch = self.device.type == "cuda"
        if self.tc.cuda_graph:
            check_graph_mode(self.tc, self.device, distributed=self.info.enabled)
        if self.tc.compile:
            self.objective.compile_regularizers()  # the model is compiled per stage (_enter_stage)
        self.graph: GraphMode | None = None  # set per stage with train.cuda_graph

    # ------------------------------------------------------------------------------ stages
    def _enter_stage(self, stage: StageConfig) -> None:
        named = configure_trainable(self.model, stage, self.roles)
        uses_objective = stage.loss == "objective"
        for p in self.objective.parameters():
            p.requires_grad_(uses_objective)
        obj_params = list(self.objective.parameters()) if uses_objective else []
        groups = param_groups(named, self.tc.weight_decay, extra_no_decay=obj_params)
        self.trainable = [p for g in groups for p in g["params"]]
        self.optimizer = build_adamw(groups, stage.lr, fused=self.tc.fused_adamw, device=self.device)
        self.sam = SAM(self.trainable, self.tc.sam.rho, self.tc.sam.adaptive) if self.tc.sam.enabled else None
        self.clipper = GradClipper(self.tc.clip)  # gradient scales differ between stages
        m: nn.Module = self.model
        self.train_model = m
        gc.collect()  # free the previous stage's DDP wrapper (its reducer hooks go with it)
        if self.info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            # Stages freeze parts of the model; a frozen role may still sit on the forward path.
            m = DDP(m, device_ids=ids, find_unused_parameters=True)
        if self.tc.compile:
            m = torch.compile(m)
        self.train_model = m
        self.graph = None
        if self.tc.cuda_graph:
            self.graph = GraphMode(
                m, self.optimizer, self.trainable, self.tc, sam=self.sam, device=self.device
            )
            self.clipper = self.graph.clipper  # device-side, same history semantics
        n = sum(p.numel() for p in self.trainable)
        log.info("stage '%s' (%s): %d trainable parameters, lr %.2e", stage.name, stage.train, n, stage.lr)

    def _set_lr(self, stage: StageConfig) -> None:
        total = stage.epochs * self.steps_per_epoch
        step = self.p.epoch * self.steps_per_epoch + self.p.step_in_epoch
        warm = round(stage.warmup_epochs * self.steps_per_epoch)
        self.p.lr = stage.lr * lr_factor(stage.schedule, step, total, warmup=warm, cycles=stage.cyclic_cycles)
        write_lr(self.optimizer, self.p.lr)  # in place when a captured step reads it

    # ------------------------------------------------------------------------------ run
    def run(self) -> dict:
        """Train the remaining stages; returns the summary (also written to run.json)."""
        handlers = self._install_signal_handlers()
        try:
            status = self._run_stages()
        except BaseException as err:  # the run folder must not claim "running" after a crash
            self._write_meta(status="interrupted" if isinstance(err, KeyboardInterrupt) else "failed")
            raise
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)
        return self._finish(status)

    def _run_stages(self) -> str:
        stages = self.tc.stages
        while self.p.stage < len(stages):
            index, stage = self.p.stage, stages[self.p.stage]
            if stage.epochs == 0:
                self._next_stage()
                continue
            self._enter_stage(stage)
            if self._resume_state is not None:
                self._load_stage_state(self._resume_state)
                self._resume_state = None
            while self.p.stage == index:  # _end_epoch moves on to the next stage
                status = self._train_epoch(stage)
                if status != "ok":
                    return status
                self._end_epoch(stage)
        return "finished"

    def _next_stage(self) -> None:
        self.p.stage += 1
        self.p.epoch = 0
        self.p.step_in_epoch = 0
        self.p.es_best, self.p.es_bad_epochs = -math.inf, 0

    def _loss_fn(self, stage: StageConfig, epoch_f: float, batches: Prefetcher | None = None) -> Callable:
        def loss(out: Any, y: torch.Tensor) -> Any:
            if batches is not None:
                # the forward pass is queued on the GPU: launch the next batch's preprocessing on
                # the side stream now, so its host time hides behind the forward pass (a no-op
                # on the serial path and after the first call: SAM calls this twice)
                batches.launch_next()
            return stage_loss(out, y, stage, self.objective, epoch=epoch_f)

        return loss

    def _train_epoch(self, stage: StageConfig) -> str:
        """Run the remaining steps of the current epoch; returns ok | stopped | interrupted."""
        p, tc = self.p, self.tc
        loader = self.data.make_loader(
            self.data.train_idx, tc.batch_size, True, True, p.global_epoch, p.step_in_epoch
        )
        self.model.train()
        freeze_eval(self.model)
        bar = None
        if self.show_progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=self.steps_per_epoch, initial=p.step_in_epoch, leave=False,
                desc=f"{stage.name} {p.epoch + 1}/{stage.epochs}",
            )  # fmt: skip
        t0 = time.perf_counter()
        batches = self._batches(loader)
        if self.graph is not None:
            # a captured step freezes the loss schedules: re-capture each epoch, at its midpoint values
            if uses_ramp(stage):
                self.objective.set_beta_progress(p.ramp_epochs + 0.5)
            self.graph.new_epoch(self._loss_fn(stage, p.epoch + 0.5))
        for i, (x, y) in enumerate(batches, start=p.step_in_epoch):
            frac = i / self.steps_per_epoch
            self._set_lr(stage)
            if self.graph is not None:
                res = self.graph.step(x, y, after_launch=batches.launch_next)
            else:
                if uses_ramp(stage):
                    self.objective.set_beta_progress(p.ramp_epochs + frac)
                res = train_step(
                    self.train_model, x, y, self._loss_fn(stage, p.epoch + frac, batches), self.optimizer,
                    self.trainable, clipper=self.clipper, scaler=self.scaler, sam=self.sam, amp=tc.amp,
                    sdpa_backend=tc.sdpa_backend,
                )  # fmt: skip
            p.step_in_epoch, p.global_step = i + 1, p.global_step + 1
            self._record_step(res, stage)
            if bar is not None:
                bar.update(1)
                if p.global_step % tc.log_every == 0 or i + 1 == self.steps_per_epoch:
                    n = max(p.epoch_count, 1)
                    bar.set_postfix(loss=f"{p.epoch_sums.get('loss', 0.0) / n:.4f}", lr=f"{p.lr:.2e}",
                                    skipped=p.nonfinite_total)  # fmt: skip
            status = self._check_stop()
            if status != "ok":
                if bar is not None:
                    bar.close()
                self._save_checkpoint()
                return status
        if bar is not None:
            bar.close()
        self._epoch_time = time.perf_counter() - t0
        return "ok"

    def _batches(self, loader: Iterable) -> Prefetcher:
        """The epoch's remaining model inputs ``(x, y)``: shard, preprocess, memory format.

        On CUDA batch ``i + 1`` is prepared on a side stream while step ``i`` runs: launched from the
        loss function, once the forward pass of step ``i`` is queued. Each batch's preprocessing runs
        with the RNGs seeded by ``(train.seed, epoch, batch, rank)`` (see :mod:`cmafnet.data.prefetch`),
        so its augmentation does not depend on what ran before: the overlapped (CUDA) and serial
        paths, and a resumed run, prepare identical batches.
        """
        p, tc, info = self.p, self.tc, self.info
        epoch = p.global_epoch

        def prepare(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
            # also called from inside the step's loss function (autocast and autograd on there)
            with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
                x8, y, _ = distr.shard(batch, info)
                x = self.data.preprocess_train(x8)
                if tc.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
            return x, y

        return Prefetcher(
            loader, prepare, device=self.device, seed=lambda b: batch_seed(tc.seed, epoch, b, info.rank),
            start=p.step_in_epoch, limit=self.steps_per_epoch, overlap=self.prefetch, early=False,
        )  # fmt: skip

    def _record_step(self, res: Any, stage: StageConfig) -> None:
        p = self.p
        if res.skipped:
            p.nonfinite_total += 1
            p.nonfinite_run += 1
            log.warning(
                "non-finite loss/gradient at step %d (loss %s, grad norm %s): step skipped (%d in a row)",
                p.global_step, res.loss, res.grad_norm, p.nonfinite_run,
            )  # fmt: skip
            if p.nonfinite_run >= self.tc.max_nonfinite_steps:
                self._write_meta(status="failed")
                raise CmafnetError(
                    f"training diverged: {p.nonfinite_run} consecutive non-finite steps (loss or gradients) in "
                    f"stage '{stage.name}', epoch {p.epoch + 1}, step {p.step_in_epoch}; the last good checkpoint "
                    f"is {self.out / run.LAST_CHECKPOINT}. Lower the learning rate, use train.amp=bf16 or none, "
                    "or check the data"
                )
            return
        p.nonfinite_run = 0
        p.epoch_count += 1
        sums = p.epoch_sums
        sums["loss"] = sums.get("loss", 0.0) + res.loss
        sums["grad_norm"] = sums.get("grad_norm", 0.0) + res.grad_norm
        for k, v in res.terms.items():
            sums[k] = sums.get(k, 0.0) + v

    def _check_stop(self) -> str:
        stop = any(bool(cb(self)) for cb in self.callbacks)
        if self.stop_after_steps is not None and self.p.global_step >= self.stop_after_steps:
            stop = True
        sig = self._stop_signal is not None
        if self.info.enabled:  # every rank must stop at the same step
            t = torch.tensor([float(stop), float(sig)], device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            stop, sig = bool(t[0]), bool(t[1])
        if sig:
            return "interrupted"
        return "stopped" if stop else "ok"

    # ------------------------------------------------------------------------------ epoch end
    def evaluate(self) -> tuple[dict, dict]:
        """Validation metrics of the main logits and the monitors (every rank, whole split)."""
        return validate(
            self.model, self.data, self.tc, head=self.roles.get("head") or list(self.model.parameters())[-2:],
            objective=self.objective, device=self.device,
        )  # fmt: skip

    def _end_epoch(self, stage: StageConfig) -> bool:
        """Validate, record, keep the best model, early-stop check, checkpoint. True = end the stage."""
        p = self.p
        metrics, monitors = self.evaluate()
        n = max(p.epoch_count, 1)
        row: dict[str, Any] = {
            "stage": p.stage, "stage_name": stage.name, "epoch": p.global_epoch + 1, "epoch_in_stage": p.epoch + 1,
            "step": p.global_step, "lr": p.lr, "nonfinite_steps": p.nonfinite_total,
            "time_s": round(getattr(self, "_epoch_time", float("nan")), 3),
        }  # fmt: skip
        row.update({f"train_{k}": distr.all_mean(v / n, self.info) for k, v in sorted(p.epoch_sums.items())})
        row.update({f"val_{k}": v for k, v in metrics.items()})
        row.update(monitors)
        self.rows.append(row)
        # best model by validation AUPRC, among stages that train the main head
        tracks_best = stage.train != "branches" or all(s.train == "branches" for s in self.tc.stages)
        auprc = metrics.get("auprc")
        new_best = tracks_best and auprc is not None and auprc > p.best_metric
        if new_best:
            p.best_metric, p.best_epoch = float(auprc), p.global_epoch + 1
        # early stopping on validation balanced accuracy, within a stage that trains the main head
        stop_stage = False
        bacc = metrics.get("balanced_accuracy")
        if self.tc.early_stopping_patience and stage.train != "branches" and bacc is not None:
            if bacc > p.es_best:
                p.es_best, p.es_bad_epochs = float(bacc), 0
            else:
                p.es_bad_epochs += 1
                stop_stage = p.es_bad_epochs >= self.tc.early_stopping_patience
        # advance the position before checkpointing: the checkpoint names the next epoch to run
        p.global_epoch += 1
        if uses_ramp(stage):
            p.ramp_epochs += 1.0
        p.epoch += 1
        p.step_in_epoch = 0
        p.epoch_sums, p.epoch_count = {}, 0
        if stop_stage:
            log.info("early stopping stage '%s' after %d epochs without a balanced-accuracy gain", stage.name,
                     p.es_bad_epochs)  # fmt: skip
        if stop_stage or p.epoch >= stage.epochs:
            self._next_stage()
        if self.info.is_main:
            if new_best:
                run.save_weights(self.model, self.out / run.WEIGHTS_FILE)
            self.records.write_metrics(self.rows)
            self._write_meta(status="running")
            self.records.log_tensorboard(row)
            log.info(
                "epoch %d (%s %d): loss %.4f, val bacc %s, val auprc %s%s", row["epoch"], stage.name,
                row["epoch_in_stage"], row.get("train_loss", float("nan")), _fmt(bacc), _fmt(auprc),
                " (best)" if new_best else "",
            )  # fmt: skip
        self._save_checkpoint()
        return stop_stage

    # ------------------------------------------------------------------------------ files
    def _write_meta(self, **fields: Any) -> None:
        self.records.write_meta(self.p, **fields)

    def state_dict(self) -> dict:
        """The full resumable state (plain types and tensors only)."""
        mid_stage = self.p.epoch > 0 or self.p.step_in_epoch > 0
        return {
            "model": self.model.state_dict(),
            "objective": self.objective.state_dict(),
            "optimizer": plain_optimizer_state(self.optimizer.state_dict())
            if (mid_stage and self.optimizer is not None)
            else None,
            "clip": self.clipper.state_dict() if mid_stage else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "schedule": {"stage": self.p.stage, "epoch": self.p.epoch, "step_in_epoch": self.p.step_in_epoch},
            "rng": rng_state(),
            "progress": asdict(self.p),
            "rows": self.rows,
            "config": dump_config(self.cfg),
            "split_hash": self.data.meta.get("split_hash"),
            "store_hash": self.data.meta.get("store_hash"),
            "version": __version__,
            "world_size": self.info.world,
        }

    def _save_checkpoint(self) -> None:
        if self.info.is_main:
            save_checkpoint(self.out / run.LAST_CHECKPOINT, self.state_dict())
        distr.barrier(self.info)

    _resume_state: dict | None = None

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint before :meth:`run` (stage-specific parts load on stage entry)."""
        for key in ("split_hash", "store_hash"):
            if state.get(key) != self.data.meta.get(key):
                raise RunFolderError(
                    f"--resume: {key} differs from the checkpoint's (another split or store?)"
                )
        self.model.load_state_dict(state["model"])
        self.objective.load_state_dict(state["objective"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.p = Progress(**state["progress"])
        self.rows = list(state["rows"])
        self._resume_state = state

    def _load_stage_state(self, state: dict) -> None:
        if state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            if self.graph is not None:
                self.graph.prepare_optimizer()  # tensor learning rate, capturable again
        if state["clip"] is not None:
            self.clipper.load_state_dict(state["clip"])
        set_rng_state(state["rng"])  # last: nothing after this may draw random numbers before the step
        if self.info.rank:  # only rank 0's RNG is saved: ranks > 0 reseed deterministically
            torch.manual_seed(self.tc.seed + 1_000_003 * self.info.rank + self.p.global_step)

    # ------------------------------------------------------------------------------ signals, end
    def _install_signal_handlers(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum: int, frame: Any) -> None:
            if self._stop_signal is not None:  # second signal: give up at once
                raise KeyboardInterrupt
            self._stop_signal = signum
            log.warning("signal %d: saving a checkpoint after this step, then stopping", signum)

        old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, handler)
        return old

    def _finish(self, status: str) -> dict:
        self.records.close()
        if self.info.is_main:
            wpath = self.out / run.WEIGHTS_FILE
            if (
                status == "finished" and not wpath.exists()
            ):  # no AUPRC was ever defined: keep the last weights
                run.save_weights(self.model, wpath)
            self._write_meta(status=status)
        distr.barrier(self.info)
        last = self.rows[-1] if self.rows else {}
        return {
            "status": status,
            "out_dir": str(self.out),
            "best_epoch": self.p.best_epoch if math.isfinite(self.p.best_metric) else None,
            "best_val_auprc": self.p.best_metric if math.isfinite(self.p.best_metric) else None,
            "epochs": self.p.global_epoch,
            "global_step": self.p.global_step,
            "nonfinite_steps": self.p.nonfinite_total,
            "effective_batch_size": self.tc.batch_size,
            "last_val": {k[4:]: v for k, v in last.items() if k.startswith("val_")},
        }


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"
