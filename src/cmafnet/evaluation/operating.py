"""The run's temperature and operating threshold: chosen on validation, stored in run.json, reused.

Order on the run's own split: fit the temperature on the validation logits (NLL), then choose the
operating threshold on the *calibrated* validation probabilities (the highest threshold whose
validation sensitivity reaches ``eval.target_sensitivity``). Both go into ``run.json``
(``temperature`` + ``calibration``; ``threshold`` + ``threshold_info`` with the temperature it was
chosen at). Elsewhere (zero-shot, ``--all``) the stored values are reused; a stored threshold
chosen at another temperature is mapped to the current one, which keeps its decisions.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from cmafnet.evaluation.metrics import threshold_for_sensitivity
from cmafnet.inference.temperature import (
    fit_temperature,
    run_temperature,
    threshold_at_temperature,
    threshold_temperature,
)
from cmafnet.run import update_meta

log = logging.getLogger(__name__)


def choose_temperature(
    run_dir: Path, meta: dict, val_logits: np.ndarray | None, y_val: np.ndarray | None, calibrate: bool
) -> tuple[float, str, dict]:
    """Fit the temperature on validation (stored in run.json), or read the stored one."""
    if calibrate and val_logits is not None and len(val_logits):
        temp, info = fit_temperature(val_logits, y_val)
        info["fitted_on"] = "val"
        meta = update_meta(run_dir, temperature=temp, calibration=info)
        return (
            temp,
            f"temperature {temp:.4g} fitted on validation (n={info['n']}) and stored in run.json",
            meta,
        )
    temp, source = run_temperature(meta, calibrate)
    if calibrate and temp == 1.0 and "temperature" not in meta:
        log.warning("uncalibrated probabilities: %s", source)
    return temp, source, meta


def operating_threshold(
    run_dir: Path,
    meta: dict,
    cfg: Any,
    p_val: np.ndarray | None,
    y_val: np.ndarray | None,
    temp: float,
    choose: bool,
) -> dict | None:
    """Choose (on calibrated validation probabilities) and store the operating threshold, or reuse the stored one.

    A stored threshold chosen at another temperature is mapped to ``temp`` (same decisions).
    """
    target = float(cfg.eval.target_sensitivity)
    if choose and p_val is not None and p_val.size:
        if not (y_val == 1).any():
            log.warning("validation split has no positive sample: no operating threshold chosen")
        else:
            t = threshold_for_sensitivity(y_val, p_val, target)
            info = {
                "value": t,
                "target_sensitivity": target,
                "chosen_on": "val",
                "n_val": int(y_val.size),
                "temperature": float(temp),
                "val_sensitivity": float(np.mean(p_val[y_val == 1] >= t)),
                "val_specificity": float(np.mean(p_val[y_val == 0] < t)) if (y_val == 0).any() else None,
            }
            update_meta(run_dir, threshold=t, threshold_info=info)
            return info
    stored = meta.get("threshold")
    if isinstance(stored, dict):
        stored = stored.get("value")
    if isinstance(stored, (int, float)):
        info = dict(meta.get("threshold_info") or {})
        t_chosen = threshold_temperature(meta)
        info.update(
            value=threshold_at_temperature(float(stored), t_chosen, temp),
            chosen_on=info.get("chosen_on", "run.json"),
            temperature=float(temp),
        )
        if abs(t_chosen - temp) > 1e-12:
            info["mapped_from"] = {"value": float(stored), "temperature": t_chosen}
        return info
    return None
