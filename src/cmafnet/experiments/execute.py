"""The default work behind one run: train (``cmafnet.training.fit``), evaluate, profile.

Kept apart from the runner so tests can substitute fakes for the expensive parts.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from cmafnet.config import load_config
from cmafnet.errors import ConfigError, InputDataError, RunFolderError
from cmafnet.experiments.paper_tables import ZERO_SHOT_ADAPTATIONS
from cmafnet.experiments.spec import RunSpec
from cmafnet.inference.adapt import Adaptation
from cmafnet.inference.predict import PredictOptions
from cmafnet.run import METRICS_FILE

log = logging.getLogger(__name__)


def check_inputs(table: str, ctx: Any, *, need_training: bool) -> None:
    """Fail early, with the flag to pass, when a table's data is missing."""
    from cmafnet.experiments.paper_tables import get_table

    t = get_table(table)
    if not need_training:
        return
    if t.dataset == "idc" and ctx.store is None:
        raise InputDataError(f"{table} trains on IDC: pass --store (a store from 'cmafnet ingest')")
    if (t.dataset == "breakhis" or t.evaluation == "zeroshot") and ctx.breakhis_store is None:
        raise InputDataError(f"{table} needs the BreakHis store: pass --breakhis-store")
    if t.evaluation == "zeroshot" and ctx.store is None:
        raise InputDataError(f"{table} trains on IDC before the zero-shot test: pass --store")
    for p in (ctx.store, ctx.breakhis_store):
        if p is not None and not Path(p).exists():
            raise InputDataError(f"store not found: {p}")


def ensure_split(ctx: Any, dataset: str) -> Path:
    """The split file for a dataset: the one given, else one made once under ``--out`` (seed 0, 70/10/20).

    BreakHis (Tables 4-5) is split by patient stratified on the subtype, and the split records
    ``label_kind='subtype'`` so training uses the 8 subtypes as targets.
    """
    from cmafnet.data.splits import save_split, split_store
    from cmafnet.data.store import PatchStore

    given = ctx.split if dataset == "idc" else ctx.breakhis_split
    if given is not None:
        return Path(given)
    store_path = ctx.store if dataset == "idc" else ctx.breakhis_store
    path = Path(ctx.out) / f"split_{dataset}.json"
    if not path.exists():
        store = PatchStore.open(store_path)
        kind = "label" if dataset == "idc" else "subtype"
        save_split(split_store(store, seed=0, label_kind=kind), path)
    return path


def train_run(spec: RunSpec, run_dir: Path, ctx: Any, resume: bool) -> None:
    """Train (or resume) one run with the project's trainer (a compute-matched run with its budget)."""
    from cmafnet.experiments.runner import training_config
    from cmafnet.training import fit

    device = (f"train.device={ctx.device}",) if ctx.device != "auto" else ()
    cfg = training_config(spec, ctx.out, device)
    store = ctx.store if spec.dataset == "idc" else ctx.breakhis_store
    fit(cfg, store, ensure_split(ctx, spec.dataset), run_dir, resume=resume)


def _params_m(run_dir: Path) -> float | None:
    from cmafnet.models import create_model

    cfg = load_config(run_dir / "config.yaml")
    model = create_model(cfg.model)
    return sum(p.numel() for p in model.parameters()) / 1e6


def _by_mag(doc: dict) -> dict[str, Any]:
    """An evaluation's metrics per magnification, keyed as the paper's columns ('40', 40 -> '40X')."""
    return {
        str(k).strip().upper().rstrip("X") + "X": v["metrics"]
        for k, v in doc.get("by_magnification", {}).items()
    }


def evaluate_spec(spec: RunSpec, run_dir: Path, ctx: Any) -> dict:
    """Evaluate a finished run the way its table needs; returns the result document."""
    from cmafnet.evaluation import evaluate_run

    out: dict[str, Any] = {"convergence": convergence(run_dir)}
    if spec.evaluation == "zeroshot":
        out.update(_zero_shot(run_dir, ctx, Adaptation()))
        out["trivial"] = {
            name: {"metrics": t, "by_magnification": {m: {"sensitivity": t["sensitivity"]} for m in out["by_magnification"]},
                   "diagnosis": {"verdict": "trivial"}}
            for name, t in out.pop("trivial_rows").items()
        }  # fmt: skip
        out["adapted"] = {a.label(): _adapted(run_dir, ctx, a) for a in ADAPTATIONS}
        return out
    doc = evaluate_run(  # test: IDC; subtype: BreakHis (Tables 4-5)
        run_dir,
        ctx.store if spec.dataset == "idc" else ctx.breakhis_store,
        split_path=ensure_split(ctx, spec.dataset),
        split="test",
        bootstrap=0,  # CIs per run are not needed for mean ± std over seeds (cmafnet evaluate has them)
        options=PredictOptions(device=ctx.device, batch_size=256),
    )
    out["metrics"] = doc["metrics"]
    if spec.evaluation == "test":
        out["params_m"] = _params_m(run_dir)
    else:
        out["classes"] = doc["classes"]
        out["by_magnification"] = _by_mag(doc)
    return out


# Table 3's adaptations, in ZERO_SHOT_ADAPTATIONS' order (their labels)
ADAPTATIONS = (Adaptation(stain="macenko"), Adaptation(stain="reinhard"), Adaptation(tta="d4"),
               Adaptation(adabn="on"), Adaptation(adabn="balanced"), Adaptation(site_patients=4))  # fmt: skip
