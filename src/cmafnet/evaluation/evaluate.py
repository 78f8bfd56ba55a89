"""Evaluate a run folder on a packed store: per-image predictions, metrics, operating threshold.

``evaluate_run`` writes into the run folder (or ``out_dir``)::

    predictions_<name>.csv   id, patient, label, label_name, prob_<class>..., pred, source, magnification
    metrics_<name>.json      metrics at 0.5 and at the operating threshold, per magnification, CIs

``<name>`` is the split (``test``, ``val``, ``train``, ``all``), prefixed ``zeroshot_`` for a
zero-shot evaluation. The operating threshold (binary runs) is chosen on the run's validation
predictions for ``cfg.eval.target_sensitivity`` and stored in ``run.json`` as ``threshold`` (a
float, read by ``cmafnet predict``) with the details under ``threshold_info``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cmafnet.devices import resolve_device
from cmafnet.errors import ConfigError, RunFolderError
from cmafnet.evaluation.operating import choose_temperature, operating_threshold
from cmafnet.evaluation.transfer import adapt_to_target, site_calibration, zero_shot_diagnosis
from cmafnet.inference.adapt import Adaptation
from cmafnet.inference.temperature import apply_temperature
from cmafnet.run import SPLIT_FILE, WEIGHTS_FILE, read_meta, write_json

if TYPE_CHECKING:
    from cmafnet.inference.predict import PredictOptions

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def resolve_targets(
    run_classes: list[str], store: Any, *, zero_shot: bool = False
) -> tuple[np.ndarray, list[str], str]:
    """Labels of ``store`` in the run's class order, the class names, and the target kind.

    A binary run evaluated zero-shot uses the store's binary label (benign 0 / malignant 1)
    whatever the run's classes are called, and reports under the store's class names. Otherwise the store's class set (its ``label`` classes,
    or its subtypes for a multi-class run) must equal the run's, else :class:`RunFolderError`.
    """
    store_classes = [str(c) for c in store.classes]
    sub_names = [str(n) for n in getattr(store, "subtype_classes", None) or []] or None
    if zero_shot:
        if len(run_classes) != 2:
            raise ConfigError(
                f"--zero-shot needs a binary run (benign/malignant); this run has {len(run_classes)} classes "
                f"{run_classes}"
            )
        if len(store_classes) != 2:
            raise RunFolderError(
                f"--zero-shot needs a store with a binary label; store classes are {store_classes}"
            )
        # The run's positive class (IDC) stands for the store's (malignant): name outputs by the store.
        return np.asarray(store.targets("label")[0], dtype=np.int64), store_classes, "label"
    norm = lambda names: [n.strip().lower() for n in names]  # noqa: E731
    for kind, names in (("label", store_classes), ("subtype", sub_names)):
        if names is not None and sorted(norm(names)) == sorted(norm(run_classes)):
            y_store = np.asarray(store.targets(kind)[0], dtype=np.int64)
            # Same class set, possibly another order: map store indices to the run's by name.
            to_run = np.array([norm(run_classes).index(n) for n in norm(names)], dtype=np.int64)
            return to_run[y_store], list(run_classes), kind
    hint = ""
    if len(run_classes) == 2 and len(store_classes) == 2:
        hint = " (to apply a binary run to another dataset's benign/malignant labels, pass --zero-shot)"
    elif len(run_classes) == 2:
        hint = " (a binary run on a multi-class store: pass --zero-shot to use the store's binary label)"
    have = f"{store_classes}" + (f" / subtypes {sub_names}" if sub_names else "")
    raise RunFolderError(
        f"class set mismatch: the run was trained on {run_classes} but the store has {have}{hint}"
    )


def predict_store(predictor: Any, store: Any, indices: np.ndarray) -> np.ndarray:
    """Uncalibrated logits ``(len(indices), C)`` of ``store`` images in ``indices`` order (the caller
    applies the temperature, :func:`cmafnet.inference.temperature.apply_temperature`)."""
    stream = predictor.logits_stream((None, store.images[int(i)]) for i in indices)  # one size: in order
    return (
        np.concatenate([logits for _, logits in stream])
        if len(indices)
        else np.zeros((0, len(predictor.classes)))
    )


def mag_label(value: Any) -> str:
    """A magnification as the paper writes it: 40, '40', 40.0, '40x', '40X' -> '40X'."""
    text = str(value).strip().upper().rstrip("X")
    try:
        return f"{int(float(text))}X"
    except ValueError:
        return str(value)


def index_column(index: Any, column: str, rows: np.ndarray) -> np.ndarray | None:
    """``column`` of the store index at ``rows``, or None when the store has no such column."""
    return index[column].to_numpy()[rows] if column in index.columns else None


def group_rows(index: Any, rows: np.ndarray, column: str) -> dict[str, np.ndarray]:
    """Row positions (into ``rows``) per value of ``column``; magnifications labelled '40X'."""
    raw = index_column(index, column, rows)
    if raw is None:
        return {}
    # -1 is the store's "no magnification" (IDC patches): not a group of its own
    ok = np.array(
        [x is not None and str(x).strip() not in ("", "nan", "None", "-1") for x in raw], dtype=bool
    )
    labels = np.array([mag_label(x) if column == "magnification" else str(x) for x in raw], dtype=object)
    # '40X' < '100X' < '200X' (numbers compared as numbers)
    natural = lambda t: tuple(int(x) if x.isdigit() else x for x in re.split(r"(\d+)", t))  # noqa: E731
    return {v: np.flatnonzero(ok & (labels == v)) for v in sorted(set(labels[ok]), key=natural)}


def evaluate_run(
    run_dir: str | Path,
    store_path: str | Path,
    *,
    split_path: str | Path | None = None,
    split: str = "test",
    zero_shot: bool = False,
    out_dir: str | Path | None = None,
    bootstrap: int | None = None,
    choose_threshold: bool = True,
    scale_match: bool | None = None,
    aggregate: str = "mean",
    options: PredictOptions | None = None,
) -> dict:
    """Predict a split of ``store_path`` with the run's best model and write predictions and metrics.

    On the run's own split (not zero-shot) it also fits the temperature on validation and chooses
    the operating threshold on the *calibrated* validation probabilities (both stored in
    run.json), and records the training scale (``patch_mpp``) from the training store.

    Args:
        split_path: split file; default the run's own ``split.json`` (not used for ``split='all'``).
        split: ``test``, ``val``, ``train`` or ``all``. Zero-shot defaults to every image.
        zero_shot: apply a binary run to another dataset's benign/malignant label.
        bootstrap: bootstrap resamples for CIs (by patient); default ``cfg.eval.bootstrap``; 0 = none.
        scale_match: also evaluate at the training scale (resample + tile); default: zero-shot only.
        aggregate: ``mean`` or ``max`` of the tile probabilities (scale-matched evaluation).
        options: device, batch size, ``calibrate`` (auto | on | off: fit on the own split unless off and
            apply the run's temperature, ``inference.temperature.run_temperature``; off = T = 1) and the
            test-time adaptations ``adapt``; with any adaptation the run's stored temperature and
            threshold are used, never refitted (site calibration: zero-shot only, refitted on its
            patients, which are then left out). Zero-shot runs of a binary model also get the
            ``diagnosis`` (:func:`~cmafnet.evaluation.transfer.zero_shot_diagnosis`).

    Returns:
        The metrics document also written to ``metrics_<name>.json`` (plus ``paths``; with
        ``scale_matched``: the scale-matched document, written to ``metrics_<name>_matched.json``).

    Raises:
        RunFolderError: no run / no model / store classes differ from the run's / split mismatch.
        ConfigError: bad ``split`` or ``--zero-shot`` on a multi-class run.
    """
    from cmafnet.data.store import PatchStore
    from cmafnet.evaluation.calibration import calibration_report
    from cmafnet.evaluation.rows import metric_rows
    from cmafnet.inference.predict import PredictOptions, Predictor, run_classes
    from cmafnet.inference.resampling import record_run_scale
    from cmafnet.run import load_run

    options = options or PredictOptions()
    adapt, calibrate, device = options.adapt, options.calibrate, resolve_device(options.device)
    if adapt.site_patients and not zero_shot:
        raise ConfigError(
            "--site-calibration is for another site's labelled patients: use it with --zero-shot"
        )
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunFolderError(f"{run_dir}: run folder not found")
    meta = read_meta(run_dir)
    if not (run_dir / WEIGHTS_FILE).exists():
        raise RunFolderError(f"{run_dir}: no model ({WEIGHTS_FILE} missing); train the run first")
    store = PatchStore.open(store_path)
    meta_classes = meta.get("classes")
    # Check the class set before building the model: cheap, and the most common mistake.
    known = isinstance(meta_classes, (list, tuple)) and meta_classes
    if known:
        y_all, classes, kind = resolve_targets([str(c) for c in meta_classes], store, zero_shot=zero_shot)
    run = load_run(run_dir, device=device)
    if not known:  # older run.json without classes: names from the config
        y_all, classes, kind = resolve_targets(run_classes(run), store, zero_shot=zero_shot)
    cfg = run.config
    predictor = Predictor(run, replace(options, calibrate="off"))  # logits; the temperature is applied here
    binary = len(classes) == 2

    split_obj = None
    if split != "all":
        if split_path is None and zero_shot:
            split = "all"  # zero-shot: the whole foreign dataset is test data
        else:
            from cmafnet.data.splits import load_split

            path = Path(split_path) if split_path is not None else run_dir / SPLIT_FILE
            if not path.exists():
                raise RunFolderError(f"split file not found: {path} (pass --split-file or --all)")
            split_obj = load_split(path, store)
            if split not in SPLITS:
                raise ConfigError(f"split must be one of {SPLITS} or 'all', got '{split}'")
            if not (rows := np.asarray(getattr(split_obj, split))).size:
                raise RunFolderError(f"the '{split}' split is empty")
    if split == "all":
        rows = np.arange(len(y_all))
    name = ("zeroshot_" if zero_shot else "") + split + _suffix(adapt)
    out = Path(out_dir) if out_dir is not None else run_dir
    out.mkdir(parents=True, exist_ok=True)

    adabn = adapt_to_target(predictor, store, rows, y_all[rows], adapt)
    logits = predict_store(predictor, store, rows)
    y = y_all[rows]
    site = None
    if adapt.site_patients:
        patient_col = index_column(store.index, "patient", rows)
        keep, site_temp, site_op, site = site_calibration(
            logits, y, patient_col, adapt, float(cfg.eval.target_sensitivity)
        )
        rows, logits, y = rows[keep], logits[keep], y[keep]
    if not zero_shot:
        meta = record_run_scale(run_dir, meta, store, None if split_obj is None else split_obj.train)
    # Zero-shot and adapted evaluations reuse the run's stored temperature and threshold: no validation
    # rows, so nothing is refitted (the run's record holds what its own, unadapted model chose).
    val = np.asarray(getattr(split_obj, "val", []) if not (zero_shot or adapt.active) else [], dtype=np.int64)
    val_logits, y_val, n_val_patients = None, None, None
    if val.size:
        val_logits = logits if split == "val" else predict_store(predictor, store, val)
        y_val = y_all[val]
        if "patient" in store.index.columns:
            n_val_patients = int(store.index["patient"].iloc[val].nunique())
    if site is not None:  # zero-shot only, so a binary run
        temp, op = site_temp, site_op
        cal_source = (
            f"site calibration: T={temp:.4g} fitted on {site['n_patients']} target patients (not scored)"
        )
    else:
        temp, cal_source, meta = choose_temperature(
            run_dir, meta, val_logits, y_val, calibrate, n_val_patients
        )
        p_val = None if val_logits is None else apply_temperature(val_logits, temp)[:, 1]
        op = operating_threshold(run_dir, meta, cfg, p_val, y_val, temp, choose_threshold) if binary else None
    probs = apply_temperature(logits, temp)
    n_bins = cfg.eval.ece_bins
    n_boot = cfg.eval.bootstrap if bootstrap is None else bootstrap
    index = store.index
    patients = index_column(index, "patient", rows)
    doc: dict[str, Any] = {
        "run": str(run_dir),
        "store": str(store_path),
        "store_hash": getattr(store, "store_hash", None),
        "dataset": getattr(store, "dataset", None),
        "split": split,
        "name": name,
        "zero_shot": zero_shot,
        "target": kind,
        "classes": classes,
        "store_classes": list(store.classes),
        "n": len(rows),
        "scale": {"mode": "squeeze", "description": f"every image resized to the model's {cfg.model.img_size} px input"},
        "calibration": {**calibration_report(y, logits, temp, n_bins), "source": cal_source},
        **metric_rows(y, probs, classes, op=op, patients=patients, groups=group_rows(index, rows, "magnification"),
                      n_bins=n_bins, n_boot=n_boot),
    }  # fmt: skip
    doc["adaptation"] = {"label": adapt.label(), **asdict(adapt), "preprocess": predictor.preprocess_desc,
                         "adabn": adabn, "site_calibration": site}  # fmt: skip
    if zero_shot and binary:
        doc["diagnosis"] = zero_shot_diagnosis(
            y, probs[:, 1], index, rows, threshold=op["value"] if op else 0.5, n_boot=n_boot, meta=meta,
            image_hw=tuple(store.images.shape[1:3]), figure=out / f"scores_{name}.png",
            title=f"{meta.get('model') or 'run'} ({run_dir.parent.name}/{run_dir.name}) on {getattr(store, 'dataset', 'the target')}, {adapt.label()}",
        )  # fmt: skip
    pred_path = out / f"predictions_{name}.csv"
    metrics_path = out / f"metrics_{name}.json"
    thr_value = doc.get("operating_point", {}).get("value", 0.5)
    write_predictions(pred_path, index, rows, y, probs, classes, threshold=thr_value, logits=logits)
    doc["paths"] = {"predictions": str(pred_path), "metrics": str(metrics_path)}
    matched = None
    if scale_match if scale_match is not None else zero_shot:
        from cmafnet.evaluation.matched import scale_matched_evaluation

        matched = scale_matched_evaluation(
            predictor, store, rows, y, classes, doc, meta=meta, temp=temp, op=op, n_bins=n_bins, n_boot=n_boot,
            aggregate=aggregate, out=out,
        )  # fmt: skip
        doc["paths"]["scale_matched"] = matched["paths"]["metrics"]
    write_json(metrics_path, doc)
    if matched is not None:  # returned, not written: it has its own file
        doc["scale_matched"] = matched
    return doc


def _suffix(adapt: Adaptation) -> str:
    """Output-name suffix of an adapted evaluation (``_stain-reinhard_tta-d4``), empty when raw."""
    if not adapt.active:
        return ""
    return (
        "_"
        + "_".join(re.sub(r"[^a-z0-9]+", "-", part.lower()).strip("-") for part in adapt.label().split(" + "))
        + (f"_seed{adapt.seed}" if adapt.seed and (adapt.site_patients or adapt.adabn == "balanced") else "")
    )


def write_predictions(
    path: Path,
    index: Any,
    rows: np.ndarray,
    y: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    *,
    threshold: float = 0.5,
    logits: np.ndarray | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """Per-image predictions CSV (atomic write): calibrated ``prob_<class>``, raw ``logit_<class>``."""
    import pandas as pd

    from cmafnet.run import atomic_write_bytes

    df = pd.DataFrame({"row": rows})
    for col in ("id", "patient"):
        df[col] = index_column(index, col, rows)
    df["label"] = y
    df["label_name"] = [classes[int(k)] for k in y]
    for k, c in enumerate(classes):
        df[f"prob_{c}"] = probs[:, k]
    if len(classes) == 2:
        df["pred"] = (probs[:, 1] >= threshold).astype(int)
        df["pred_05"] = (probs[:, 1] >= 0.5).astype(int)
    else:
        df["pred"] = probs.argmax(1)
    for col in ("subtype", "magnification", "source"):
        df[col] = index_column(index, col, rows)
    if logits is not None:
        for k, c in enumerate(classes):
            df[f"logit_{c}"] = logits[:, k]
    for col, values in (extra or {}).items():
        df[col] = values
    atomic_write_bytes(path, df.to_csv(index=False).encode())


def load_predictions(path: str | Path) -> tuple[Any, list[str]]:
    """A predictions CSV and its class names (from the ``prob_<class>`` columns)."""
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise RunFolderError(f"predictions file not found: {path}")
    df = pd.read_csv(path)
    classes = [c[len("prob_") :] for c in df.columns if c.startswith("prob_")]
    if not classes or "label" not in df.columns:
        raise RunFolderError(f"{path}: not a predictions file (needs label and prob_<class> columns)")
    # Rows without probabilities (not assessable at the training scale) carry no prediction.
    df = df.dropna(subset=[f"prob_{c}" for c in classes]).reset_index(drop=True)
    return df, classes
