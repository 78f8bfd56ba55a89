"""classification_metrics equals scikit-learn and stays defined on degenerate inputs."""

import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from cmafnet.evaluation.metrics import (
    classification_metrics,
    expected_calibration_error,
    threshold_for_sensitivity,
)


def _no_nan(obj) -> None:
    """Recursively assert no NaN/inf anywhere and JSON serialisable with allow_nan=False."""
    json.dumps(obj, allow_nan=False)


@pytest.fixture
def binary_data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    score = np.clip(0.35 * y + rng.random(200) * 0.65, 0, 1)
    return y, np.stack([1 - score, score], 1)


def test_binary_equals_sklearn(binary_data):
    y, p = binary_data
    m = classification_metrics(y, p, threshold=0.4)
    pred = (p[:, 1] >= 0.4).astype(int)
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    assert m["confusion"] == [[tn, fp], [fn, tp]]
    assert m["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["auprc"] == pytest.approx(skm.average_precision_score(y, p[:, 1]))
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, p[:, 1]))
    assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["n"] == 200 and m["n_pos"] == int(y.sum())
    assert m["undefined"] == {}
    _no_nan(m)


def test_threshold_changes_predictions(binary_data):
    y, p = binary_data
    lo, hi = classification_metrics(y, p, 0.1), classification_metrics(y, p, 0.9)
    assert lo["sensitivity"] > hi["sensitivity"]
    assert lo["specificity"] < hi["specificity"]
    assert lo["auroc"] == hi["auroc"]  # ranking metrics do not depend on the threshold


def test_ece_known_values():
    # All predictions confident 0.9 and all correct -> ECE = |1 - 0.9| = 0.1.
    y = np.array([1, 1, 0, 0])
    p = np.array([[0.1, 0.9], [0.1, 0.9], [0.9, 0.1], [0.9, 0.1]])
    assert expected_calibration_error(y, p, 10) == pytest.approx(0.1)
    # Half right at confidence 0.75 in one bin -> |0.5 - 0.75| = 0.25.
    y2 = np.array([1, 0])
    p2 = np.array([[0.25, 0.75], [0.25, 0.75]])
    assert expected_calibration_error(y2, p2, 10) == pytest.approx(0.25)


def test_single_class_binary_is_defined_not_nan():
    rng = np.random.default_rng(1)
    s = rng.random(20)
    p = np.stack([1 - s, s], 1)
    m = classification_metrics(np.zeros(20, int), p)
    assert m["sensitivity"] is None and "sensitivity" in m["undefined"]
    assert m["auroc"] is None and m["auprc"] is None
    assert m["specificity"] == pytest.approx(np.mean(s < 0.5))
    assert m["mcc"] == 0.0  # sklearn's convention for a degenerate confusion matrix
    _no_nan(m)
    m1 = classification_metrics(np.ones(20, int), p)
    assert m1["specificity"] is None and m1["auprc"] == pytest.approx(1.0)
    _no_nan(m1)


def test_nothing_predicted_positive():
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.9, 0.1]] * 4)
    m = classification_metrics(y, p)
    assert m["sensitivity"] == 0.0 and m["precision"] is None and m["f1"] == 0.0
    _no_nan(m)


def test_multiclass_equals_sklearn_with_absent_class():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 120)  # class 3 never occurs in y_true
    logits = rng.normal(size=(120, 4)) + 2.0 * np.eye(4)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    names = ["A", "F", "PT", "TA"]
    m = classification_metrics(y, p, class_names=names)
    pred = p.argmax(1)
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["weighted_f1"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["mcc"] == pytest.approx(skm.matthews_corrcoef(y, pred))
    rec = skm.recall_score(y, pred, labels=[0, 1, 2], average=None)
    assert [m["per_class_recall"][n] for n in names[:3]] == pytest.approx(list(rec))
    assert m["per_class_recall"]["TA"] is None and "recall[TA]" in m["undefined"]
    cm = np.array(m["confusion"])
    assert cm.shape == (4, 4) and cm.sum() == 120
    norm = np.array(m["confusion_normalized"])
    assert norm[:3].sum(1) == pytest.approx(np.ones(3)) and norm[3].sum() == 0.0
    _no_nan(m)


def test_multiclass_single_class_no_crash():
    p = np.full((5, 8), 1 / 8)
    m = classification_metrics(np.full(5, 4), p)
    assert m["balanced_accuracy"] is not None and not math.isnan(m["balanced_accuracy"])
    _no_nan(m)


@pytest.mark.parametrize(
    ("y", "p", "msg"),
    [
        (np.array([0, 1]), np.array([[0.5, 0.5]]), "shape"),
        (np.array([0, 2]), np.array([[0.5, 0.5], [0.5, 0.5]]), "outside"),
        (np.array([0, 1]), np.array([[2.0, -1.0], [0.5, 0.5]]), "probabilities"),
        (np.array([0, 1]), np.array([[np.nan, 0.5], [0.5, 0.5]]), "NaN"),
        (np.array([], int), np.zeros((0, 2)), "no samples"),
    ],
)
def test_bad_input_raises_clear_error(y, p, msg):
    with pytest.raises(ValueError, match=msg):
        classification_metrics(y, p)


def test_threshold_for_sensitivity(binary_data):
    y, p = binary_data
    for target in (0.8, 0.95, 1.0):
        t = threshold_for_sensitivity(y, p[:, 1], target)
        sens = np.mean(p[y == 1, 1] >= t)
        assert sens >= target
        # Any higher threshold (the next larger positive score) misses the target.
        higher = p[y == 1, 1][p[y == 1, 1] > t]
        if higher.size:
            assert np.mean(p[y == 1, 1] >= higher.min()) < target
    with pytest.raises(ValueError, match="no positive"):
        threshold_for_sensitivity(np.zeros(4, int), np.ones(4) * 0.3, 0.9)


@pytest.mark.parametrize("case", ["random", "one_class", "none_predicted", "multiclass"])
def test_selected_metrics_match_full_metrics(case):
    from cmafnet.evaluation.metrics import selected_metrics

    rng = np.random.default_rng(5)
    if case == "multiclass":
        y = rng.integers(0, 3, 40)
        p = rng.dirichlet(np.ones(4), 40)
        keys = ["macro_f1", "weighted_f1", "balanced_accuracy", "mcc", "accuracy", "ece"]
    else:
        y = {
            "random": rng.integers(0, 2, 40),
            "one_class": np.zeros(40, int),
            "none_predicted": np.arange(40) % 2,
        }[case]
        s = rng.random(40) * (0.4 if case == "none_predicted" else 1.0)
        p = np.stack([1 - s, s], 1)
        keys = [
            "sensitivity",
            "specificity",
            "balanced_accuracy",
            "auprc",
            "auroc",
            "mcc",
            "f1",
            "accuracy",
            "ece",
        ]
    full = classification_metrics(y, p, 0.5)
    fast = selected_metrics(y, p, keys, 0.5)
    for k in keys:
        assert fast[k] == pytest.approx(full[k]) if full[k] is not None else fast[k] is None, k


def test_sensitivity_at_specificity_matches_roc_curve(binary_data):
    from cmafnet.evaluation.metrics import sensitivity_at_specificity

    y, p = binary_data
    fpr, tpr, _ = skm.roc_curve(y, p[:, 1], drop_intermediate=False)
    assert sensitivity_at_specificity(y, p[:, 1], 0.9) == pytest.approx(tpr[fpr <= 0.1 + 1e-12].max())
    assert sensitivity_at_specificity(np.zeros(5, int), p[:5, 1], 0.9) is None
