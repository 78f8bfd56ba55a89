"""The run's temperature and operating threshold: chosen on validation, stored in run.json, reused.

The temperature is fitted first, so that the threshold is chosen on *calibrated* validation
probabilities and stored with the temperature it was chosen at. Elsewhere (zero-shot, ``--all``) the
stored values are reused; a stored threshold chosen at another temperature is mapped to the current
one, which keeps its decisions.
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
    stored_threshold,
)
from cmafnet.run import update_meta

log = logging.getLogger(__name__)


def choose_temperature(
    run_dir: Path,
    meta: dict,
    val_logits: np.ndarray | None,
    y_val: np.ndarray | None,
    calibrate: str,
    n_patients: int | None = None,
) -> tuple[float, str, dict]:
    """Fit the temperature on validation and store it in run.json (unless ``calibrate`` is ``off``),
    then the temperature to apply (``run_temperature``: ``auto`` needs enough validation patients)."""
    if calibrate != "off" and val_logits is not None and len(val_logits):
        temp, info = fit_temperature(val_logits, y_val)
        meta = update_meta(
            run_dir, temperature=temp, calibration={**info, "fitted_on": "val", "n_patients": n_patients}
        )
    temp, source = run_temperature(meta, calibrate)
    if calibrate != "off" and meta.get("temperature") is None:  # a stored-but-unapplied one is in the source
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
            info = threshold_info(y_val, p_val, target, temp, "val")
            update_meta(run_dir, threshold=info["value"], threshold_info=info)
            return info
    return stored_threshold(meta, temp)


def threshold_info(y: np.ndarray, p_pos: np.ndarray, target: float, temp: float, chosen_on: str) -> dict:
    """The highest threshold whose sensitivity on ``p_pos`` reaches ``target``, with the rates it gives
    there (run.json's ``threshold_info``)."""
    t = threshold_for_sensitivity(y, p_pos, target)
    return {
        "value": t,
        "target_sensitivity": target,
        "chosen_on": chosen_on,
        "n_val": int(y.size),
        "temperature": float(temp),
        "val_sensitivity": float(np.mean(p_pos[y == 1] >= t)),
        "val_specificity": float(np.mean(p_pos[y == 0] < t)) if (y == 0).any() else None,
    }
