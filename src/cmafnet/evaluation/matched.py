"""Evaluation at the training scale: resample each image to the run's µm/px, tile, aggregate.

The squeezed evaluation (:func:`cmafnet.evaluation.evaluate.evaluate_run`) resizes every image to
the model's input; this one applies :mod:`cmafnet.inference.resampling` to the same images and writes
``metrics_<name>_matched.json`` and ``predictions_<name>_matched.csv`` beside it. Images that cannot
be seen at the training scale (smaller than half a training patch, or of unknown µm/px) are
excluded from the metrics and counted, overall and per magnification.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from cmafnet.run import write_json


def scale_matched_evaluation(
    predictor: Any,
    store: Any,
    rows: np.ndarray,
    y: np.ndarray,
    classes: list[str],
    squeezed: dict,
    *,
    meta: dict,
    temp: float,
    op: dict | None,
    n_bins: int,
    n_boot: int,
    aggregate: str,
    out: Path,
) -> dict:
    """The scale-matched counterpart of the evaluation document ``squeezed`` (written to ``out``)."""
    from cmafnet.data.scale import image_mpp
    from cmafnet.evaluation.calibration import probability_calibration
    from cmafnet.evaluation.evaluate import group_rows, index_column, mag_label, write_predictions
    from cmafnet.evaluation.rows import metric_rows
    from cmafnet.inference.resampling import MIN_COVERAGE, predict_scaled, run_scale

    scale = run_scale(meta)
    mpps = image_mpp(store, rows)
    res = predict_scaled(predictor, (store.images[int(i)] for i in rows), list(mpps), scale)
    ok = np.array([r.status == "" for r in res], dtype=bool)
    index = store.index
    mags = index_column(index, "magnification", rows)
    excluded = Counter(r.status for r in res if r.status)
    by_mag_excluded: dict[str, Counter] = {}
    for r, m in zip(res, [] if mags is None else mags):
        if r.status:
            by_mag_excluded.setdefault(mag_label(m), Counter())[r.status] += 1
    name = f"{squeezed['name']}_matched"
    doc: dict[str, Any] = {
        **{k: squeezed[k] for k in ("run", "store", "store_hash", "dataset", "split", "zero_shot", "target", "classes", "store_classes")},
        "name": name,
        "n": int(ok.sum()),
        "scale": {
            "mode": "match",
            "description": f"resampled to {scale.describe()}, tiled, tile probabilities aggregated by {aggregate}",
            "mpp": scale.mpp,
            "tile_hw": list(scale.tile_hw),
            "aggregate": aggregate,
            "min_coverage": MIN_COVERAGE,
            "n_total": len(rows),
            "n_assessable": int(ok.sum()),
            "excluded": dict(excluded),
            "excluded_by_magnification": by_mag_excluded,
            "tiles_per_image": float(np.mean([r.n_tiles for r in res if not r.status])) if ok.any() else None,
        },
    }  # fmt: skip
    n_classes = len(classes)
    after = np.full((len(rows), n_classes), np.nan)
    if ok.any():
        after[ok] = np.stack([r.probs(temp, aggregate) for r, k in zip(res, ok) if k])
        before = np.stack([r.probs(1.0, aggregate) for r, k in zip(res, ok) if k])
        sel = np.flatnonzero(ok)
        patients = index_column(index, "patient", rows[sel])
        groups = {
            m: np.flatnonzero(np.isin(sel, g)) for m, g in group_rows(index, rows, "magnification").items()
        }
        groups = {m: g for m, g in groups.items() if g.size}
        cal = probability_calibration(y[sel], before, after[sel], temp, n_bins)
        doc["calibration"] = {**cal, "applied_to": "tile logits, then aggregated"}
        kw = {"op": op, "patients": patients, "groups": groups, "n_bins": n_bins, "n_boot": n_boot}
        doc.update(metric_rows(y[sel], after[sel], classes, **kw))
    else:
        doc["metrics"] = {}
        doc["note"] = "no image could be evaluated at the training scale (see scale.excluded)"
    pred_path = out / f"predictions_{name}.csv"
    metrics_path = out / f"metrics_{name}.json"
    extra = {
        "scale_status": [r.status or "ok" for r in res],
        "n_tiles": [r.n_tiles for r in res],
        "mpp": mpps,
        "resampled_hw": [f"{r.resampled_hw[0]}x{r.resampled_hw[1]}" for r in res],
    }
    thr = (doc.get("operating_point") or {}).get("value", 0.5)
    write_predictions(pred_path, index, rows, y, after, classes, threshold=thr, extra=extra)
    doc["paths"] = {"predictions": str(pred_path), "metrics": str(metrics_path)}
    write_json(metrics_path, doc)
    return doc
