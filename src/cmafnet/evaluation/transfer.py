"""Evaluation on another site: the adaptations ``evaluate`` applies (AdaBN on the target images, site
calibration on k labelled target patients) and the zero-shot diagnosis it writes.

The arithmetic lives in :mod:`cmafnet.inference.adapt` and :mod:`cmafnet.evaluation.zeroshot`; this
module connects them to a store's rows and to the metrics document.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cmafnet.errors import ConfigError
from cmafnet.evaluation.operating import threshold_info
from cmafnet.inference.adapt import Adaptation, balanced_indices
from cmafnet.inference.temperature import apply_temperature, fit_temperature


def adapt_to_target(
    predictor: Any, store: Any, rows: np.ndarray, y: np.ndarray, adapt: Adaptation
) -> dict | None:
    """AdaBN on the evaluated images (``adabn=on``) or on a class-balanced sample of them (``balanced``:
    uses the labels, so that the re-estimated statistics do not absorb the target's class mix)."""
    if adapt.adabn == "off":
        return None
    pick = rows if adapt.adabn == "on" else rows[balanced_indices(y, adapt.seed)]
    what = f"{len(pick)} target images" + (" (class-balanced sample)" if adapt.adabn == "balanced" else "")
    info = predictor.adapt_batchnorm((store.images[int(i)] for i in pick), what)
    if adapt.adabn == "on":
        info["risk"] = (
            "the re-estimated BatchNorm statistics absorb the target's class mix: under a class-proportion "
            "shift they move with the prevalence (--adabn balanced re-estimates on a class-balanced sample)"
        )
    return info


def site_calibration(
    logits: np.ndarray,
    y: np.ndarray,
    patients: np.ndarray | None,
    adapt: Adaptation,
    target_sensitivity: float,
) -> tuple[np.ndarray, float, dict, dict]:
    """Refit the temperature and threshold on ``adapt.site_patients`` labelled target patients (chosen by
    ``adapt.seed``). Returns the positions (into ``logits``) left to score, the temperature, the
    operating point (``threshold_info``'s shape) and what was fitted; the calibration patients are
    never scored."""
    if patients is None:
        raise ConfigError("--site-calibration: the target store names no patients")
    cal, rest = site_calibration_split(patients, y, adapt.site_patients, adapt.seed)
    fit = site_calibrate(logits[cal], y[cal], target_sensitivity, patients[cal])
    op = {
        "value": fit["threshold"], "target_sensitivity": target_sensitivity,
        "chosen_on": f"site calibration ({fit['n_patients']} target patients, {fit['n_images']} images)",
        "n_val": fit["n_images"], "temperature": fit["temperature"], "val_sensitivity": fit["sensitivity"],
        "val_specificity": fit["specificity"],
    }  # fmt: skip
    info = {**fit, "patients": sorted(str(p) for p in np.unique(patients[cal])), "scored_images": len(rest)}
    return rest, fit["temperature"], op, info


def zero_shot_diagnosis(
    y: np.ndarray,
    p_pos: np.ndarray,
    index: Any,
    rows: np.ndarray,
    *,
    threshold: float,
    n_boot: int,
    meta: dict,
    image_hw: tuple[int, int],
    figure: Path,
    title: str,
) -> dict:
    """:func:`~cmafnet.evaluation.zeroshot.diagnose` of the evaluated rows, with the mean score per subtype
    and magnification, the field of view against the run's training patches (``image_hw``: the stored
    images' size), and the score-distribution figure written to ``figure``."""
    from cmafnet.evaluation.evaluate import index_column
    from cmafnet.evaluation.zeroshot import diagnose, field_of_view_table, group_scores
    from cmafnet.evaluation.zeroshot_plot import plot_score_distributions

    patients, subtypes, mags = (index_column(index, c, rows) for c in ("patient", "subtype", "magnification"))
    subtypes = None if subtypes is None or not any(subtypes) else subtypes.astype(str)
    mags = None if mags is None else mags.astype(str)
    doc = diagnose(y, p_pos, threshold=threshold, patients=patients, n_boot=n_boot)
    doc["by_subtype"] = None if subtypes is None else group_scores(p_pos, subtypes, y, threshold=threshold)
    doc["by_magnification"] = None if mags is None else group_scores(p_pos, mags, y, threshold=threshold)
    doc["field_of_view"] = None
    if meta.get("patch_mpp") and meta.get("patch_hw") and "mpp" in index.columns:
        # the stored images (one canvas size) at their stored µm/px (NaN: unknown)
        h, w = image_hw
        images = [
            {"magnification": m, "h": h, "w": w, "mpp": None if mpp != mpp else mpp}
            for m, mpp in zip(
                mags if mags is not None else ["all"] * len(rows), index_column(index, "mpp", rows)
            )
        ]
        doc["field_of_view"] = field_of_view_table(
            images, patch_mpp=meta["patch_mpp"], patch_hw=tuple(meta["patch_hw"])
        )
    doc["figure"] = str(plot_score_distributions(p_pos, subtypes, mags, y, figure, title))
    return doc


def site_calibration_split(
    patients: np.ndarray, labels: np.ndarray, k: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split a labelled target cohort (``(N,)`` patients and labels) by patient: ``k`` calibration
    patients, the rest for evaluation; returns both as sorted int64 row indices.

    The ``k`` patients are drawn with ``numpy.random.default_rng(seed)`` over the sorted patient ids
    (same seed, same ids -> same split). When ``k >= 2``, one patient holding each class is taken
    first (as far as ``k`` allows and such patients exist), so the calibration set can define a
    sensitivity (it needs positives) and a temperature (it needs both classes); the rest are random.
    ``1 <= k <`` the number of patients, else :class:`ConfigError` (nothing would be left to score).
    """
    pid = np.asarray(patients)
    y = np.asarray(labels)
    if pid.shape != y.shape or pid.ndim != 1:
        raise ValueError(f"patients and labels must be 1-D of equal length, got {pid.shape} and {y.shape}")
    uniq = np.unique(pid)  # sorted
    if not 1 <= k < len(uniq):
        raise ConfigError(
            f"site calibration: k={k} patients requested, need 1 <= k < {len(uniq)} (the target's patient "
            "count), so that some patients are left to evaluate on"
        )
    rng = np.random.default_rng(seed)
    order = uniq[rng.permutation(len(uniq))]
    chosen: list[Any] = []
    if k >= 2:
        for c in rng.permutation(np.unique(y)):
            if len(chosen) >= k:
                break
            if any(c in y[pid == p] for p in chosen):
                continue
            holder = next((p for p in order if p not in chosen and (y[pid == p] == c).any()), None)
            if holder is not None:
                chosen.append(holder)
    chosen += [p for p in order if p not in chosen][: k - len(chosen)]
    cal = np.isin(pid, np.asarray(chosen, dtype=pid.dtype))
    return np.flatnonzero(cal).astype(np.int64), np.flatnonzero(~cal).astype(np.int64)


def site_calibrate(
    logits_cal: np.ndarray,
    y_cal: np.ndarray,
    target_sensitivity: float,
    patients_cal: np.ndarray | None = None,
) -> dict[str, Any]:
    """Refit the temperature and the operating threshold on a site's calibration patients.

    The temperature is :func:`~cmafnet.inference.temperature.fit_temperature` on the ``(N, K)``
    uncalibrated ``logits_cal``, and the threshold
    :func:`~cmafnet.evaluation.metrics.threshold_for_sensitivity` on ``softmax(logits / T)[:, 1]``.
    Both hold at that temperature only (``threshold_at_temperature`` maps it). Few patients give a
    noisy temperature (``run_temperature`` in ``auto`` mode ignores one fitted on under
    ``MIN_CALIBRATION_PATIENTS`` patients); ``patients_cal`` only reports ``n_patients``.

    Returns:
        ``{"temperature", "threshold", "target_sensitivity", "sensitivity", "specificity", "n_images",
        "n_positive", "n_patients", "calibration"}``; ``threshold`` (and the two rates) is None for
        more than two classes (argmax decisions). ``calibration`` is ``fit_temperature``'s info.

    Raises:
        ConfigError: no positive image among the calibration images (choose more patients).
    """
    z = np.asarray(logits_cal, dtype=np.float64)
    y = np.asarray(y_cal).astype(np.int64)
    temp, info = fit_temperature(z, y)
    out: dict[str, Any] = {
        "temperature": float(temp),
        "threshold": None,
        "target_sensitivity": float(target_sensitivity),
        "sensitivity": None,
        "specificity": None,
        "n_images": len(y),
        "n_positive": int((y == 1).sum()),
        "n_patients": None if patients_cal is None else len(np.unique(np.asarray(patients_cal))),
        "calibration": info,
    }
    if z.shape[1] != 2:
        return out
    if not (y == 1).any():
        raise ConfigError(
            "site calibration: the calibration patients hold no positive image; use more patients"
        )
    op = threshold_info(y, apply_temperature(z, temp)[:, 1], target_sensitivity, temp, "site")
    out.update(threshold=op["value"], sensitivity=op["val_sensitivity"], specificity=op["val_specificity"])
    return out
