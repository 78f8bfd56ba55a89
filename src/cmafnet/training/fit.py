"""``fit``: from a config, a store and a split to a finished (or resumable) run folder."""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cmafnet import __version__, run
from cmafnet.config import Config, dump_config
from cmafnet.errors import ConfigError, RunFolderError
from cmafnet.models.weights import resolve_normalization
from cmafnet.training import distributed as distr
from cmafnet.training.checkpoint import load_checkpoint
from cmafnet.training.loop import Callback, TrainData, Trainer

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
    batch size, one image size), so that costs a few steps once and then speeds up every step;
    ``cmafnet bench`` measures with it on, so the trainer now runs what was measured.
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


def _preprocess(
    data_cfg: Any, img_size: int, train: bool, device: torch.device, reference: Any = None
) -> Any:
    from cmafnet.data.transforms import GPUPreprocess

    pre = GPUPreprocess(data_cfg, img_size, train=train, stain_reference=reference)
    return pre.to(device) if isinstance(pre, nn.Module) else pre


def _stain_reference(pre: Any) -> Any:
    for name in ("stain_reference", "reference"):
        ref = getattr(pre, name, None)
        if ref is not None:
            return ref.tolist() if isinstance(ref, torch.Tensor | np.ndarray) else ref
    return None


def prepare_data(
    cfg: Config, store_path: str | Path, split_path: str | Path, device: torch.device
) -> TrainData:
    """Open the store and split, apply the training-only undersampling, build loaders and preprocessing.

    Raises:
        RunFolderError: store or split missing or mismatched.
        ConfigError: the model's class count does not match the split's targets.
    """
    from cmafnet.data.loader import BatchLoader
    from cmafnet.data.sampling import undersample_to_ratio
    from cmafnet.data.splits import load_split
    from cmafnet.data.store import PatchStore

    store = PatchStore.open(store_path)
    split = load_split(split_path, store)
    labels, classes = store.targets(split.label_kind)
    if cfg.model.num_classes != len(classes):
        raise ConfigError(
            f"model.num_classes: {cfg.model.num_classes}, but the split's '{split.label_kind}' targets have "
            f"{len(classes)} classes {classes}"
        )
    train_idx = np.asarray(split.train, np.int64)
    if cfg.data.imbalance is not None:
        try:
            train_idx = undersample_to_ratio(train_idx, labels, cfg.data.imbalance, cfg.train.seed)
        except ValueError as err:
            raise ConfigError(f"data.imbalance: {err}") from None
    for name, idx in (("train", train_idx), ("val", split.val)):
        if len(idx) == 0:
            raise RunFolderError(f"{split_path}: the {name} split is empty")
    # One copy of the uint8 images shared by both loaders: on the GPU when asked and it fits.
    images: Any = store.images
    resident = None
    if device.type == "cuda":
        fits = store.images.nbytes < 0.5 * torch.cuda.mem_get_info(device)[0]
        if cfg.data.device_cache and fits:
            images = torch.from_numpy(np.array(store.images)).to(device)  # one host copy, then on the GPU
        resident = bool(cfg.data.device_cache and fits)
    tc = cfg.train
    train_loader = BatchLoader(
        images, labels, train_idx, tc.batch_size, shuffle=True, seed=tc.seed, device=device, drop_last=True,
        resident=resident,
    )  # fmt: skip
    val_loader = BatchLoader(
        images, labels, split.val, tc.eval_batch_size, shuffle=False, device=device, resident=resident
    )

    def make_loader(
        indices: np.ndarray, bs: int, shuffle: bool, drop_last: bool, epoch: int, start: int
    ) -> Any:
        loader = train_loader if shuffle else val_loader
        loader.set_epoch(epoch, start)
        return loader

    pre_train = _preprocess(cfg.data, cfg.model.img_size, True, device)
    pre_eval = _preprocess(cfg.data, cfg.model.img_size, False, device, _stain_reference(pre_train))
    split_bytes = Path(split_path).read_bytes()
    meta = {
        "store_hash": store.store_hash,
        "split_hash": hashlib.sha256(split_bytes).hexdigest(),
        "split_bytes": split_bytes,
        "stain_reference": _stain_reference(pre_train),
        "dataset": store.dataset,
        "synthetic": bool(store.meta.get("synthetic", False)),
        "label_kind": split.label_kind,
    }
    return TrainData(
        make_loader, train_idx, np.asarray(split.val, np.int64), labels, classes, pre_train, pre_eval, meta
    )


