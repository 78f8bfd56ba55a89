"""``fit``: from a config, a store and a split to a finished (or resumable) run folder.

The stage runner is a plain loop (:func:`run_stages`)::

    for stage in stages[p.stage:]:
        st = prepare_stage(...)                 # freeze roles, AdamW, SAM, clipper, the step
        while in this stage:
            train_one_epoch(run, st)            # optimiser steps, periodic checkpoints, stop requests
            end_epoch(run, st)                  # validate, metrics row, best model, early stop, checkpoint

Position and book-keeping live in :class:`~cmafnet.training.progress.Progress`; a checkpoint is that
plus the states of everything that changes, so a resumed run replays exactly the remaining steps of an
uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cmafnet import run as runfolder
from cmafnet.config import Config, TrainConfig
from cmafnet.devices import device_name
from cmafnet.errors import ConfigError
from cmafnet.files import hold_folder
from cmafnet.models.complexity import forward_macs
from cmafnet.models.pretrained import resolve_normalization
from cmafnet.training import distributed as distr
from cmafnet.training.budget import resolve_budget, stage_steps
from cmafnet.training.checkpoint import restore_stage
from cmafnet.training.data import prepare_data
from cmafnet.training.epoch import end_epoch, next_stage, train_one_epoch
from cmafnet.training.folder import check_run_folder, resume_run, start_run_folder
from cmafnet.training.progress import Callback, TrainData, TrainRun
from cmafnet.training.records import RunRecords, stage_throughput, total_cost
from cmafnet.training.stages import initial_roles, prepare_stage

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextmanager
def kernel_selection(deterministic: bool) -> Iterator[None]:
    """How kernels are chosen during one training run; every flag is restored afterwards.

    ``deterministic``: deterministic algorithms (warn-only where none exists) and no cuDNN
    autotuning. Otherwise cuDNN autotunes (``cudnn.benchmark``): it times the convolution
    algorithms once per new input shape and keeps the fastest. Training shapes are fixed (one
    batch size, one image size), so that costs a few steps once and then speeds up every step.
    """
    prev = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.deterministic,
    )
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev[0], warn_only=prev[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = prev[2], prev[3]


def prepare_objective(objective: nn.Module, tc: TrainConfig, device: torch.device) -> nn.Module:
    """The objective where the model lives (it holds buffers and parameters), its regularisers compiled
    under ``train.compile`` (the model itself is compiled per stage, by ``prepare_stage``)."""
    objective = objective.to(device)
    objective.compile_regularizers(enable=tc.compile)
    return objective


def build_run(
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
    macs_per_image: int | None = None,
) -> TrainRun:
    """A :class:`TrainRun` ready for :func:`run_stages` (what ``fit`` does after building model and data).

    ``macs_per_image``: the model's forward MACs per image when already counted (else counted here).

    Raises:
        ConfigError: a batch larger than the training split, or ``train.cuda_graph`` where it cannot run.
    """
    tc = cfg.train
    info = info or distr.DistInfo(device=next(model.parameters()).device)
    per_rank = distr.per_rank_batch(tc.batch_size, info)  # the global batch must split evenly over the ranks
    if per_rank % tc.accumulate_steps:
        raise ConfigError(
            f"train.accumulate_steps: {tc.accumulate_steps} micro-batches do not divide the {per_rank} images "
            f"of a rank (train.batch_size {tc.batch_size} over {info.world} ranks)"
        )
    if tc.cuda_graph:
        from cmafnet.training.graphs import check_graph_mode

        check_graph_mode(tc, info.device, distributed=info.enabled)
    objective = prepare_objective(objective, tc, info.device)
    out = Path(out_dir)
    tr = TrainRun(
        cfg, model, objective, data, out, info, roles=initial_roles(model),  # before any stage freezes
        steps_per_epoch=steps_per_epoch(tc, len(data.train_idx)),
        records=RunRecords(out, info, tc),
        scaler=torch.amp.GradScaler(info.device.type) if tc.amp == "fp16" else None,
        show_progress=progress, stop_after_steps=stop_after_steps, callbacks=list(callbacks),
        last_save_time=time.monotonic(),
    )  # fmt: skip
    # the unit of the cost records
    tr.p.macs_per_image = (
        macs_per_image if macs_per_image is not None else forward_macs(model, cfg.model.img_size)
    )
    return tr


def steps_per_epoch(tc: TrainConfig, n_train: int) -> int:
    """Optimiser steps of a full epoch: whole batches of the training split (``max_steps_per_epoch`` caps).

    Raises:
        ConfigError: the batch is larger than the training split.
    """
    n_batches = n_train // tc.batch_size
    if n_batches == 0:
        raise ConfigError(f"train.batch_size: {tc.batch_size} is larger than the training split ({n_train})")
    return min(n_batches, tc.max_steps_per_epoch or n_batches)


def run_stages(run: TrainRun) -> dict:
    """Train the remaining stages of ``run``; returns the summary (also written to run.json)."""
    handlers = _install_signal_handlers(run)
    try:
        status = "finished"
        while run.p.stage < len(run.tc.stages) and status == "finished":
            status = _run_stage(run)
    except BaseException as err:  # the run folder must not claim "running" after a crash
        run.records.write_meta(
            run.p, status="interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
        )
        raise
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)
    return _finish(run, status)


def run_memory_probe(run: TrainRun) -> dict:
    """A kNN probe, whose memory the data path filled with the training embeddings: no optimiser step and
    no stage; one validation pass, then the run folder as any finished run's (metrics row, weights, cost)."""
    from cmafnet.training.monitors import validate

    p = run.p
    metrics, _ = validate(
        run.model, run.data, run.tc, head=[], objective=run.objective, device=run.device, loss_epoch=1.0
    )
    row = {"stage": 0, "stage_name": "knn", "epoch": 1, "epoch_in_stage": 1, "step": 0,
           "train_macs": total_cost(p)["macs"], **{f"val_{k}": v for k, v in metrics.items()}}  # fmt: skip
    run.rows.append(row)
    if metrics.get("auprc") is not None:
        p.best_metric, p.best_epoch = float(metrics["auprc"]), 1
    p.global_epoch, p.stage = 1, len(run.tc.stages)
    if run.info.is_main:
        runfolder.save_weights(run.model, run.out / runfolder.WEIGHTS_FILE)
        run.records.write_metrics(run.rows)
    return _finish(run, "finished")


