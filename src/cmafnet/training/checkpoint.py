"""Training checkpoints: one ``torch.save`` into bytes, written atomically, loaded with
``weights_only=True`` so a checkpoint can never execute code.

Everything that must survive a restart is stored as tensors or plain Python types: model, optimiser,
schedule position, GradScaler, objective, all RNG states (python, numpy, torch CPU, every CUDA
device), stage / epoch / step-in-epoch / global step, resolved config, split hash, package version,
AutoClip history, early-stopping and best-model state, and the metrics rows written so far.
"""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmafnet.errors import RunFolderError
from cmafnet.run import atomic_write_bytes

FORMAT_VERSION = 1


def rng_state() -> dict:
    """Every RNG the run draws from, as tensors and plain types (``weights_only``-loadable)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)  # ('MT19937', uint32[624], pos, has_gauss, gauss)
    state = {
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            npst["key"].numpy().astype(np.uint32),
            npst["pos"],
            npst["has_gauss"],
            npst["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Serialise ``state`` in memory, then write it atomically (tmp file, fsync, rename)."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT_VERSION, **state}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`; files holding pickled code are refused.

    Raises:
        RunFolderError: missing file, a file that is not a plain-data checkpoint, or a wrong format.
    """
    path = Path(path)
    if not path.is_file():
        raise RunFolderError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # pickle.UnpicklingError for code, RuntimeError for torn files
        raise RunFolderError(f"{path}: refused to load checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise RunFolderError(f"{path}: not a cmafnet training checkpoint (format {FORMAT_VERSION} expected)")
    return state
