"""Calibration in evaluations: ECE, Brier and NLL before and after temperature scaling.

The temperature itself is fitted and applied by :mod:`cmafnet.inference.temperature` (one
implementation for ``evaluate``, ``predict`` and ``wsi``); this module measures its effect.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cmafnet.inference.temperature import apply_temperature, nll


def calibration_report(
    y: np.ndarray, logits: np.ndarray, temperature: float, n_bins: int = 15
) -> dict[str, Any]:
    """ECE, Brier (binary) and NLL of the uncalibrated (T = 1) and calibrated probabilities."""
    z = np.asarray(logits, dtype=np.float64)
    t = np.asarray(y).astype(np.int64)
    before, after = apply_temperature(z, 1.0), apply_temperature(z, float(temperature))
    out = probability_calibration(t, before, after, temperature, n_bins)
    out.update(nll_before=nll(z, t, 1.0), nll_after=nll(z, t, float(temperature)))
    return out


def probability_calibration(
    y: np.ndarray, before: np.ndarray, after: np.ndarray, temperature: float, n_bins: int = 15
) -> dict[str, Any]:
    """ECE and Brier (binary) of probabilities ``(N, C)`` before and after temperature scaling (the
    scale-matched evaluation's are tile probabilities aggregated per image: no logits, so no NLL)."""
    from sklearn.metrics import brier_score_loss

    from cmafnet.evaluation.metrics import expected_calibration_error

    out: dict[str, Any] = {"temperature": float(temperature), "n": len(y)}
    for tag, p in (("before", before), ("after", after)):
        out[f"ece_{tag}"] = expected_calibration_error(y, p, n_bins)
        out[f"brier_{tag}"] = float(brier_score_loss(y, p[:, 1], pos_label=1)) if p.shape[1] == 2 else None
    return out