assert tuple(a.label() for a in ADAPTATIONS) == ZERO_SHOT_ADAPTATIONS


def _zero_shot(run_dir: Path, ctx: Any, adapt: Adaptation) -> dict[str, Any]:
    """One zero-shot evaluation's metrics, per magnification, and its diagnosis (200 patient-level
    resamples: the verdict needs the AUROC's interval)."""
    from cmafnet.evaluation import evaluate_run

    doc = evaluate_run(run_dir, ctx.breakhis_store, zero_shot=True, bootstrap=200, scale_match=False,
                       options=PredictOptions(device=ctx.device, adapt=adapt, batch_size=256))  # fmt: skip
    d = doc["diagnosis"]
    keep = ("verdict", "prevalence", "n_patients", "metrics", "by_subtype")
    return {"metrics": doc["metrics"], "by_magnification": _by_mag(doc), "diagnosis": {k: d[k] for k in keep},
            "trivial_rows": d["trivial"]}  # fmt: skip


def _adapted(run_dir: Path, ctx: Any, adapt: Adaptation) -> dict[str, Any]:
    """An adaptation that cannot run on this target (e.g. site calibration with too few patients) is its
    line's reason, not the run's failure."""
    try:
        doc = _zero_shot(run_dir, ctx, adapt)
        del doc["trivial_rows"]  # the raw evaluation's, on the same images
        return doc
    except ConfigError as err:
        log.warning("%s: %s: %s", run_dir.name, adapt.label(), err)
        return {"error": str(err)}


_VAL_BACC = ("val_balanced_accuracy", "val/balanced_accuracy", "val_bacc", "balanced_accuracy")


def convergence(run_dir: Path, fraction: float = 0.9, last: int = 10) -> dict[str, Any]:
    """Convergence epoch (paper §6.8) and curve stability from ``metrics.csv``.

    Convergence epoch: the first epoch (1-based, counted over all stages) whose validation balanced
    accuracy reaches ``fraction`` of the final epoch's. Stability: std (percentage points) of the
    validation balanced accuracy over the last ``last`` epochs.
    """
    path = run_dir / METRICS_FILE
    rows = list(csv.DictReader(path.read_text().splitlines())) if path.exists() else []
    if not rows:
        return {"epoch": None, "stability": None, "note": f"{METRICS_FILE} missing or empty"}
    col = next((h for h in _VAL_BACC if h in rows[0]), None) or next(
        (h for h in rows[0] if "val" in h and "balanced" in h), None
    )
    if col is None:
        return {"epoch": None, "stability": None, "note": "no validation balanced-accuracy column"}
    import pandas as pd

    # unparsable cells become NaN, which convergence_from_curve drops
    vals = pd.to_numeric(pd.Series([r[col] for r in rows], dtype=object), errors="coerce").tolist()
    return convergence_from_curve(vals, fraction, last) | {"column": col}


def convergence_from_curve(vals: list[float], fraction: float = 0.9, last: int = 10) -> dict[str, Any]:
    """See :func:`convergence`; ``vals`` is the per-epoch validation balanced accuracy (fraction)."""
    import numpy as np

    v = np.asarray([x for x in vals if np.isfinite(x)], dtype=float)
    if v.size == 0:
        return {"epoch": None, "stability": None, "note": "no finite values"}
    target = fraction * v[-1]
    epoch = int(np.argmax(v >= target)) + 1  # v[-1] >= target, so argmax finds a hit
    tail = v[-last:]
    return {
        "epoch": epoch,
        "stability": float(np.std(tail, ddof=1) * 100) if tail.size > 1 else 0.0,
        "epochs": int(v.size),
    }


def profile_spec(spec: RunSpec, run_dir: Path, ctx: Any) -> dict:
    """Table 8 for one model: params, forward GMACs, peak training memory, throughput, batch-1 latency.

    Uses the benchmark (``cmafnet.bench``, the trainer's own step) at the config's image size; the
    paper's "FLOPs (G)" are reported as MACs (FLOPs / 2), see docs/decisions/experiments.md.
    """
    from cmafnet.bench import ModelBench, Timing, bench_model, trainer_parts
    from cmafnet.devices import device_name, resolve_device

    cfg = load_config(spec.base, list(spec.overrides))
    device = resolve_device(ctx.device)
    smoke = ctx.scale == "smoke"
    timing = Timing(
        device=device,
        steps=2 if smoke else 20,
        warmup=1 if smoke else 5,
        amp=cfg.train.amp if device.type == "cuda" else "none",
        latency_steps=3 if smoke else 50,
    )
    batch = 4 if smoke else cfg.train.batch_size
    parts = trainer_parts(cfg, device, cfg.model.img_size)
    rec = bench_model(
        ModelBench(
            name=spec.row,
            build=parts["build"],
            trainer=parts["trainer"],
            channels_last=device.type == "cuda",
            # the recipe's own optimiser step through the trainer: CMAF-Net trains with SAM (two passes)
            sam=cfg.train.sam.enabled,
            fused_adamw=cfg.train.fused_adamw,
        ),
        timing,
        size=cfg.model.img_size,
        batch=batch,
        infer_batch=batch if smoke else cfg.train.eval_batch_size,
        num_classes=cfg.model.num_classes,
    )
    if "build" in rec.get("errors", {}):
        raise RunFolderError(f"{spec.run_id}: model build failed: {rec['errors']['build']}")
    return {
        "spec": spec.to_dict(),
        "device": device_name(device),
        "img_size": cfg.model.img_size,
        "batch": batch,
        "bench": rec,
    }
