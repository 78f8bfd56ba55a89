"""The rows of an evaluation: every metric set with the threshold it belongs to, its CIs and caveats.

An evaluation document holds, for one set of predictions:

* ``metrics``: at threshold 0.5 (argmax for multi-class), ``metrics_rule`` says so;
* ``operating_point``: the run's operating threshold (value, how and where it was chosen, at
  which temperature) with its ``metrics``, ``ci`` and a ``rule`` sentence;
* ``by_magnification``: both rows per magnification, each with its CIs;
* ``ci``: bootstrap CIs (resampling patients) of the 0.5 row; every CI dict carries ``warning``
  when fewer than :data:`MIN_CI_PATIENTS` patients were resampled.

:func:`threshold_rule` and :func:`ci_warning` are the one wording used by the console, the JSON,
the Markdown/HTML report and the demo.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cmafnet.evaluation.metrics import classification_metrics, sensitivity_at_specificity

CI_KEYS_BINARY = ("sensitivity", "specificity", "balanced_accuracy", "auprc", "auroc", "mcc", "f1")
CI_KEYS_MULTI = ("macro_f1", "weighted_f1", "balanced_accuracy", "mcc")
MIN_CI_PATIENTS = 10  # below this a patient bootstrap has too few clusters to trust its interval
RULE_05 = "threshold 0.5 (default, not tuned)"
RULE_ARGMAX = "argmax (multi-class)"


def threshold_rule(op: dict | None, binary: bool = True) -> str:
    """One sentence naming a row's threshold: 0.5, or the operating threshold and how it was chosen."""
    if not binary:
        return RULE_ARGMAX
    if not op:
        return RULE_05
    text = f"operating threshold {op['value']:.4f}"
    how = []
    if op.get("target_sensitivity") is not None:
        how.append(f"highest with validation sensitivity >= {op['target_sensitivity']:.2f}")
    chosen = op.get("chosen_on")
    if chosen:
        how.append(f"chosen on {chosen}" + (f" (n={op['n_val']})" if op.get("n_val") else ""))
    t = op.get("temperature")
    if isinstance(t, (int, float)):
        calibrated = abs(t - 1.0) > 1e-12
        how.append(f"calibrated probabilities, T={t:.3g}" if calibrated else "uncalibrated probabilities")
    return text + (f" ({'; '.join(how)})" if how else "")


def short_rule(op: dict | None, binary: bool = True) -> str:
    """A table cell: ``0.5``, ``argmax`` or ``op 0.4321 (val sens>=0.95)``."""
    if not binary:
        return "argmax"
    if not op:
        return "0.5"
    tgt = op.get("target_sensitivity")
    return f"op {op['value']:.4f}" + (f" (val sens>={tgt:.2f})" if tgt is not None else "")


def ci_warning(n_patients: int | None) -> str | None:
    """The caveat every CI carries when it resamples fewer than :data:`MIN_CI_PATIENTS` patients."""
    if n_patients is None or n_patients >= MIN_CI_PATIENTS:
        return None
    return (
        f"WARNING: only {n_patients} patient(s) resampled; with fewer than {MIN_CI_PATIENTS} the interval "
        "is unreliable (too few independent clusters)"
    )


def _row(y, probs, classes, threshold, patients, n_bins, n_boot) -> tuple[dict, dict | None]:
    """Metrics at ``threshold`` and their bootstrap CIs (None without resamples)."""
    from cmafnet.evaluation.stats import metric_cis

    metrics = classification_metrics(y, probs, threshold, classes, n_bins=n_bins)
    if n_boot <= 0:
        return metrics, None
    keys = CI_KEYS_BINARY if len(classes) == 2 else CI_KEYS_MULTI
    out = metric_cis(y, probs, keys=keys, threshold=threshold, groups=patients, n_boot=n_boot, seed=0)
    n_groups = len(np.unique(patients)) if patients is not None else None
    for ci in out.values():
        ci["n_patients"] = n_groups
        ci["warning"] = ci_warning(n_groups)
    return metrics, out


def metric_rows(
    y: np.ndarray,
    probs: np.ndarray,
    classes: list[str],
    *,
    op: dict | None,
    patients: np.ndarray | None,
    groups: dict[str, np.ndarray],
    n_bins: int = 15,
    n_boot: int = 0,
) -> dict[str, Any]:
    """The metric rows of one set of predictions (see the module docstring).

    Args:
        y: ``(N,)`` labels; probs: ``(N, C)`` (calibrated) probabilities.
        op: operating threshold info (``value`` and how it was chosen) or None.
        patients: ``(N,)`` patient ids for the bootstrap (None: resample images).
        groups: row positions per magnification.
    """
    binary = len(classes) == 2
    op = op if binary else None
    metrics, ci = _row(y, probs, classes, 0.5, patients, n_bins, n_boot)
    n_pat = len(np.unique(patients)) if patients is not None else None
    doc: dict[str, Any] = {
        "metrics": metrics,
        "metrics_rule": threshold_rule(None, binary),
        "n_patients": n_pat,
        "ci_warning": ci_warning(n_pat) if n_boot > 0 else None,
    }
    if binary:  # the clinical reading of a ROC curve: sensitivity at a fixed high specificity
        doc["sensitivity_at_specificity"] = {
            f"{s:.2f}": sensitivity_at_specificity(y, probs[:, 1], s) for s in (0.90, 0.95, 0.99)
        }
    if ci:
        doc["ci"] = ci
    if op is not None:
        metrics, ci = _row(y, probs, classes, op["value"], patients, n_bins, n_boot)
        doc["operating_point"] = {
            **op,
            "rule": threshold_rule(op),
            "metrics": metrics,
            **({"ci": ci} if ci else {}),
        }
    by_mag = {}
    for mag, sel in groups.items():
        pat = patients[sel] if patients is not None else None
        entry: dict[str, Any] = {"n": int(sel.size)}
        for threshold, prefix in ((0.5, ""), *(((op["value"], "operating_"),) if op else ())):
            metrics, ci = _row(y[sel], probs[sel], classes, threshold, pat, n_bins, n_boot)
            entry[f"{prefix}metrics"] = metrics
            if ci:
                entry[f"{prefix}ci"] = ci
        by_mag[mag] = entry
    if by_mag:
        doc["by_magnification"] = by_mag
    return doc
