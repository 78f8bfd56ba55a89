"""Statistics over predictions and runs: exact McNemar, bootstrap intervals, mean ± std over seeds."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import sklearn
from scipy.stats import binomtest


def mcnemar(y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray) -> dict:
    """Exact (binomial) McNemar test between two classifiers' paired predictions.

    Only the discordant pairs carry information: ``b`` = A right and B wrong, ``c`` = A wrong and
    B right. Under H0 (equal error rates) ``b ~ Binomial(b + c, 1/2)``; the two-sided p-value is
    ``scipy.stats.binomtest(b, b + c, 0.5)``. ``statistic`` is ``min(b, c)`` (as statsmodels'
    exact test reports it). With no discordant pair the p-value is 1.

    Returns:
        ``dict(b, c, n, statistic, pvalue, acc_a, acc_b)``.
    """
    y = np.asarray(y_true)
    a = np.asarray(pred_a)
    bb = np.asarray(pred_b)
    if not (y.shape == a.shape == bb.shape) or y.ndim != 1:
        raise ValueError(f"paired predictions need equal 1-D shapes, got {y.shape}, {a.shape}, {bb.shape}")
    if y.size == 0:
        raise ValueError("no paired predictions")
    ok_a, ok_b = a == y, bb == y
    b = int(np.sum(ok_a & ~ok_b))
    c = int(np.sum(~ok_a & ok_b))
    pvalue = float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue) if b + c > 0 else 1.0
    return {
        "b": b,
        "c": c,
        "n": int(y.size),
        "statistic": min(b, c),
        "pvalue": pvalue,
        "acc_a": float(ok_a.mean()),
        "acc_b": float(ok_b.mean()),
    }


def _resamples(n: int, groups: np.ndarray | None, n_boot: int, seed: int):
    """Yield ``n_boot`` bootstrap index arrays: samples, or whole groups (patients), with replacement."""
    rng = np.random.default_rng(seed)
    if groups is None:
        for _ in range(n_boot):
            yield rng.integers(0, n, size=n)
        return
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups must have shape ({n},), got {groups.shape}")
    _, inv = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inv == g) for g in range(inv.max() + 1)]
    for _ in range(n_boot):
        pick = rng.integers(0, len(members), size=len(members))
        yield np.concatenate([members[g] for g in pick])


def _bootstrap(
    metrics: Callable[[np.ndarray], dict],
    n: int,
    keys: Sequence[str],
    groups: np.ndarray | None,
    n_boot: int,
    alpha: float,
    seed: int,
    point: Callable[[], dict] | None = None,
) -> dict[str, dict]:
    """Percentile intervals of ``metrics(indices)[k]`` for each of ``keys``, from one set of resamples;
    the point estimates are ``point()`` (default: ``metrics`` of every sample)."""
    if n <= 0:
        raise ValueError("bootstrap needs at least one sample")
    if not 0 < alpha < 1:
        raise ValueError("alpha must be in (0, 1)")
    point_values = point() if point else metrics(np.arange(n))
    values: dict[str, list[float]] = {k: [] for k in keys}
    # The point estimate ran sklearn's input checks; resamples of the same data skip them (most of the cost).
    with sklearn.config_context(skip_parameter_validation=True, assume_finite=True):
        for idx in _resamples(n, groups, n_boot, seed):
            m = metrics(idx)
            for k in keys:
                if (v := m.get(k)) is not None and math.isfinite(v):
                    values[k].append(float(v))
    out, by = {}, "patient" if groups is not None else "sample"
    for k in keys:
        low = high = None
        if values[k]:
            low, high = (float(x) for x in np.percentile(values[k], [100 * alpha / 2, 100 * (1 - alpha / 2)]))
        ok = isinstance(p := point_values.get(k), (int, float)) and math.isfinite(p)
        out[k] = {
            "point": float(p) if ok else None,
            "low": low,
            "high": high,
            "level": 1 - alpha,
            "n_boot": n_boot,
            "n_valid": len(values[k]),
            "by": by,
        }
    return out


def bootstrap_ci(
    metric: Callable[[np.ndarray], float | None],
    n: int,
    *,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict:
    """Percentile bootstrap confidence interval of ``metric(indices)``.

    ``metric`` receives an index array into the evaluated samples (so it can compute anything
    from paired arrays) and returns a float, or ``None`` when the resample leaves it undefined
    (e.g. AUROC on a one-class resample); such resamples are skipped and counted.

    Args:
        metric: function of an index array.
        n: number of samples.
        groups: optional ``(n,)`` group ids (patients): whole groups are resampled with
            replacement, which respects the correlation of patches from one patient.
        n_boot: number of bootstrap resamples.
        alpha: 1 - confidence level.

    Returns:
        ``dict(point, low, high, level, n_boot, n_valid, by)``; ``low``/``high`` are ``None`` when
        no resample gave a defined value.
    """
    return _bootstrap(lambda idx: {"v": metric(idx)}, n, ["v"], groups, n_boot, alpha, seed)["v"]


def metric_cis(
    y_true: np.ndarray,
    probs: np.ndarray,
    *,
    keys: Sequence[str] = ("balanced_accuracy", "auprc", "auroc", "sensitivity", "specificity", "f1", "mcc"),
    threshold: float = 0.5,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, dict]:
    """Bootstrap CIs for several :func:`classification_metrics` keys from one set of resamples."""
    from cmafnet.evaluation.metrics import classification_metrics, selected_metrics

    y, p = np.asarray(y_true), np.asarray(probs)
    return _bootstrap(
        lambda idx: selected_metrics(y[idx], p[idx], keys, threshold),
        len(y),
        keys,
        groups,
        n_boot,
        alpha,
        seed,
        point=lambda: classification_metrics(y, p, threshold),
    )


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and sample standard deviation (``ddof=1``) of the defined values, and their count.

    The std is ``None`` with fewer than two values (a single seed has no spread).
    """
    vals = np.array([float(v) for v in values if v is not None and math.isfinite(float(v))])
    if vals.size == 0:
        return None, None, 0
    std = float(np.std(vals, ddof=1)) if vals.size > 1 else None
    return float(vals.mean()), std, int(vals.size)
