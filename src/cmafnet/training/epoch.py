"""One epoch of a stage: :func:`train_one_epoch` (the optimiser steps) and :func:`end_epoch` (validation,
records, best model, early stopping, checkpoint), as plain functions of a
:class:`~cmafnet.training.progress.TrainRun`."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import torch

from cmafnet import run as runfolder
from cmafnet.config import StageConfig
from cmafnet.data.prefetch import Prefetcher, batch_seed
from cmafnet.errors import CmafnetError
from cmafnet.training import distributed as distr
from cmafnet.training.budget import epoch_steps, stage_epochs
from cmafnet.training.checkpoint import save_run
from cmafnet.training.monitors import validate
from cmafnet.training.progress import TrainRun
from cmafnet.training.records import add_step_cost, step_passes, total_cost
from cmafnet.training.schedules import schedule_at, uses_ramp
from cmafnet.training.stages import StageStep, freeze_eval
from cmafnet.training.step import StepResult

log = logging.getLogger(__name__)


def train_one_epoch(run: TrainRun, st: StageStep) -> str:
    """Run the remaining steps of the current epoch; returns ok | stopped | interrupted."""
    p, tc, stage = run.p, run.tc, st.stage
    loader = run.data.make_loader(True, p.global_epoch, p.step_in_epoch)
    run.model.train()
    freeze_eval(run.model)
    limit = epoch_steps(stage, p.epoch, run.steps_per_epoch)
    bar = _progress_bar(run, stage, limit)
    batches = _batches(run, loader, limit)
    passes = step_passes(max((g.sam.rho for g in st.step.groups if g.sam is not None), default=0.0))
    t0 = time.perf_counter()
    for i, (x, y) in enumerate(batches, start=p.step_in_epoch):
        sched = schedule_at(
            stage, run.cfg.regularizers, epoch=p.epoch, step=i, steps_per_epoch=run.steps_per_epoch,
            ramp_epochs=p.ramp_epochs,
        )  # fmt: skip
        p.lr = sched.lr
        res = st(x, y, sched, after_forward=batches.launch_next)
        p.step_in_epoch, p.global_step = i + 1, p.global_step + 1
        _record_step(run, res, stage)
        seconds = time.perf_counter() - t0  # the step read its result back: its work is done
        p.epoch_train_s += seconds
        p.epoch_timed_steps += 1
        add_step_cost(p, stage.name, images=tc.batch_size, passes=passes, macs_per_image=p.macs_per_image,
                      seconds=seconds)  # fmt: skip
        if bar is not None:
            bar.update(1)
            if p.global_step % tc.log_every == 0 or i + 1 == limit:
                n = max(p.epoch_count, 1)
                bar.set_postfix(loss=f"{p.epoch_sums.get('loss', 0.0) / n:.4f}", lr=f"{p.lr:.2e}",
                                skipped=p.nonfinite_total)  # fmt: skip
        status, save = _check_stop(run, limit)
        if status != "ok" or save:
            save_run(run, st)
        if status != "ok":
            if bar is not None:
                bar.close()
            return status
        t0 = time.perf_counter()  # a periodic checkpoint is not training time
    if bar is not None:
        bar.close()
    return "ok"


def _progress_bar(run: TrainRun, stage: StageConfig, limit: int) -> Any:
    if not (run.show_progress and run.info.is_main):
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=limit, initial=run.p.step_in_epoch, leave=False,
        desc=f"{stage.name} {run.p.epoch + 1}/{stage_epochs(stage, run.steps_per_epoch)}",
    )  # fmt: skip


def _batches(run: TrainRun, loader: Iterable, limit: int) -> Prefetcher:
    """The epoch's remaining model inputs ``(x, y)``: shard, preprocess, memory format.

    On CUDA batch ``i + 1`` is prepared on a side stream while step ``i`` runs: launched once the
    forward pass of step ``i`` is queued. Each batch's preprocessing runs with the RNGs seeded by
    ``(train.seed, epoch, batch, rank)`` (see :mod:`cmafnet.data.prefetch`), so its augmentation does not
    depend on what ran before: the overlapped (CUDA) and serial paths, and a resumed run, prepare
    identical batches.
    """
    tc, info, device = run.tc, run.info, run.device
    epoch = run.p.global_epoch

    def prepare(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        # also called from inside the step's loss function (autocast and autograd on there)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            x8, y, _ = distr.shard(batch, info)
            x = run.data.preprocess_train(x8)
            if tc.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        return x, y

    return Prefetcher(
        loader, prepare, device=device, seed=lambda b: batch_seed(tc.seed, epoch, b, info.rank),
        start=run.p.step_in_epoch, limit=limit, overlap=run.prefetch and device.type == "cuda",
        early=False,
    )  # fmt: skip


def _record_step(run: TrainRun, res: StepResult, stage: StageConfig) -> None:
    p = run.p
    if res.skipped:
        p.nonfinite_total += 1
        p.nonfinite_run += 1
        log.warning(
            "non-finite loss/gradient at step %d (loss %s, grad norm %s): step skipped (%d in a row)",
            p.global_step, res.loss, res.grad_norm, p.nonfinite_run,
        )  # fmt: skip
        if p.nonfinite_run >= run.tc.max_nonfinite_steps:
            run.records.write_meta(p, status="failed")
            raise CmafnetError(
                f"training diverged: {p.nonfinite_run} consecutive non-finite steps (loss or gradients) in "
                f"stage '{stage.name}', epoch {p.epoch + 1}, step {p.step_in_epoch}; the last good checkpoint "
                f"is {run.out / runfolder.LAST_CHECKPOINT}. Lower the learning rate, use train.amp=bf16 or none, "
                "or check the data"
            )
        return
    p.nonfinite_run = 0
    p.epoch_count += 1
    for k, v in {"loss": res.loss, "grad_norm": res.grad_norm, **res.terms}.items():
        p.epoch_sums[k] = p.epoch_sums.get(k, 0.0) + v


def _check_stop(run: TrainRun, limit: int) -> tuple[str, bool]:
    """(ok | stopped | interrupted, whether a periodic checkpoint is due), agreed by every rank."""
    tc, p = run.tc, run.p
    stop = any(bool(cb(run)) for cb in run.callbacks)
    if run.stop_after_steps is not None and p.global_step >= run.stop_after_steps:
        stop = True
    save = bool(tc.checkpoint_every_steps) and p.global_step - run.last_save_step >= tc.checkpoint_every_steps
    if tc.checkpoint_every_minutes:
        save = save or time.monotonic() - run.last_save_time >= 60.0 * tc.checkpoint_every_minutes
    save = save and p.step_in_epoch < limit  # the epoch end saves anyway
    sig = run.stop_signal is not None
    if run.info.enabled:  # every rank must stop (and save) at the same step
        t = torch.tensor([float(stop), float(sig), float(save)], device=run.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        stop, sig, save = bool(t[0]), bool(t[1]), bool(t[2])
    if sig:
        return "interrupted", save
    return ("stopped" if stop else "ok"), save


def end_epoch(run: TrainRun, st: StageStep) -> None:
    """Validate, record, keep the best model, early-stop check, checkpoint."""
    p, tc, stage = run.p, run.tc, st.stage
    t0 = time.perf_counter()
    # the loss weights the monitors report: the loss clock at the epoch's end
    metrics, monitors = validate(
        run.model, run.data, tc, head=run.roles.get("head") or list(run.model.parameters())[-2:],
        objective=run.objective, device=run.device, loss_epoch=p.epoch + 1.0,
    )  # fmt: skip
    row = _epoch_row(run, stage, metrics, monitors)
    row["val_s"] = round(time.perf_counter() - t0, 3)  # the validation pass and its monitors
    run.rows.append(row)
    # best model by validation AUPRC, among stages that train the main head
    tracks_best = stage.train != "branches" or all(s.train == "branches" for s in tc.stages)
    auprc = metrics.get("auprc")
    new_best = tracks_best and auprc is not None and auprc > p.best_metric
    if new_best:
        p.best_metric, p.best_epoch = float(auprc), p.global_epoch + 1
    stop_stage = _early_stop(run, stage, metrics.get("balanced_accuracy"))
    # advance the position before checkpointing: the checkpoint names the next epoch to run
    p.global_epoch += 1
    p.ramp_epochs += 1.0 if uses_ramp(stage) else 0.0
    p.epoch += 1
    p.step_in_epoch, p.epoch_sums, p.epoch_count, p.epoch_train_s, p.epoch_timed_steps = 0, {}, 0, 0.0, 0
    if stop_stage:
        log.info("early stopping stage '%s' after %d epochs without a balanced-accuracy gain", stage.name,
                 p.es_bad_epochs)  # fmt: skip
    if stop_stage or p.epoch >= stage_epochs(stage, run.steps_per_epoch):
        next_stage(p)
    if run.info.is_main:
        if new_best:
            runfolder.save_weights(run.model, run.out / runfolder.WEIGHTS_FILE)
        run.records.write_metrics(run.rows)
        run.records.write_meta(p, status="running")
        run.records.log_tensorboard(row)
        log.info(
            "epoch %d (%s %d): loss %.4f, val bacc %s, val auprc %s, %.0f img/s (%.1f ms/step)%s", row["epoch"],
            stage.name, row["epoch_in_stage"], row.get("train_loss", float("nan")), _fmt(metrics.get("balanced_accuracy")),
            _fmt(auprc), row["train_img_s"], row["step_ms"], " (best)" if new_best else "",
        )  # fmt: skip
    save_run(run, st)


def _epoch_row(run: TrainRun, stage: StageConfig, metrics: dict, monitors: dict) -> dict[str, Any]:
    p = run.p
    n = max(p.epoch_count, 1)
    secs = distr.all_reduce_float(p.epoch_train_s, run.info, "max")  # the slowest rank sets the pace
    steps = max(p.epoch_timed_steps, 1)
    row: dict[str, Any] = {
        "stage": p.stage, "stage_name": stage.name, "epoch": p.global_epoch + 1, "epoch_in_stage": p.epoch + 1,
        "step": p.global_step, "lr": p.lr, "nonfinite_steps": p.nonfinite_total, "time_s": round(secs, 3),
        "train_img_s": round(p.epoch_timed_steps * run.tc.batch_size / secs, 2) if secs > 0 else float("nan"),
        "step_ms": round(1e3 * secs / steps, 3),
    }  # fmt: skip
    # what the run has cost so far (records.COST_CONVENTION): plot any metric against compute
    total = total_cost(p)
    row.update({"images_seen": total["images"], "train_passes": total["passes"], "train_macs": total["macs"],
                "train_seconds": round(total["seconds"], 3)})  # fmt: skip
    row.update(
        {f"train_{k}": distr.all_reduce_float(v / n, run.info) for k, v in sorted(p.epoch_sums.items())}
    )
    row.update({f"val_{k}": v for k, v in metrics.items()})
    row.update(monitors)
    for key in [k for k in monitors if k.startswith("loss_weight_c")]:
        # the learning rate each class effectively trains with: lr x its mean weight in the loss (§4.5)
        row[f"eff_lr_c{key.removeprefix('loss_weight_c')}"] = p.lr * monitors[key]
    return row


def _early_stop(run: TrainRun, stage: StageConfig, bacc: float | None) -> bool:
    """Early stopping on validation balanced accuracy, within a stage that trains the main head."""
    p, patience = run.p, run.tc.early_stopping_patience
    if not patience or stage.train == "branches" or bacc is None:
        return False
    if bacc > p.es_best:
        p.es_best, p.es_bad_epochs = float(bacc), 0
        return False
    p.es_bad_epochs += 1
    return p.es_bad_epochs >= patience


def next_stage(p: Any) -> None:
    """Move the position to the start of the next stage."""
    p.stage += 1
    p.epoch = 0
    p.step_in_epoch = 0
    p.es_best, p.es_bad_epochs = float("-inf"), 0


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"
