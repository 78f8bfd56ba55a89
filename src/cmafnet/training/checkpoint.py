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
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cmafnet import __version__
from cmafnet.config import dump_config
from cmafnet.errors import RunFolderError
from cmafnet.files import atomic_write_bytes, load_plain_torch_file
from cmafnet.run import LAST_CHECKPOINT
from cmafnet.training import distributed as distr
from cmafnet.training.graphs import plain_optimizer_state
from cmafnet.training.progress import Progress

if TYPE_CHECKING:
    from cmafnet.training.progress import TrainRun
    from cmafnet.training.stages import StageStep

FORMAT_VERSION = 1


def rng_state() -> dict:
    """Every RNG the run draws from, as tensors and plain types (``weights_only``-loadable)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)  # ('MT19937', uint32[624], pos, has_gauss, gauss)
    return {
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


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npst = state["numpy"]
    key = npst["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, npst["pos"], npst["has_gauss"], npst["cached_gaussian"]))
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
    state = load_plain_torch_file(path, map_location=map_location, what="training checkpoint")
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise RunFolderError(f"{path}: not a cmafnet training checkpoint (format {FORMAT_VERSION} expected)")
    return state


def run_state(run: TrainRun, st: StageStep | None) -> dict[str, Any]:
    """The full resumable state of ``run`` inside stage step ``st`` (plain types and tensors only)."""
    p = run.p
    mid_stage = st is not None and (p.epoch > 0 or p.step_in_epoch > 0)
    return {
        "model": run.model.state_dict(),
        "objective": run.objective.state_dict(),
        "optimizer": plain_optimizer_state(st.optimizer.state_dict()) if mid_stage else None,
        "clip": st.step.clip_state() if mid_stage else None,
        "scaler": run.scaler.state_dict() if run.scaler is not None else None,
        "schedule": {"stage": p.stage, "epoch": p.epoch, "step_in_epoch": p.step_in_epoch},
        "rng": rng_state(),
        "progress": asdict(p),
        "rows": run.rows,
        "config": dump_config(run.cfg),
        "split_hash": run.data.meta.get("split_hash"),
        "store_hash": run.data.meta.get("store_hash"),
        "version": __version__,
        "world_size": run.info.world,
    }


def save_run(run: TrainRun, st: StageStep | None) -> None:
    """Write ``checkpoints/last.pt`` (rank 0) and wait for every rank."""
    if run.info.is_main:
        save_checkpoint(run.out / LAST_CHECKPOINT, run_state(run, st))
    run.last_save_step, run.last_save_time = run.p.global_step, time.monotonic()
    distr.barrier(run.info)


def restore_run(run: TrainRun, state: dict) -> None:
    """Load a checkpoint into ``run`` before it starts; the stage-specific parts (optimiser, clipping
    history, RNG) load when the stage is entered (:func:`restore_stage`)."""
    for key in ("split_hash", "store_hash"):
        if state.get(key) != run.data.meta.get(key):
            raise RunFolderError(f"--resume: {key} differs from the checkpoint's (another split or store?)")
    run.model.load_state_dict(state["model"])
    run.objective.load_state_dict(state["objective"])
    if run.scaler is not None and state["scaler"] is not None:
        run.scaler.load_state_dict(state["scaler"])
    run.p = Progress(**state["progress"])
    run.rows = list(state["rows"])
    run.last_save_step = run.p.global_step
    run.resume_state = state


def restore_stage(run: TrainRun, st: StageStep, state: dict) -> None:
    if state["optimizer"] is not None:
        st.optimizer.load_state_dict(state["optimizer"])
        if st.graph is not None:
            st.graph.prepare_optimizer()  # tensor learning rate, capturable again
    if state["clip"] is not None:
        st.step.load_clip_state(state["clip"])
    set_rng_state(state["rng"])  # last: nothing after this may draw random numbers before the step
    if run.info.rank:  # only rank 0's RNG is saved: ranks > 0 reseed deterministically
        torch.manual_seed(run.tc.seed + 1_000_003 * run.info.rank + run.p.global_step)