def _run_stage(run: TrainRun) -> str:
    """The current stage's remaining epochs; ``finished`` when it ended, else stopped | interrupted."""
    index, stage = run.p.stage, run.tc.stages[run.p.stage]
    if stage_steps(stage, run.steps_per_epoch) == 0:
        next_stage(run.p)
        return "finished"
    st = prepare_stage(
        run.model, run.objective, stage, run.tc, run.roles, device=run.device, distributed=run.info.enabled,
        scaler=run.scaler,
    )  # fmt: skip
    run.stage_step = st
    if run.resume_state is not None:
        restore_stage(run, st, run.resume_state)
        run.resume_state = None
    while run.p.stage == index:  # end_epoch moves on to the next stage
        status = train_one_epoch(run, st)
        if status != "ok":
            return status
        end_epoch(run, st)
    return "finished"


def _install_signal_handlers(run: TrainRun) -> dict:
    """SIGINT/SIGTERM: save a checkpoint after the current step, then stop (a second signal: at once)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum: int, _frame: Any) -> None:
        if run.stop_signal is not None:
            raise KeyboardInterrupt
        run.stop_signal = signum
        log.warning("signal %d: saving a checkpoint after this step, then stopping", signum)

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}


def _finish(run: TrainRun, status: str) -> dict:
    run.records.close()
    p = run.p
    if run.info.is_main:
        wpath = run.out / runfolder.WEIGHTS_FILE
        if status == "finished" and not wpath.exists():  # no AUPRC was ever defined: keep the last weights
            runfolder.save_weights(run.model, wpath)
        run.records.write_meta(p, status=status)
    distr.barrier(run.info)
    last = run.rows[-1] if run.rows else {}
    best = math.isfinite(p.best_metric)
    return {
        "status": status,
        "out_dir": str(run.out),
        "best_epoch": p.best_epoch if best else None,
        "best_val_auprc": p.best_metric if best else None,
        "epochs": p.global_epoch,
        "global_step": p.global_step,
        "nonfinite_steps": p.nonfinite_total,
        "effective_batch_size": run.tc.batch_size,
        "stage_throughput": stage_throughput(p),
        "cost": total_cost(p),
        "last_val": {k[4:]: v for k, v in last.items() if k.startswith("val_")},
    }


def fit(
    cfg: Config,
    store_path: str | Path,
    split_path: str | Path,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_after_steps: int | None = None,
    callbacks: Iterable[Callback] | None = None,
    device: str | None = None,
) -> dict:
    """Train ``cfg.model`` through ``cfg.train.stages`` and write the run folder ``out_dir``.

    Args:
        cfg: the resolved configuration.
        store_path: a patch store (``cmafnet ingest``).
        split_path: a split of that store (``cmafnet split``).
        out_dir: the run folder (created; must not hold a checkpointed run unless ``resume``).
        resume: continue from ``out_dir/checkpoints/last.pt`` exactly where it stopped; a folder whose
            run never reached its first checkpoint starts from the beginning.
        progress: tqdm progress bars (rank 0).
        stop_after_steps: save a checkpoint and stop after this many optimiser steps (status ``stopped``).
        callbacks: called after every step with the :class:`TrainRun`; returning True saves and stops.
        device: overrides ``cfg.train.device`` (``auto | cpu | cuda | cuda:N``).

    Returns:
        A summary: status (finished | stopped | interrupted), best epoch and validation AUPRC, epochs,
        steps, skipped non-finite steps, effective batch size, training throughput per stage, last
        validation metrics; a finished run also its ``calibration`` (:func:`calibrate_run`).

    Raises:
        RunFolderError: ``out_dir`` already holds a checkpointed run (without ``resume``), or another
            live process holds it (:func:`cmafnet.files.hold_folder`).
        ConfigError: bad settings (for example a batch larger than the training split).
        CmafnetError: training diverged (too many consecutive non-finite steps).
    """
    if device is not None:
        cfg = cfg.model_copy(deep=True)
        cfg.train.device = device
    cfg = resolve_normalization(cfg)[0]  # data.mean/std from the weights, recorded in config.yaml
    out = Path(out_dir)
    # rank 0 holds the run folder (the ranks of one run share it); nothing is read or written before
    with hold_folder(out, "cmafnet train") if distr.launch_rank() == 0 else nullcontext():
        summary = _fit_held(cfg, store_path, split_path, out, resume, progress, stop_after_steps, callbacks)
        if summary["status"] == "finished" and distr.launch_rank() == 0:
            summary["calibration"] = calibrate_run(out, store_path, cfg.train.device)
        return summary


def calibrate_run(out: Path, store_path: str | Path, device: str) -> dict | None:
    """End of training: temperature and operating threshold fitted on the validation split as ``evaluate`` does."""
    from cmafnet.evaluation.evaluate import evaluate_run
    from cmafnet.inference.predict import PredictOptions

    if not runfolder.read_meta(out).get("n_val"):
        return None
    doc = evaluate_run(out, store_path, split="val", bootstrap=0, options=PredictOptions(device, batch_size=256))  # fmt: skip
    meta = runfolder.read_meta(out)
    return {"temperature": meta.get("temperature"), "n_patients": (meta.get("calibration") or {}).get("n_patients"),
            "applied": doc["calibration"]["source"], "threshold": meta.get("threshold")}  # fmt: skip


def _fit_held(
    cfg: Config, store_path: str | Path, split_path: str | Path, out: Path, resume: bool, progress: bool,
    stop_after_steps: int | None, callbacks: Iterable[Callback] | None,
) -> dict:  # fmt: skip
    resume = check_run_folder(out, resume)
    info = distr.setup(cfg.train.device)
    tc = cfg.train
    if tc.amp == "fp16" and info.device.type == "cpu":
        log.warning("train.amp=fp16 on CPU: slow and rarely useful; bf16 or none are the CPU choices")
    try:
        with kernel_selection(tc.deterministic):
            seed_everything(tc.seed)
            data = prepare_data(cfg, store_path, split_path, info.device)
            model = _build_model(cfg, info)
            cfg, data, macs, extraction = _model_inputs(cfg, model, data, store_path, info)
            cfg, budget = resolve_budget(cfg, macs, steps_per_epoch(cfg.train, len(data.train_idx)))
            if budget is not None:
                log.info(
                    "train.budget: %.3g MACs -> steps per stage %s", budget["target_macs"], budget["steps"]
                )
            tr = build_run(
                cfg, model, _build_objective(cfg, data, info), data, out, info=info, progress=progress,
                stop_after_steps=stop_after_steps, callbacks=callbacks or (), macs_per_image=macs,
            )  # fmt: skip
            tr.p.extraction = extraction or {}
            log.info(
                "effective batch size %d (%d micro-batches of %d per rank x %d ranks), %d steps per epoch, device %s",
                tc.batch_size, tc.accumulate_steps, distr.per_rank_batch(tc.batch_size, info) // tc.accumulate_steps,
                info.world, tr.steps_per_epoch, device_name(info.device),
            )  # fmt: skip
            if resume:
                resume_run(tr, out, cfg)
            elif info.is_main:
                start_run_folder(out, cfg, data, info, tr, budget)
            distr.barrier(info)
            knn = cfg.model.name == "probe" and cfg.model.probe.head == "knn"
            return run_memory_probe(tr) if knn else run_stages(tr)
    finally:
        distr.teardown(info)


def _build_model(cfg: Config, info: distr.DistInfo) -> nn.Module:
    from cmafnet.models import create_model

    model = create_model(cfg.model).to(info.device)
    if cfg.model.grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _model_inputs(
    cfg: Config, model: nn.Module, data: TrainData, store_path: str | Path, info: distr.DistInfo
) -> tuple[Config, TrainData, int, dict | None]:
    """What the model trains on and its forward MACs per input; a probe's frozen backbone gets its input scale
    and its embeddings cached once (:mod:`cmafnet.training.probe_data`, with the extraction's cost)."""
    if cfg.model.name != "probe":
        return cfg, data, forward_macs(model, cfg.model.img_size), None
    from cmafnet.training.probe_data import prepare_probe

    pd = prepare_probe(cfg, model, data, store_path, info)
    return pd.cfg, pd.data, pd.macs_per_input, pd.extraction


def _build_objective(cfg: Config, data: TrainData, info: distr.DistInfo) -> nn.Module:
    from cmafnet.losses.objective import Objective

    tc = cfg.train
    objective_epochs = [s.epochs for s in tc.stages if s.loss == "objective"]
    objective = Objective(
        cfg.loss, cfg.regularizers, data.class_counts, num_heads=cfg.model.fusion.heads,
        total_epochs=float(objective_epochs[-1]) if objective_epochs else None,
    ).to(info.device)  # fmt: skip
    if info.rank:  # the same model on every rank (DDP broadcasts it anyway), own augmentation noise
        torch.manual_seed(tc.seed + 1_000_003 * info.rank)
    return objective
