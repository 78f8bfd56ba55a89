"""Exact McNemar, bootstrap intervals, mean and std over seeds."""

import numpy as np
import pytest
from scipy.stats import binomtest

from cmafnet.evaluation.metrics import classification_metrics
from cmafnet.evaluation.stats import bootstrap_ci, mcnemar, mean_std, metric_cis


def _paired(b: int, c: int, both_right: int, both_wrong: int):
    """Labels and two prediction vectors with exactly b (A right, B wrong) and c discordant pairs."""
    y = np.zeros(b + c + both_right + both_wrong, int)
    a = np.concatenate([np.zeros(b), np.ones(c), np.zeros(both_right), np.ones(both_wrong)]).astype(int)
    bb = np.concatenate([np.ones(b), np.zeros(c), np.zeros(both_right), np.ones(both_wrong)]).astype(int)
    return y, a, bb


@pytest.mark.parametrize(("b", "c"), [(10, 2), (3, 3), (0, 7), (25, 40), (1, 0)])
def test_mcnemar_equals_binomtest(b, c):
    y, pa, pb = _paired(b, c, 50, 5)
    r = mcnemar(y, pa, pb)
    assert (r["b"], r["c"]) == (b, c)
    assert r["pvalue"] == pytest.approx(binomtest(b, b + c, 0.5).pvalue)
    assert r["statistic"] == min(b, c)


def test_mcnemar_no_discordant_pairs():
    y, pa, pb = _paired(0, 0, 10, 3)
    assert mcnemar(y, pa, pb)["pvalue"] == 1.0
    with pytest.raises(ValueError, match="shapes"):
        mcnemar(y, pa, pb[:-1])


def test_bootstrap_contains_point_and_narrows():
    rng = np.random.default_rng(0)
    widths = []
    for n in (50, 800):
        x = rng.normal(1.0, 1.0, n)
        ci = bootstrap_ci(lambda i, x=x: float(x[i].mean()), n, n_boot=400, seed=1)
        assert ci["low"] <= ci["point"] <= ci["high"]
        assert ci["n_valid"] == 400
        widths.append(ci["high"] - ci["low"])
    assert widths[1] < widths[0] / 2  # ~ 1/sqrt(n): 4x narrower expected


def test_bootstrap_by_patient_is_wider_for_clustered_data():
    rng = np.random.default_rng(3)
    patients = np.repeat(np.arange(20), 30)
    x = rng.normal(0, 1, 20)[patients] + rng.normal(0, 0.1, patients.size)  # strong patient effect
    f = lambda i: float(x[i].mean())  # noqa: E731
    by_sample = bootstrap_ci(f, x.size, n_boot=300)
    by_patient = bootstrap_ci(f, x.size, groups=patients, n_boot=300)
    assert by_patient["by"] == "patient"
    assert (by_patient["high"] - by_patient["low"]) > 2 * (by_sample["high"] - by_sample["low"])


def test_metric_cis_skip_undefined_resamples():
    rng = np.random.default_rng(4)
    y = np.array([1] + [0] * 29)  # most resamples have no positive -> AUROC undefined
    s = rng.random(30)
    cis = metric_cis(y, np.stack([1 - s, s], 1), keys=("auroc", "specificity"), n_boot=50)
    assert cis["auroc"]["n_valid"] < 50
    assert cis["specificity"]["n_valid"] == 50
    assert cis["specificity"]["point"] == classification_metrics(y, np.stack([1 - s, s], 1))["specificity"]


def test_mean_std():
    vals = [0.9492, 0.95, 0.94, 0.96, None]
    mean, std, n = mean_std(vals)
    assert (
        n == 4 and mean == pytest.approx(np.mean(vals[:4])) and std == pytest.approx(np.std(vals[:4], ddof=1))
    )
    assert mean_std([0.5]) == (0.5, None, 1) and mean_std([None]) == (None, None, 0)