def _config_without_device(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.strip().startswith("device:"))


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
        out_dir: the run folder (created; must not hold a run unless ``resume``).
        resume: continue from ``out_dir/checkpoints/last.pt`` exactly where it stopped.
        progress: tqdm progress bars (rank 0).
        stop_after_steps: save a checkpoint and stop after this many optimiser steps (status ``stopped``).
        callbacks: called after every step with the trainer; returning True saves and stops.
        device: overrides ``cfg.train.device`` (``auto | cpu | cuda | cuda:N``).

    Returns:
        A summary: status (finished | stopped | interrupted), best epoch and validation AUPRC, epochs,
        steps, skipped non-finite steps, effective batch size, last validation metrics.

    Raises:
        RunFolderError: ``out_dir`` already holds a run (without ``resume``) or has no checkpoint (with it).
        ConfigError: bad settings (for example a batch larger than the training split).
        CmafnetError: training diverged (too many consecutive non-finite steps).
    """
    if device is not None:
        cfg = cfg.model_copy(deep=True)
        cfg.train.device = device
    cfg = resolve_normalization(cfg)[0]  # data.mean/std from the weights, recorded in config.yaml
    out = Path(out_dir)
    ckpt = out / run.LAST_CHECKPOINT
    if resume and not ckpt.exists():
        raise RunFolderError(f"{out}: nothing to resume ({run.LAST_CHECKPOINT} missing)")
    if not resume and ((out / run.META_FILE).exists() or ckpt.exists()):
        raise RunFolderError(
            f"{out} already holds a run: pass --resume to continue it, or choose another --out"
        )
    info = distr.setup(cfg.train.device)
    tc = cfg.train
    if tc.amp == "fp16" and info.device.type == "cpu":
        log.warning("train.amp=fp16 on CPU: slow and rarely useful; bf16 or none are the CPU choices")
    try:
        with kernel_selection(tc.deterministic):
            seed_everything(tc.seed)
            data = prepare_data(cfg, store_path, split_path, info.device)
            from cmafnet.losses.objective import Objective
            from cmafnet.models import create_model

            model = create_model(cfg.model).to(info.device)
            if cfg.model.grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
                model.set_grad_checkpointing(True)
            if tc.channels_last:
                model = model.to(memory_format=torch.channels_last)
            objective_epochs = [s.epochs for s in tc.stages if s.loss == "objective"]
            objective = Objective(
                cfg.loss, cfg.regularizers, data.class_counts, num_heads=cfg.model.fusion.heads,
                total_epochs=float(objective_epochs[-1]) if objective_epochs else None,
            ).to(info.device)  # fmt: skip
            if info.rank:  # the same model on every rank (DDP broadcasts it anyway), own augmentation noise
                torch.manual_seed(tc.seed + 1_000_003 * info.rank)
            trainer = Trainer(
                cfg, model, objective, data, out, info=info, progress=progress, stop_after_steps=stop_after_steps,
                callbacks=callbacks or (),
            )  # fmt: skip
            log.info(
                "effective batch size %d (%d per rank x %d ranks), %d steps per epoch, device %s",
                tc.batch_size, trainer.local_batch, info.world, trainer.steps_per_epoch, info.device,
            )  # fmt: skip
            if resume:
                state = load_checkpoint(ckpt)
                if _config_without_device(state["config"]) != _config_without_device(dump_config(cfg)):
                    raise ConfigError(
                        f"--resume: the config differs from {out / run.CONFIG_FILE} (the run's config)"
                    )
                state["config"] = dump_config(cfg)
                trainer.load_state_dict(state)
                log.info("resuming %s at stage %d, epoch %d, step %d", out, trainer.p.stage, trainer.p.epoch,
                         trainer.p.step_in_epoch)  # fmt: skip
            elif info.is_main:
                _start_run_folder(out, cfg, data, info, trainer)
            distr.barrier(info)
            return trainer.run()
    finally:
        distr.teardown(info)


def _start_run_folder(
    out: Path, cfg: Config, data: TrainData, info: distr.DistInfo, trainer: Trainer
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    run.atomic_write_bytes(out / run.CONFIG_FILE, dump_config(cfg).encode())
    run.atomic_write_bytes(out / run.SPLIT_FILE, data.meta["split_bytes"])
    run.write_json(
        out / run.META_FILE,
        {
            "status": "running",
            "package_version": __version__,
            "model": cfg.model.name,
            "classes": data.classes,
            "num_classes": len(data.classes),
            "label_kind": data.meta.get("label_kind"),
            "img_size": cfg.model.img_size,
            "class_counts": dict(zip(data.classes, data.class_counts, strict=True)),
            "n_train": len(data.train_idx),
            "n_val": len(data.val_idx),
            "imbalance": cfg.data.imbalance,
            "store_hash": data.meta.get("store_hash"),
            "split_hash": data.meta.get("split_hash"),
            "dataset": data.meta.get("dataset"),
            "synthetic": data.meta.get("synthetic", False),
            "stain_reference": data.meta.get("stain_reference"),
            "effective_batch_size": cfg.train.batch_size,
            "world_size": info.world,
            "steps_per_epoch": trainer.steps_per_epoch,
            "best_epoch": None,
            "best_metric": None,
            "best_metric_name": "val_auprc",
        },
    )
