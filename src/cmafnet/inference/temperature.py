"""Post-hoc calibration by temperature scaling (Guo et al., 2017), shared by evaluate, predict and wsi.

The arithmetic lives here, beside the :class:`~cmafnet.inference.predict.Predictor` that applies
it; :mod:`cmafnet.evaluation.calibration` reports it (ECE, Brier, NLL before and after).

One scalar ``T > 0`` divides the logits before the softmax: ``p = softmax(z / T)``. It is fitted on
the run's *validation* logits by minimising the negative log-likelihood (``scipy.optimize``,
bounded search over ``log T``) and stored in ``run.json`` as ``temperature`` with the details under
``calibration``. Every consumer of a run (``cmafnet evaluate``, ``predict``, ``wsi``) reads it
through :func:`run_temperature`, so the three apply the same number.

Temperature scaling is monotone: it never changes the argmax, so binary decisions at 0.5 and the
ranking metrics (AUROC, AUPRC) are unchanged; it changes what a probability *means* (ECE, Brier,
NLL). An operating threshold chosen at one temperature corresponds to exactly one threshold at
another (:func:`threshold_at_temperature`), so a run's stored threshold keeps its decisions when
calibration is switched off.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_softmax, logit, softmax

from cmafnet.errors import ConfigError
from cmafnet.run import MIN_CALIBRATION_PATIENTS, TEMPERATURE_RANGE

# Search range for T: wide enough for any network we train (over-confident nets need T of 1-5,
# under-confident ones T < 1), narrow enough that a degenerate validation set cannot send T to 0/inf.
# run.json refuses a stored temperature outside it.
T_MIN, T_MAX = TEMPERATURE_RANGE


def _check(logits: np.ndarray, y: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 2 or z.shape[0] == 0:
        raise ValueError(f"logits must have shape (N, C) with N >= 1, C >= 2, got {z.shape}")
    if not np.all(np.isfinite(z)):
        raise ValueError("logits contain NaN or inf")
    if y is None:
        return z, None
    t = np.asarray(y).astype(np.int64)
    if t.shape != (z.shape[0],) or t.min() < 0 or t.max() >= z.shape[1]:
        raise ValueError(f"labels must be ({z.shape[0]},) class indices in [0, {z.shape[1] - 1}]")
    return z, t


def nll(logits: np.ndarray, y: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``softmax(logits / temperature)`` for labels ``y``."""
    z, t = _check(logits, y)
    logp = log_softmax(z / float(temperature), axis=1)  # (N, C), stable
    return float(-logp[np.arange(len(t)), t].mean())


def apply_temperature(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities ``softmax(logits / T)``, ``(N, C)`` float64."""
    z, _ = _check(logits)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return softmax(z / float(temperature), axis=1)


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, Any]]:
    """The temperature minimising the validation NLL, and what the fit did.

    Bounded Brent search over ``log T`` in ``[log T_MIN, log T_MAX]`` (``scipy.optimize.
    minimize_scalar(method="bounded")``; in log-space so that T = 0.5 and T = 2 are equally far
    from 1). ``T = 1`` (no calibration) is kept unless the optimum is strictly better, so the fitted
    temperature never increases the validation NLL.

    Returns:
        ``(T, info)`` with ``info = {method, n, nll_before, nll_after, bounds, converged}``.
    """
    z, t = _check(logits, y)
    res = minimize_scalar(
        lambda log_t: nll(z, t, math.exp(log_t)),
        bounds=(math.log(T_MIN), math.log(T_MAX)),
        method="bounded",
        options={"xatol": 1e-6},
    )
    before = nll(z, t, 1.0)
    temp, after = float(math.exp(res.x)), float(res.fun)
    if not after < before:  # flat or degenerate: the identity is at least as good
        temp, after = 1.0, before
    info = {
        "method": "temperature scaling (NLL, bounded search over log T)",
        "n": len(t),
        "nll_before": before,
        "nll_after": after,
        "bounds": [T_MIN, T_MAX],
        "converged": bool(res.success),
        "at_bound": bool(min(abs(temp - T_MIN), abs(temp - T_MAX)) < 1e-3 * temp),
    }
    return temp, info


def threshold_at_temperature(threshold: float, t_from: float, t_to: float) -> float:
    """The binary threshold at temperature ``t_to`` that makes the decisions of ``threshold`` at ``t_from``.

    For two classes ``p1 = sigmoid((z1 - z0) / T)``; the threshold ``t`` at ``T_from`` is the
    logit margin ``m = T_from * logit(t)``, which at ``T_to`` reads ``sigmoid(m / T_to)``.
    """
    if t_from == t_to or threshold <= 0.0 or threshold >= 1.0:
        return float(threshold)
    return float(expit(t_from * logit(threshold) / t_to))


CALIBRATION_MODES = ("auto", "on", "off")


def run_temperature(meta: dict, mode: str = "auto") -> tuple[float, str]:
    """The temperature a run's probabilities are computed at, and a short description.

    ``mode``: ``off`` gives 1.0; ``on`` the stored temperature; ``auto`` the stored temperature when
    it was fitted on at least ``MIN_CALIBRATION_PATIENTS`` validation patients (fewer make it worse on
    unseen patients, docs/decisions.md), else 1.0 and the description says why.
    """
    if mode not in CALIBRATION_MODES:
        raise ConfigError(f"--calibration must be one of {', '.join(CALIBRATION_MODES)}, got {mode!r}")
    t = meta.get("temperature")
    if mode == "off":
        return 1.0, "off (--calibration off)"
    if t is None:
        return 1.0, "none stored (run.json has no temperature: run 'cmafnet evaluate' on the run's split)"
    k = (meta.get("calibration") or {}).get("n_patients")
    fitted = f"temperature {t:.4g} fitted on validation ({'?' if k is None else k} patients, run.json)"
    if mode == "auto" and (k is None or k < MIN_CALIBRATION_PATIENTS):
        why = f"is not applied under {MIN_CALIBRATION_PATIENTS} (--calibration on applies it)"
        return 1.0, f"uncalibrated: {fitted} {why}"
    return float(t), fitted


def stored_threshold(meta: dict, temperature: float) -> dict | None:
    """run.json's operating threshold as ``threshold_info``, mapped to ``temperature`` (the same
    decisions as at the temperature it was chosen at, kept under ``mapped_from``); None when none is stored."""
    if meta.get("threshold") is None:
        return None
    t, info = float(meta["threshold"]), dict(meta.get("threshold_info") or {})
    t_chosen = float(info.get("temperature", 1.0))
    info.update(value=threshold_at_temperature(t, t_chosen, temperature), temperature=float(temperature),
                chosen_on=info.get("chosen_on", "run.json"))  # fmt: skip
    if abs(t_chosen - temperature) > 1e-12:
        info["mapped_from"] = {"value": t, "temperature": t_chosen}
    return info
