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
    recall_score,
    roc_auc_score,
    roc_curve,
)

BINARY_KEYS = (
    "sensitivity", "specificity", "precision", "balanced_accuracy", "auprc", "auroc", "mcc", "f1",
    "ece", "brier", "accuracy",
)  # fmt: skip
MULTICLASS_KEYS = ("macro_f1", "weighted_f1", "balanced_accuracy", "mcc", "accuracy", "ece")


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


def _safe_div(num: float, den: float) -> float | None:
    return float(num / den) if den > 0 else None


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
    undefined: dict[str, str] = {}
    present = np.unique(y)
    out: dict[str, Any] = {"n": int(y.size)}

    if n_classes == 2:
        score = p[:, 1]
        pred = (score >= threshold).astype(np.int64)
        tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, pred, labels=[0, 1]).ravel())
        n_pos, n_neg = tp + fn, tn + fp
        out.update(threshold=float(threshold), n_pos=n_pos, n_neg=n_neg)
        # Sensitivity / specificity through sklearn's recall so the arithmetic is not ours.
        out["sensitivity"] = float(recall_score(y, pred, pos_label=1, zero_division=0)) if n_pos else None
        out["specificity"] = float(recall_score(y, pred, pos_label=0, zero_division=0)) if n_neg else None
        out["precision"] = _safe_div(tp, tp + fp)
        if n_pos == 0:
            undefined["sensitivity"] = "no positive (class 1) samples"
        if n_neg == 0:
            undefined["specificity"] = "no negative (class 0) samples"
        if tp + fp == 0:
            undefined["precision"] = "no sample predicted positive"
        if n_pos and n_neg:
            out["balanced_accuracy"] = float(balanced_accuracy_score(y, pred))
        else:
            out["balanced_accuracy"] = None
            undefined["balanced_accuracy"] = "only one class present in y_true"
        if tp + fp + fn > 0:
            out["f1"] = float(f1_score(y, pred, pos_label=1, zero_division=0))
        else:
            out["f1"] = None
            undefined["f1"] = "no positive samples and none predicted"
        if len(present) == 2:
            out["auroc"] = float(roc_auc_score(y, score))
            out["auprc"] = float(average_precision_score(y, score))
        else:
            out["auroc"] = None
            undefined["auroc"] = "only one class present in y_true"
            if n_pos:  # all positive: average precision is defined (= 1 at every recall)
                out["auprc"] = float(average_precision_score(y, score))
            else:
                out["auprc"] = None
                undefined["auprc"] = "no positive (class 1) samples"
        out["mcc"] = float(matthews_corrcoef(y, pred))
        out["accuracy"] = float(accuracy_score(y, pred))
        out["brier"] = float(brier_score_loss(y, score, pos_label=1))
        out["confusion"] = [[tn, fp], [fn, tp]]
    else:
        pred = p.argmax(axis=1)
        labels = list(range(n_classes))
        cm = confusion_matrix(y, pred, labels=labels)
        support = cm.sum(axis=1)
        out["support"] = {names[c]: int(support[c]) for c in labels}
        # Averages over the classes present in y_true or predicted (sklearn's default label set);
        # a class absent from both has no F1 and must not count as 0.
        out["macro_f1"] = float(f1_score(y, pred, average="macro", zero_division=0))
        out["weighted_f1"] = float(f1_score(y, pred, average="weighted", zero_division=0))
        out["balanced_accuracy"] = float(balanced_accuracy_score(y, pred))
        out["mcc"] = float(matthews_corrcoef(y, pred))
        out["accuracy"] = float(accuracy_score(y, pred))
        recalls = recall_score(y, pred, labels=labels, average=None, zero_division=0)
        out["per_class_recall"] = {}
        for c in labels:
            if support[c]:
                out["per_class_recall"][names[c]] = float(recalls[c])
            else:
                out["per_class_recall"][names[c]] = None
                undefined[f"recall[{names[c]}]"] = "class absent from y_true"
        out["confusion"] = cm.astype(int).tolist()
        out["confusion_normalized"] = confusion_matrix(y, pred, labels=labels, normalize="true").tolist()
        if len(present) < 2:
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
    """``format_metric`` with the display convention of ``key``: percent (2 d.p.) or fraction (3 d.p.)."""
    if key in FRACTION_METRICS:
        return format_metric(value, 3, percent=False)
    return format_metric(value, 2, percent=True)


def format_metric(value: Any, digits: int = 2, percent: bool = True) -> str:
    """A metric for a table: ``None`` -> ``"n/a"``, else a percentage (or plain) with ``digits``."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{100 * value:.{digits}f}" if percent else f"{value:.{digits}f}"


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
    binary = p.shape[1] == 2
    pred = (p[:, 1] >= threshold).astype(np.int64) if binary else p.argmax(1)
    has_pos, has_neg = bool((y == 1).any()), bool((y == 0).any())
    both = len(np.unique(y)) >= 2
    out: dict[str, float | None] = {}
    full = None
    for k in keys:
        if binary and k == "sensitivity":
            out[k] = float(recall_score(y, pred, pos_label=1, zero_division=0)) if has_pos else None
        elif binary and k == "specificity":
            out[k] = float(recall_score(y, pred, pos_label=0, zero_division=0)) if has_neg else None
        elif binary and k == "balanced_accuracy":
            out[k] = float(balanced_accuracy_score(y, pred)) if both else None
        elif binary and k == "auroc":
            out[k] = float(roc_auc_score(y, p[:, 1])) if both else None
        elif binary and k == "auprc":
            out[k] = float(average_precision_score(y, p[:, 1])) if has_pos else None
        elif binary and k == "f1":
            out[k] = float(f1_score(y, pred, zero_division=0)) if (has_pos or pred.any()) else None
        elif k == "mcc":
            out[k] = float(matthews_corrcoef(y, pred))
        elif k == "accuracy":
            out[k] = float(accuracy_score(y, pred))
        elif not binary and k == "balanced_accuracy":
            out[k] = float(balanced_accuracy_score(y, pred))
        elif not binary and k in ("macro_f1", "weighted_f1"):
            out[k] = float(f1_score(y, pred, average=k.split("_")[0], zero_division=0))
        else:
            full = full or classification_metrics(y, p, threshold)
            out[k] = full.get(k)
    return {k: _clean(v) for k, v in out.items()}
