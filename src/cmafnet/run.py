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
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cmafnet.data.scale import MPP_RANGE
from cmafnet.errors import ConfigError, RunFolderError
from cmafnet.files import atomic_write_bytes, load_plain_torch_file, write_json
from cmafnet.models.weights import load_state_dict_file, load_strict, save_weights, without_init_weights

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
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "LAST_CHECKPOINT",
    "META_FILE",
    "METRICS_FILE",
    "SPLIT_FILE",
    "WEIGHTS_FILE",
    "LoadedRun",
    "RunRecord",
    "atomic_write_bytes",
    "cost_total",
    "load_plain_torch_file",
    "load_run",
    "load_state_dict_file",
    "read_meta",
    "save_weights",
    "update_meta",
    "write_json",
    "write_meta",
]  # fmt: skip


SCHEMA_VERSION = 1
# A temperature (and the threshold chosen at it) outside the fit's search range was not fitted here:
# a hand edit or damage (1e-300 would turn every logit into a 0/1 probability).
TEMPERATURE_RANGE = (0.05, 20.0)
# Under this many validation patients a fitted temperature is stored but not applied by default:
# on 9 unseen IDC patients one fitted on a 2-patient split raised ECE from 0.125 to 0.214 (CMAF-Net)
# and from 0.037 to 0.166 (ResNet-18) (docs/decisions.md).
MIN_CALIBRATION_PATIENTS = 10

_Count = Annotated[int, Field(ge=0)]
_Positive = Annotated[int, Field(ge=1)]
_Amount = Annotated[float, Field(ge=0)]
_Temperature = Annotated[float, Field(ge=TEMPERATURE_RANGE[0], le=TEMPERATURE_RANGE[1])]
_Probability = Annotated[float, Field(ge=0, le=1)]


class _Section(BaseModel):
    # strict: a string is not a number; no NaN or inf anywhere; an unknown key is an error, not ignored
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StageCost(_Section):
    steps: _Count
    images: _Count
    passes: _Count
    macs: _Amount
    seconds: _Amount


class Extraction(_Section):
    """A probe's embedding pass (``training.probe_data``), included in the total."""

    images: _Count
    macs_per_image: _Amount
    macs: _Amount
    seconds: _Amount
    reused: bool  # read from the feature cache (its first extraction is counted all the same)
    extracted_images: _Count
    cache: str
    key: str
    convention: str


class Cost(_Section):
    stages: dict[str, StageCost]
    total: StageCost
    macs_per_image: _Amount
    device: str
    convention: str
    extraction: Extraction | None = None


class Throughput(_Section):
    img_s: _Amount | None
    step_ms: _Amount | None
    images: _Count
    seconds: _Amount
    steps: _Count


class Calibration(_Section):
    """How ``temperature`` was fitted (``inference.temperature.fit_temperature``)."""

    method: str
    n: _Positive
    n_patients: _Count | None = None  # None: the split names no patients
    nll_before: float
    nll_after: float
    bounds: list[float]
    converged: bool
    at_bound: bool
    fitted_on: str


class MappedThreshold(_Section):
    value: _Probability
    temperature: _Temperature


class ThresholdInfo(_Section):
    value: _Probability
    target_sensitivity: _Probability
    chosen_on: str
    n_val: _Positive
    temperature: _Temperature  # the temperature the threshold was chosen at
    val_sensitivity: _Probability
    val_specificity: _Probability | None
    mapped_from: MappedThreshold | None = None


