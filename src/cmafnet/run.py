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
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmafnet.errors import RunFolderError

CONFIG_FILE = "config.yaml"
SPLIT_FILE = "split.json"
META_FILE = "run.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "checkpoints/last.pt"
METRICS_FILE = "metrics.csv"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temporary file in the same folder, fsync, then rename (never a torn file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are meant to be shared like any file
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def read_meta(run_dir: str | Path) -> dict:
    p = Path(run_dir) / META_FILE
    if not p.exists():
        raise RunFolderError(f"{run_dir}: not a run folder ({META_FILE} missing)")
    return json.loads(p.read_text())


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


def save_weights(model: Any, path: str | Path) -> None:
    """Save a state dict as safetensors, atomically."""
    from safetensors.torch import save

    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(sd))


def load_state_dict_file(path: str | Path) -> dict:
    """Load weights from safetensors, or a torch file with ``weights_only=True`` (no pickled code)."""
    import torch

    path = Path(path)
    if not path.exists():
        raise RunFolderError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError for files holding code
        raise RunFolderError(f"{path}: refused to load (not a plain weights file: {err})") from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    return obj


def load_run(run_dir: str | Path, device: str = "cpu") -> LoadedRun:
    """Rebuild the model of a finished (or running) run with its best weights."""
    from cmafnet.config import load_config
    from cmafnet.models import create_model
    from cmafnet.models.weights import without_init_weights

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
    cfg = load_config(cfg_path)
    model = create_model(without_init_weights(cfg.model))  # the run's own weights replace them
    missing, unexpected = model.load_state_dict(load_state_dict_file(wpath), strict=False)
    if missing or unexpected:
        raise RunFolderError(
            f"{wpath}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.to(device).eval()
    return LoadedRun(model=model, config=cfg, meta=meta, path=run_dir)
