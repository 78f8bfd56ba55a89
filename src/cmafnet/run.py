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
import pickle
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmafnet.errors import ConfigError, RunFolderError

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
    try:
        meta = json.loads(p.read_text())
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RunFolderError(f"{p}: not readable JSON ({str(err).splitlines()[0][:120]})") from None
    if not isinstance(meta, dict):
        raise RunFolderError(f"{p}: not a JSON object")
    return meta


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


def load_plain_torch_file(path: str | Path, map_location: Any = "cpu", what: str = "file") -> Any:
    """``torch.load(weights_only=True)`` with one-line :class:`RunFolderError` refusals.

    A file holding pickled objects other than tensors and plain containers is refused, naming the
    global it would have imported; torch's own text (which advises ``weights_only=False``) is not
    relayed. A truncated or foreign file is "not a readable <what>".
    """
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"(?:Unsupported global: |unsupported )GLOBAL (\S+)", str(err))
        held = f" ({found.group(1)})" if found else ""
        raise RunFolderError(
            f"{path}: refused to load: it holds pickled Python objects{held}, which could run code; "
            "only plain tensors are loaded (convert it to safetensors)"
        ) from None
    except Exception as err:  # a truncated or foreign file
        first = (str(err).splitlines() or [type(err).__name__])[0].split(". ")[0][:120]
        raise RunFolderError(f"{path}: not a readable {what} ({first})") from None


def load_state_dict_file(path: str | Path) -> dict:
    """Load weights from safetensors, or a torch file with ``weights_only=True`` (no pickled code)."""
    path = Path(path)
    if not path.exists():
        raise RunFolderError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            detail = str(err).splitlines()[0].removeprefix("Error while deserializing header: ")[:120]
            raise RunFolderError(f"{path}: corrupt or truncated safetensors file ({detail})") from None
    obj = load_plain_torch_file(path, what="weights file")
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    return obj


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
    model = create_model(cfg.model)
    missing, unexpected = model.load_state_dict(load_state_dict_file(wpath), strict=False)
    if missing or unexpected:
        raise RunFolderError(
            f"{wpath}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.to(device).eval()
    return LoadedRun(model=model, config=cfg, meta=meta, path=run_dir)
