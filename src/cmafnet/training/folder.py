"""The run folder of a training run: start it, or check and resume the one that is there.

A folder with a checkpoint holds a run (``--resume`` continues it exactly); a folder without one (a run
that stopped before its first checkpoint) starts over, so a run folder is never a dead end.
"""

from __future__ import annotations

import logging
from pathlib import Path

from cmafnet import __version__
from cmafnet import run as runfolder
from cmafnet.config import Config, config_from_dict, dump_config, yaml_load
from cmafnet.devices import device_name
from cmafnet.errors import ConfigError, RunFolderError
from cmafnet.training import distributed as distr
from cmafnet.training.checkpoint import load_checkpoint, restore_run
from cmafnet.training.progress import TrainData, TrainRun

log = logging.getLogger(__name__)


def _config_without_device(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.strip().startswith("device:"))


def _same_config(stored: str, cfg: Config) -> bool:
    """Whether a checkpoint's config is ``cfg`` (the device aside). The stored text is validated again
    first, so a key added to the schema since the run started (with its default) is no difference."""
    try:
        again = dump_config(config_from_dict(yaml_load(stored)))
    except ConfigError:
        return False
    return _config_without_device(again) == _config_without_device(dump_config(cfg))


def check_run_folder(out: Path, resume: bool) -> bool:
    """Whether to resume: a folder without a checkpoint (a run stopped before its first one) starts
    over, with or without ``--resume``; one with a checkpoint needs ``--resume``."""
    ckpt = out / runfolder.LAST_CHECKPOINT
    if ckpt.exists():
        if not resume:
            raise RunFolderError(
                f"{out} already holds a run: pass --resume to continue it, or choose another --out"
            )
        return True
    if (out / runfolder.META_FILE).exists() or resume:
        log.warning("%s has no checkpoint yet (the run stopped before its first one): starting from the beginning",
                    out)  # fmt: skip
    return False


def resume_run(tr: TrainRun, out: Path, cfg: Config) -> None:
    state = load_checkpoint(out / runfolder.LAST_CHECKPOINT)
    if not _same_config(state["config"], cfg):
        raise ConfigError(
            f"--resume: the config differs from {out / runfolder.CONFIG_FILE} (the run's config)"
        )
    restore_run(tr, state)
    log.info("resuming %s at stage %d, epoch %d, step %d", out, tr.p.stage, tr.p.epoch, tr.p.step_in_epoch)


def start_run_folder(
    out: Path, cfg: Config, data: TrainData, info: distr.DistInfo, tr: TrainRun, budget: dict | None
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    runfolder.atomic_write_bytes(out / runfolder.CONFIG_FILE, dump_config(cfg).encode())
    runfolder.atomic_write_bytes(out / runfolder.SPLIT_FILE, data.meta["split_bytes"])
    runfolder.write_meta(
        out,
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
            "reinhard_reference": data.meta.get("reinhard_reference"),
            **{k: data.meta.get(k) for k in ("patch_mpp", "patch_hw", "patch_px", "patch_scale_source")},
            "effective_batch_size": cfg.train.batch_size,
            "accumulate_steps": cfg.train.accumulate_steps,
            "micro_batch_size": cfg.train.batch_size // info.world // cfg.train.accumulate_steps,
            "world_size": info.world,
            "device": device_name(info.device),
            "steps_per_epoch": tr.steps_per_epoch,
            "budget": budget,  # train.budget as resolved (None: the stages' epochs)
            "best_epoch": None,
            "best_metric": None,
            "best_metric_name": "val_auprc",
        },
    )
