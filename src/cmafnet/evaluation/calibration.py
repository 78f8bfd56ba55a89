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
    from sklearn.metrics import brier_score_loss

    from cmafnet.evaluation.metrics import expected_calibration_error

    z = np.asarray(logits, dtype=np.float64)
    t = np.asarray(y).astype(np.int64)
    out: dict[str, Any] = {"temperature": float(temperature), "n": len(t)}
    for tag, temp in (("before", 1.0), ("after", float(temperature))):
        p = apply_temperature(z, temp)
        out[f"ece_{tag}"] = expected_calibration_error(t, p, n_bins)
        out[f"nll_{tag}"] = nll(z, t, temp)
        out[f"brier_{tag}"] = float(brier_score_loss(t, p[:, 1], pos_label=1)) if z.shape[1] == 2 else None
    return out
