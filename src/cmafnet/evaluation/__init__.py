"""Metrics, statistics, evaluation of run folders and reports (docs/decisions/evaluation.md).

``classification_metrics`` and the statistics import light; ``evaluate_run`` and ``write_report``
import torch / matplotlib lazily when called.
"""

from __future__ import annotations

import importlib
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


def __getattr__(name: str) -> Any:
    """``evaluate_run`` and ``write_report``, imported when first used (they pull in torch / matplotlib)."""
    modules = {"evaluate_run": "evaluate", "write_report": "report"}
    if name not in modules:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{modules[name]}"), name)
