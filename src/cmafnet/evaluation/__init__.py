"""Metrics, statistics, evaluation of run folders and reports (docs/decisions/evaluation.md).

``classification_metrics`` and the statistics import light; ``evaluate_run`` and ``write_report``
import torch / matplotlib lazily when called.
"""

from __future__ import annotations

from typing import Any

from cmafnet.evaluation.metrics import classification_metrics, threshold_for_sensitivity
from cmafnet.evaluation.paper import paper_table
from cmafnet.evaluation.stats import bootstrap_ci, mcnemar, mean_std, metric_cis

__all__ = [
    "bootstrap_ci",
    "classification_metrics",
    "evaluate_run",
    "mcnemar",
    "mean_std",
    "metric_cis",
    "paper_table",
    "threshold_for_sensitivity",
    "write_report",
]


def evaluate_run(*args: Any, **kwargs: Any) -> dict:
    """See :func:`cmafnet.evaluation.evaluate.evaluate_run`."""
    from cmafnet.evaluation.evaluate import evaluate_run as _evaluate_run

    return _evaluate_run(*args, **kwargs)


def write_report(*args: Any, **kwargs: Any):
    """See :func:`cmafnet.evaluation.report.write_report`."""
    from cmafnet.evaluation.report import write_report as _write_report

    return _write_report(*args, **kwargs)