class RunRecord(_Section):
    """``run.json``: what a run is, what it cost and what evaluation derived from it.

    Training writes the first four groups, ``cmafnet evaluate`` on the run's own split the last; every
    reader goes through :func:`read_meta`, so a damaged or hand-edited value is one line naming the
    file and the field (exit 4), never a silent default.
    """

    schema_version: Literal[1]
    status: Literal["running", "finished", "stopped", "interrupted", "failed"] | None = None
    package_version: str | None = None
    # data
    dataset: str | None = None
    classes: list[str] | None = Field(None, min_length=2)
    num_classes: Annotated[int, Field(ge=2)] | None = None
    label_kind: str | None = None
    class_counts: dict[str, _Count] | None = None
    n_train: _Count | None = None
    n_val: _Count | None = None
    imbalance: str | None = None
    store_hash: str | None = None
    split_hash: str | None = None
    synthetic: bool = False
    # model and input
    model: str | None = None
    img_size: Annotated[int, Field(ge=8, le=4096)] | None = None
    stain_reference: dict[str, Any] | None = None  # validated by cmafnet.data.stain when read
    reinhard_reference: dict[str, Any] | None = None  # cmafnet.data.reinhard, validated when read
    # physical scale of the training patches
    patch_mpp: Annotated[float, Field(ge=MPP_RANGE[0], le=MPP_RANGE[1])] | None = None
    patch_hw: Annotated[list[_Positive], Field(min_length=2, max_length=2)] | None = None
    patch_px: _Positive | None = None
    patch_scale_source: str | None = None
    # training
    effective_batch_size: _Positive | None = None
    accumulate_steps: _Positive | None = None
    micro_batch_size: _Positive | None = None
    world_size: _Positive | None = None
    device: str | None = None
    steps_per_epoch: _Count | None = None
    budget: dict[str, Any] | None = None  # train.budget as resolved (training.budget)
    best_epoch: _Count | None = None
    best_metric: float | None = None
    best_metric_name: str | None = None
    global_step: _Count | None = None
    epochs_done: _Count | None = None
    nonfinite_steps: _Count | None = None
    stage_throughput: dict[str, Throughput] | None = None
    cost: Cost | None = None
    # derived by evaluation on the run's validation split
    temperature: _Temperature | None = None
    calibration: Calibration | None = None
    threshold: Annotated[float, Field(gt=0, lt=1)] | None = None
    threshold_info: ThresholdInfo | None = None


def _record(doc: Any, path: Path) -> dict:
    """``doc`` validated as a :class:`RunRecord`, as the dict of the keys it has."""
    if not isinstance(doc, dict):
        raise RunFolderError(f"{path}: not a JSON object")
    if "schema_version" not in doc:  # no compatibility branches: such a run is trained again
        raise RunFolderError(
            f"{path}: written by an earlier cmafnet version (no schema_version): train the run again"
        )
    try:
        return RunRecord.model_validate(doc).model_dump(exclude_unset=True)
    except ValidationError as err:
        e = err.errors()[0]
        where = ".".join(str(x) for x in e["loc"]) or "(top level)"
        got = "" if e["type"] == "missing" else f" (got {json.dumps(e.get('input'), default=str)[:60]})"
        more = f"; {len(err.errors()) - 1} more" if len(err.errors()) > 1 else ""
        raise RunFolderError(f"{path}: {where}: {e['msg']}{got}{more}") from None


def read_meta(run_dir: str | Path) -> dict:
    """The run's validated :class:`RunRecord` (as a dict of the keys ``run.json`` has)."""
    p = Path(run_dir) / META_FILE
    if not p.exists():
        raise RunFolderError(f"{run_dir}: not a run folder ({META_FILE} missing)")
    try:
        doc = json.loads(p.read_text())
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RunFolderError(f"{p}: not readable JSON ({str(err).splitlines()[0][:120]})") from None
    return _record(doc, p)


def cost_total(meta: dict) -> dict | None:
    """The training cost a run records in run.json (``cost.total``: images, steps, passes, MACs,
    seconds), or None for a run that has not recorded one."""
    return (meta.get("cost") or {}).get("total")


def write_meta(run_dir: str | Path, fields: dict[str, Any]) -> dict:
    """A new ``run.json`` holding ``fields`` (validated: a writer's bug fails here, not in a reader)."""
    p = Path(run_dir) / META_FILE
    meta = _record({"schema_version": SCHEMA_VERSION, **fields}, p)
    write_json(p, meta)
    return meta


def update_meta(run_dir: str | Path, **fields: Any) -> dict:
    """``run.json`` with ``fields`` replaced (validated before it is written)."""
    old = read_meta(run_dir) if (Path(run_dir) / META_FILE).exists() else {}
    return write_meta(run_dir, {**old, **fields})


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
    load_strict(
        model, load_state_dict_file(wpath), f"{wpath}: weights do not match the config", RunFolderError
    )
    model.to(device).eval()
    return LoadedRun(model=model, config=cfg, meta=meta, path=run_dir)
