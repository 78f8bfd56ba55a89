"""Classification metrics for binary (IDC, zero-shot BreakHis) and multi-class (BreakHis subtypes).

All arithmetic comes from scikit-learn; only the expected calibration error (equal-width bins) is
written here. Every value in the returned dict is JSON-serialisable and never NaN:

* A metric that is mathematically undefined on the given data (sensitivity without positives,
  AUROC with a single class, ...) is ``None`` and ``result["undefined"][name]`` says why.
* Where scikit-learn defines a convention we keep it and say so in ``docs/decisions/evaluation.md``:
  MCC is 0 when a row or column of the confusion matrix is empty; F1 of a class that is never
  predicted is 0 (``zero_division=0``); normalised confusion rows without support are all zeros.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    matthews_corrcoef,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

# Why a binary metric is None (the data leave it undefined).
UNDEFINED_BINARY = {
    "sensitivity": "no positive (class 1) samples",
    "specificity": "no negative (class 0) samples",
    "precision": "no sample predicted positive",
    "balanced_accuracy": "only one class present in y_true",
    "f1": "no positive samples and none predicted",
    "auroc": "only one class present in y_true",
    "auprc": "no positive (class 1) samples",
}
BINARY_SCALARS = (*UNDEFINED_BINARY, "mcc", "accuracy", "brier")
MULTI_SCALARS = ("macro_f1", "weighted_f1", "balanced_accuracy", "mcc", "accuracy")


def _check_inputs(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"probs must have shape (N, C) with C >= 2, got {p.shape}")
    if y.ndim != 1 or y.shape[0] != p.shape[0]:
        raise ValueError(f"y_true must have shape ({p.shape[0]},), got {y.shape}")
    if y.shape[0] == 0:
        raise ValueError("no samples to evaluate (empty y_true)")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError("y_true must hold integer class indices")
        y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f"y_true holds class indices outside [0, {p.shape[1] - 1}]")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contain NaN or inf")
    if p.min() < -1e-6 or p.max() > 1 + 1e-6 or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("probs must be probabilities (rows in [0, 1] summing to 1); apply softmax first")
    return y.astype(np.int64), np.clip(p, 0.0, 1.0)


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE (Guo et al., 2017) with ``n_bins`` equal-width confidence bins.

    ``sum_b |B_b|/N * |acc(B_b) - conf(B_b)|`` where confidence is the largest class probability
    and accuracy is whether its argmax equals the label.
    """
    y, p = _check_inputs(y_true, probs)
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    # Bin b holds conf in (edge_b, edge_{b+1}]; conf == 0 cannot occur for C >= 2 (max >= 1/C).
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def _clean(value: Any) -> Any:
    """Floats (numpy or not) to plain floats; NaN/inf become None so JSON and reports stay clean."""
    if isinstance(value, (float, np.floating)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _quiet(fn):
    """Silence sklearn's undefined-metric warnings: undefined values are reported in ``undefined``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            warnings.filterwarnings(
                "ignore", message=".*(y_pred contains classes|only one class|single label).*"
            )
            return fn(*args, **kwargs)

    return wrapper


@_quiet
def classification_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    threshold: float = 0.5,
    class_names: Sequence[str] | None = None,
    *,
    n_bins: int = 15,
) -> dict:
    """Metrics of predicted class probabilities against integer labels.

    Args:
        y_true: ``(N,)`` integer labels in ``[0, C)``.
        probs: ``(N, C)`` class probabilities (softmax output).
        threshold: binary only: predict positive (class 1) when ``probs[:, 1] >= threshold``.
        class_names: names for ``per_class_recall`` (default ``"0"``, ``"1"``, ...).
        n_bins: equal-width bins for the expected calibration error.

    Returns:
        Binary (``C == 2``): sensitivity, specificity, precision, balanced_accuracy, auprc (average
        precision), auroc, mcc, f1, ece, brier, accuracy, confusion ``[[tn, fp], [fn, tp]]``,
        threshold, n, n_pos, n_neg. Multi-class: macro_f1, weighted_f1, balanced_accuracy, mcc,
        accuracy, ece, per_class_recall (by name), confusion and confusion_normalized (rows = true
        class), n, support. Both: ``undefined``: ``{metric: reason}`` for every metric that is
        ``None`` because the data leave it undefined.
    """
    y, p = _check_inputs(y_true, probs)
    n_classes = p.shape[1]
    names = [str(c) for c in (class_names if class_names is not None else range(n_classes))]
    if len(names) != n_classes:
        raise ValueError(f"{len(names)} class names for {n_classes} probability columns")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    out: dict[str, Any] = {"n": int(y.size)}
    if n_classes == 2:
        pred = (p[:, 1] >= threshold).astype(np.int64)
        tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[0, 1]).ravel())
        out.update(threshold=float(threshold), n_pos=tp + fn, n_neg=tn + fp)
        out.update(_scores(y, p, BINARY_SCALARS, threshold))
        out["confusion"] = [[tn, fp], [fn, tp]]
        undefined = {k: why for k, why in UNDEFINED_BINARY.items() if out[k] is None}
    else:
        pred = p.argmax(axis=1)
        labels = list(range(n_classes))
        cm = confusion_matrix(y, pred, labels=labels)
        support = cm.sum(axis=1)
        out["support"] = {names[c]: int(support[c]) for c in labels}
        # Averages over the classes present in y_true or predicted (sklearn's default label set);
        # a class absent from both has no F1 and must not count as 0.
        out.update(_scores(y, p, MULTI_SCALARS))
        recalls = recall_score(y, pred, labels=labels, average=None, zero_division=0)
        out["per_class_recall"] = {names[c]: float(recalls[c]) if support[c] else None for c in labels}
        undefined = {f"recall[{names[c]}]": "class absent from y_true" for c in labels if not support[c]}
        out["confusion"] = cm.astype(int).tolist()
        out["confusion_normalized"] = confusion_matrix(y, pred, labels=labels, normalize="true").tolist()
        if len(np.unique(y)) < 2:
            undefined["balanced_accuracy"] = "only one class present in y_true (value is its recall)"
    out["ece"] = expected_calibration_error(y, p, n_bins)
    out["class_names"] = names
    out["undefined"] = undefined
    return {k: _clean(v) for k, v in out.items()}


def threshold_for_sensitivity(y_true: np.ndarray, p_pos: np.ndarray, target: float) -> float:
    """Highest threshold whose sensitivity (``p_pos >= t``) reaches ``target``.

    The highest such threshold gives the best specificity at that sensitivity. Uses
    ``sklearn.metrics.roc_curve`` without dropping intermediate points.

    Raises:
        ValueError: when ``y_true`` holds no positive sample (sensitivity undefined).
    """
    y = np.asarray(y_true).astype(np.int64)
    s = np.asarray(p_pos, dtype=np.float64)
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    if y.shape != s.shape or y.size == 0:
        raise ValueError("y_true and p_pos must be non-empty and of equal length")
    if not (y == 1).any():
        raise ValueError("cannot choose a threshold for a target sensitivity: no positive samples")
    if not (y == 0).any():
        # roc_curve needs both classes; the smallest score keeps every positive.
        return float(s.min())
    _, tpr, thr = roc_curve(y, s, pos_label=1, drop_intermediate=False)
    i = int(np.argmax(tpr >= target - 1e-12))  # tpr is non-decreasing; tpr[-1] == 1
    return float(min(thr[i], 1.0))


@_quiet
def sensitivity_at_specificity(y_true: np.ndarray, p_pos: np.ndarray, specificity: float) -> float | None:
    """Best sensitivity among thresholds whose specificity is at least ``specificity`` (ROC curve)."""
    y = np.asarray(y_true).astype(np.int64)
    if len(np.unique(y)) < 2:
        return None
    fpr, tpr, _ = roc_curve(y, np.asarray(p_pos, dtype=np.float64), drop_intermediate=False)
    ok = (1.0 - fpr) >= specificity - 1e-12
    return float(tpr[ok].max()) if ok.any() else None


# Metrics shown as fractions (as the paper prints AUPRC, MCC and F1); the rest as percentages.
FRACTION_METRICS = ("auprc", "auroc", "mcc", "f1", "ece", "brier")


def format_metric_for(key: str, value: Any) -> str:
    """A metric for a table in the display convention of ``key``: a fraction (3 d.p.) or a percentage
    (2 d.p.); ``None`` or non-finite -> ``"n/a"``."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.3f}" if key in FRACTION_METRICS else f"{100 * value:.2f}"


@_quiet
def selected_metrics(
    y_true: np.ndarray, probs: np.ndarray, keys: Sequence[str], threshold: float = 0.5
) -> dict:
    """Only ``keys`` of :func:`classification_metrics`, with the same definitions and ``None`` rules.

    The bootstrap calls this thousands of times: it skips input checks and everything not asked
    for. Keys outside the fast set fall back to :func:`classification_metrics`.
    """
    y = np.asarray(y_true).astype(np.int64)
    p = np.asarray(probs, dtype=np.float64)
    fast = (*(BINARY_SCALARS if p.shape[1] == 2 else MULTI_SCALARS), "ece")
    out = _scores(y, p, [k for k in keys if k in fast], threshold)
    if len(out) < len(keys):
        full = classification_metrics(y, p, threshold)
        out.update({k: full.get(k) for k in keys if k not in out})
    return {k: _clean(out[k]) for k in keys}


def _scores(y: np.ndarray, p: np.ndarray, keys: Sequence[str], threshold: float = 0.5) -> dict[str, Any]:
    """The scalar metrics ``keys`` of checked labels and probabilities (None where undefined)."""
    binary = p.shape[1] == 2
    pred = (p[:, 1] >= threshold).astype(np.int64) if binary else p.argmax(1)
    has_pos, has_neg = bool((y == 1).any()), bool((y == 0).any())
    both = len(np.unique(y)) >= 2
    scores = {
        "sensitivity": lambda: recall_score(y, pred, pos_label=1, zero_division=0) if has_pos else None,
        "specificity": lambda: recall_score(y, pred, pos_label=0, zero_division=0) if has_neg else None,
        "precision": lambda: precision_score(y, pred, zero_division=0) if pred.any() else None,
        "balanced_accuracy": lambda: balanced_accuracy_score(y, pred) if both or not binary else None,
        "f1": lambda: f1_score(y, pred, zero_division=0) if has_pos or pred.any() else None,
        "auroc": lambda: roc_auc_score(y, p[:, 1]) if both else None,
        "auprc": lambda: average_precision_score(y, p[:, 1]) if has_pos else None,
        "brier": lambda: brier_score_loss(y, p[:, 1], pos_label=1),
        "macro_f1": lambda: f1_score(y, pred, average="macro", zero_division=0),
        "weighted_f1": lambda: f1_score(y, pred, average="weighted", zero_division=0),
        "mcc": lambda: matthews_corrcoef(y, pred),
        "accuracy": lambda: accuracy_score(y, pred),
        "ece": lambda: expected_calibration_error(y, p),
    }
    return {k: None if (v := scores[k]()) is None else float(v) for k in keys}
