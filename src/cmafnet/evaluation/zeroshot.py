"""Zero-shot diagnosis: does a binary model discriminate at all on a new data set, and on what?

The paper reports zero-shot BreakHis (benign = 0, malignant = 1) as a sensitivity alone. BreakHis
is about 69 % malignant, so a model that calls every image malignant scores 100 % sensitivity and
50 % balanced accuracy. :func:`diagnose` sets the metrics beside those trivial baselines with a
verdict from the AUROC's interval; :func:`group_scores` ranks subtypes (which tissue the model takes
for cancer); :func:`field_of_view_table` says how much tissue a target image spans against a
training patch.

All functions are pure (no file reads); every returned dict is JSON-serialisable and holds
``None``, never NaN, where a value is undefined.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from cmafnet.evaluation.metrics import classification_metrics
from cmafnet.evaluation.stats import metric_cis

DIAGNOSIS_KEYS = ("sensitivity", "specificity", "balanced_accuracy", "auroc", "auprc")
DISCRIMINATES = "discriminates"
CHANCE = "not distinguishable from chance"
INVERTED = "inverted (ranks benign above malignant)"
LABEL_NAMES = {0: "benign", 1: "malignant"}


def _native(value: Any) -> Any:
    """A numpy scalar as a plain Python value (JSON-serialisable); anything else unchanged."""
    return value.item() if isinstance(value, np.generic) else value


def _check_binary(y: np.ndarray, p_pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y)
    p = np.asarray(p_pos, dtype=np.float64)
    if y.ndim != 1 or p.shape != y.shape:
        raise ValueError(f"y and p_pos must be 1-D of equal length, got {y.shape} and {p.shape}")
    if y.size == 0:
        raise ValueError("no samples to diagnose")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y must hold 0 (benign) / 1 (malignant) labels")
    if not np.all(np.isfinite(p)) or p.min() < 0.0 or p.max() > 1.0:
        raise ValueError("p_pos must be probabilities of the positive class in [0, 1]")
    return y.astype(np.int64), p


def _two_columns(p_pos: np.ndarray) -> np.ndarray:
    """``(N,)`` positive-class probability -> ``(N, 2)`` class probabilities for the metrics module."""
    return np.stack([1.0 - p_pos, p_pos], axis=1)


def _trivial(y: np.ndarray, call: int) -> dict:
    """Metrics of the constant classifier that calls every sample ``call`` (1 = malignant).

    A constant score ranks nothing: AUROC 0.5 and average precision = prevalence (scikit-learn's
    values for tied scores), both ``None`` where the data leave them undefined.
    """
    m = classification_metrics(y, _two_columns(np.full(y.shape, float(call))), threshold=0.5)
    return {k: m[k] for k in DIAGNOSIS_KEYS}


def _verdict(auroc: dict, by: str, level: float) -> tuple[str, str]:
    """The verdict from the AUROC's interval against 0.5 and a one-line reason naming the numbers.

    Without an interval (``n_boot=0``, an undefined AUROC, fewer than two resampling units) no claim
    against chance can be made: the verdict is then "not distinguishable from chance".
    """
    value, ci = auroc["value"], auroc["ci"]
    if value is None:
        return CHANCE, "AUROC is undefined (only one class present), so discrimination cannot be assessed."
    if ci is None:
        return (
            CHANCE,
            f"AUROC {value:.3f} has no confidence interval, so it cannot be told from chance (0.5).",
        )
    lo, hi = ci
    where = f"AUROC {value:.3f} ({100 * level:g}% CI {lo:.3f}-{hi:.3f}, {by}-level bootstrap)"
    if lo > 0.5:
        return DISCRIMINATES, f"{where} lies entirely above chance (0.5)."
    if hi < 0.5:
        return INVERTED, f"{where} lies entirely below chance (0.5): benign images score higher."
    return CHANCE, f"{where} contains chance (0.5)."


def diagnose(
    y: np.ndarray,
    p_pos: np.ndarray,
    *,
    threshold: float,
    patients: np.ndarray | None,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict:
    """Whether a binary (zero-shot) classifier discriminates, with its metrics beside the trivial ones.

    Sensitivity alone cannot tell a model from one that calls everything malignant; the AUROC's
    interval against 0.5 can. Intervals are percentile bootstraps from
    :func:`~cmafnet.evaluation.stats.metric_cis`; with ``patients`` whole patients are resampled,
    since the images of one patient are correlated and an image-level interval would be too narrow.

    Args:
        y: ``(N,)`` labels, 0 = benign, 1 = malignant; p_pos: ``(N,)`` probability of malignant.
        threshold: call malignant when ``p_pos >= threshold``.
        patients: ``(N,)`` patient ids, or ``None`` to resample images.
        n_boot: bootstrap resamples; 0 gives no intervals (and the verdict "not distinguishable").
        alpha: 1 - confidence level.

    Returns:
        ``dict(n, n_malignant, n_benign, n_patients, prevalence, threshold, ci_level, ci_by, n_boot,
        metrics, trivial, verdict, verdict_reason)``. ``metrics[k] = {"value": v, "ci": [lo, hi] or
        None}`` for k in sensitivity, specificity, balanced_accuracy, auroc, auprc; ``trivial`` has
        the rows ``everything_malignant`` / ``everything_benign`` with the same keys (plain values).
        ``n_patients`` is ``None`` without ``patients``. Undefined values are ``None``.
    """
    y, p = _check_binary(y, p_pos)
    if patients is not None:
        patients = np.asarray(patients)
        if patients.shape != y.shape:
            raise ValueError(f"patients must have shape {y.shape}, got {patients.shape}")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    n_patients = int(np.unique(patients).size) if patients is not None else None
    kw = {"keys": DIAGNOSIS_KEYS, "threshold": threshold, "groups": patients, "alpha": alpha, "seed": seed}
    cis = metric_cis(y, _two_columns(p), n_boot=n_boot, **kw)
    # One resampling unit (a single patient, or a single image) makes every resample identical:
    # a zero-width interval that says nothing about uncertainty, so report none.
    units = n_patients if patients is not None else int(y.size)
    metrics = {}
    for k in DIAGNOSIS_KEYS:
        c = cis[k]
        has_ci = c["point"] is not None and c["low"] is not None and units >= 2
        metrics[k] = {"value": c["point"], "ci": [c["low"], c["high"]] if has_ci else None}
    by = "patient" if patients is not None else "image"
    verdict, reason = _verdict(metrics["auroc"], by, 1 - alpha)
    n_pos = int(y.sum())
    return {
        "n": int(y.size),
        "n_malignant": n_pos,
        "n_benign": int(y.size) - n_pos,
        "n_patients": n_patients,
        "prevalence": n_pos / y.size,
        "threshold": float(threshold),
        "ci_level": 1 - alpha,
        "ci_by": by,
        "n_boot": int(n_boot),
        "metrics": metrics,
        "trivial": {"everything_malignant": _trivial(y, 1), "everything_benign": _trivial(y, 0)},
        "verdict": verdict,
        "verdict_reason": reason,
    }


def group_scores(
    p_pos: np.ndarray, groups: np.ndarray, y: np.ndarray | None = None, *, threshold: float = 0.5
) -> list[dict]:
    """Score summary per group (``(N,)`` subtypes, magnifications), highest mean score first.

    Ranking BreakHis subtypes by the model's mean malignancy score shows which tissue it takes for
    IDC (e.g. fibroadenoma above lobular carcinoma). A group's ``label`` is ``"benign"`` /
    ``"malignant"`` when all its samples share that label ``y``, else ``None`` (also without ``y``);
    ``frac_called_malignant`` counts ``p_pos >= threshold``.

    Returns:
        One ``dict(group, n, label, mean, median, frac_called_malignant)`` per group, sorted by
        ``mean`` descending (ties by group name).
    """
    p = np.asarray(p_pos, dtype=np.float64)
    g = np.asarray(groups)
    if p.ndim != 1 or g.shape != p.shape:
        raise ValueError(f"p_pos and groups must be 1-D of equal length, got {p.shape} and {g.shape}")
    labels = None
    if y is not None:
        labels = np.asarray(y)
        if labels.shape != p.shape:
            raise ValueError(f"y must have shape {p.shape}, got {labels.shape}")
    out = []
    for name in np.unique(g):
        m = g == name  # (N,) members of this group
        present = np.unique(labels[m]) if labels is not None else ()
        label = LABEL_NAMES.get(int(present[0])) if len(present) == 1 else None
        out.append(
            {
                "group": _native(name),
                "n": int(m.sum()),
                "label": label,
                "mean": float(p[m].mean()),
                "median": float(np.median(p[m])),
                "frac_called_malignant": float(np.mean(p[m] >= threshold)),
            }
        )
    return sorted(out, key=lambda r: (-r["mean"], str(r["group"])))


def field_of_view(
    image_hw: tuple[int, int], image_mpp: float, patch_mpp: float, patch_hw: tuple[int, int]
) -> float:
    """How many training patches of physical area fit into one target image (area ratio).

    ``(H * image_mpp) * (W * image_mpp) / ((pH * patch_mpp) * (pW * patch_mpp))``: e.g. a 700x460
    image at 0.49 µm/px against 50x50 IDC patches at 4.0 µm/px (200 µm square) spans ≈ 1.93
    patches, so a model that saw 200 µm of tissue per decision is shown ~2x that area squeezed.
    """
    if min(image_mpp, patch_mpp, *image_hw, *patch_hw) <= 0:
        raise ValueError("sizes and microns per pixel must be positive")
    image_um2 = image_hw[0] * image_mpp * image_hw[1] * image_mpp
    patch_um2 = patch_hw[0] * patch_mpp * patch_hw[1] * patch_mpp
    return float(image_um2 / patch_um2)


def _mag_key(m: Any) -> tuple[int, str]:
    from cmafnet.data.scale import magnification_number

    return magnification_number(m), str(m)


def field_of_view_table(rows: Sequence[dict], *, patch_mpp: float, patch_hw: tuple[int, int]) -> list[dict]:
    """Field of view per magnification, against a run's training patch scale.

    An image counts as ``smaller_than_patch`` when, resampled to ``patch_mpp`` (sizes rounded as
    :func:`cmafnet.inference.resampling.resample` rounds them), either side is shorter than the
    patch's; it is ``excluded`` when it also covers less than ``MIN_COVERAGE`` of a patch, the
    rule by which the scale-matched evaluation leaves it out (a larger one is padded with white).

    ``rows``: one dict per image with ``magnification``, ``h``, ``w`` (pixels) and ``mpp`` (µm/px;
    ``None`` when unknown); ``patch_mpp`` and ``patch_hw`` (pixels) are the run's training patch.

    Returns:
        Per magnification (ascending): ``dict(magnification, images, mpp_unknown,
        patches_per_image, smaller_than_patch, excluded)``; ``patches_per_image`` is the mean of
        :func:`field_of_view` over the images of known µm/px (``None`` when there is none).
    """
    from cmafnet.inference.resampling import MIN_COVERAGE

    th, tw = patch_hw
    by_mag: dict[Any, list[dict]] = {}
    for r in rows:
        by_mag.setdefault(_native(r["magnification"]), []).append(r)
    out = []
    for mag in sorted(by_mag, key=_mag_key):
        fovs, small, excluded, unknown = [], 0, 0, 0
        for r in by_mag[mag]:
            mpp = r.get("mpp")
            if mpp is None or not math.isfinite(float(mpp)):
                unknown += 1
                continue
            h, w = int(r["h"]), int(r["w"])
            fovs.append(field_of_view((h, w), float(mpp), patch_mpp, patch_hw))
            f = float(mpp) / patch_mpp  # resampled pixels per image pixel
            rh, rw = max(1, round(h * f)), max(1, round(w * f))
            if rh < th or rw < tw:
                small += 1
                excluded += (min(rh, th) * min(rw, tw)) / (th * tw) < MIN_COVERAGE
        out.append(
            {
                "magnification": mag,
                "images": len(by_mag[mag]),
                "mpp_unknown": unknown,
                "patches_per_image": float(np.mean(fovs)) if fovs else None,
                "smaller_than_patch": small,
                "excluded": int(excluded),
            }
        )
    return out
