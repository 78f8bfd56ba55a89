"""The run folder contract, shared by training, evaluation, inference and experiments.

A run folder holds::

    config.yaml           the fully resolved config
    split.json            copy of the split used (patient lists, indices, store hash)
    run.json              metadata: classes, img_size, package version, store/split hashes,
                          stain reference, operating threshold, best epoch, status
    model.safetensors     best weights (by validation AUPRC)
    checkpoints/last.pt   full training state for --resume (weights_only loadable)
    metrics.csv           one row per epoch: losses, validation metrics, lr, monitors
    predictions_<split>.csv, metrics_<split>.json   written by ``cmafnet evaluate``
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmafnet.errors import ConfigError, RunFolderError
from cmafnet.files import atomic_write_bytes, load_plain_torch_file, write_json
from cmafnet.models.weights import load_state_dict_file, save_weights, without_init_weights

CONFIG_FILE = "config.yaml"
SPLIT_FILE = "split.json"
META_FILE = "run.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "checkpoints/last.pt"
METRICS_FILE = "metrics.csv"

# The file-level helpers a run folder is written with live lower down (models and data use them
# too); they are part of this module's interface.
__all__ = [
    "CHECKPOINT_DIR", "CONFIG_FILE", "LAST_CHECKPOINT", "META_FILE", "METRICS_FILE", "SPLIT_FILE",
    "WEIGHTS_FILE", "LoadedRun", "atomic_write_bytes", "cost_total", "load_plain_torch_file", "load_run",
    "load_state_dict_file", "read_meta", "save_weights", "update_meta", "write_json",
]  # fmt: skip


def read_meta(run_dir: str | Path) -> dict:
    p = Path(run_dir) / META_FILE
    if not p.exists():
        raise RunFolderError(f"{run_dir}: not a run folder ({META_FILE} missing)")
    try:
        meta = json.loads(p.read_text())
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RunFolderError(f"{p}: not readable JSON ({str(err).splitlines()[0][:120]})") from None
    if not isinstance(meta, dict):
        raise RunFolderError(f"{p}: not a JSON object")
    return meta


def cost_total(meta: dict) -> dict | None:
    """The training cost a run records in run.json (``cost.total``: images, steps, passes, MACs,
    seconds), or None for a run that has not recorded one."""
    return (meta.get("cost") or {}).get("total")


def update_meta(run_dir: str | Path, **fields: Any) -> dict:
    p = Path(run_dir) / META_FILE
    meta = json.loads(p.read_text()) if p.exists() else {}
    meta.update(fields)
    write_json(p, meta)
    return meta


@dataclass
class LoadedRun:
    model: Any  # nn.Module in eval mode on the requested device
    config: Any  # cmafnet.config.Config
    meta: dict
    path: Path


def load_run(run_dir: str | Path, device: str = "cpu") -> LoadedRun:
    """Rebuild the model of a finished (or running) run with its best weights."""
    from cmafnet.config import load_config
    from cmafnet.models import create_model

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir}: run folder not found")
    meta = read_meta(run_dir)
    cfg_path = run_dir / CONFIG_FILE
    if not cfg_path.exists():
        raise RunFolderError(f"{run_dir}: {CONFIG_FILE} missing")
    wpath = run_dir / WEIGHTS_FILE
    if not wpath.exists():
        raise RunFolderError(f"{run_dir}: no model ({WEIGHTS_FILE} missing; did training finish an epoch?)")
    try:
        cfg = load_config(cfg_path)
    except ConfigError as err:  # a damaged run folder, not a bad argument
        msg = str(err)
        raise RunFolderError(msg if msg.startswith(str(cfg_path)) else f"{cfg_path}: {msg}") from None
    model = create_model(without_init_weights(cfg.model))  # the run's own weights replace them
    missing, unexpected = model.load_state_dict(load_state_dict_file(wpath), strict=False)
    if missing or unexpected:
        raise RunFolderError(
            f"{wpath}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.to(device).eval()
    return LoadedRun(model=model, config=cfg, meta=meta, path=run_dir)
