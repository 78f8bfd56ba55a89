"""Slide-level results of a whole-slide cohort: AUROC of each slide score with a bootstrap CI, and the
cohort's HTML report.

The per-slide rows come from :func:`cmafnet.inference.cohort.cohort_rows`. With labels (1 = the run's
positive class), each slide score is ranked against them: the fraction and the area of classified
tissue called positive, the mean positive-class probability, and the mean of the top-k tiles. Slides
without a label or without the score (nothing classified, no microns per pixel) are left out of that
score's AUROC and counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata

from cmafnet.evaluation.report import write_report
from cmafnet.evaluation.stats import bootstrap_ci
from cmafnet.evaluation.table import TableResult

SLIDE_SCORES = {
    "positive_fraction": "fraction of classified tiles called positive",
    "positive_area_mm2": "area called positive (mm²)",
    "prob_mean": "mean tile probability",
    "prob_top_k": "mean of the top-k tile probabilities",
}


def auroc_ranks(y: np.ndarray, s: np.ndarray) -> float | None:
    """AUROC as the Mann-Whitney U statistic over ``n_pos * n_neg`` (ties count one half): the value
    sklearn's ``roc_auc_score`` gives, at a small fraction of its per-call cost, which matters for a
    bootstrap of thousands of resamples. None with one class only."""
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(s)  # ties get their average rank
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def slide_auroc(rows: Sequence[dict[str, Any]], *, n_boot: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """AUROC of each slide score against the slides' labels, with a 95% percentile bootstrap CI over slides.

    Returns one dict per score (``score``, ``auroc``, ``low``, ``high``, ``n``, ``n_pos``, ``n_neg``,
    ``left_out``); ``auroc`` is None when the labelled slides with that score hold one class only.
    An empty list when no slide has a label.
    """
    labelled = [r for r in rows if r.get("label") is not None and r.get("status") == "done"]
    if not labelled:
        return []
    out = []
    for key in SLIDE_SCORES:
        kept = [r for r in labelled if r.get(key) is not None]
        y = np.array([int(r["label"]) for r in kept])
        s = np.array([float(r[key]) for r in kept])
        n_pos = int(y.sum())
        res: dict[str, Any] = {"score": key, "auroc": None, "low": None, "high": None, "n": len(kept),
                               "n_pos": n_pos, "n_neg": len(kept) - n_pos, "left_out": len(labelled) - len(kept)}  # fmt: skip
        if 0 < n_pos < len(kept):
            ci = bootstrap_ci(
                lambda idx, y=y, s=s: auroc_ranks(y[idx], s[idx]), len(kept), n_boot=n_boot, seed=seed
            )
            res.update(auroc=ci["point"], low=ci["low"], high=ci["high"])
        out.append(res)
    return out


def write_cohort_report(
    out_dir: str | Path,
    rows: Sequence[dict[str, Any]],
    auroc: Sequence[dict[str, Any]],
    *,
    notes: Sequence[str] = (),
) -> Path:
    """The cohort's ``report.html`` (+ ``report.md``, ``report.json``): a section with the slide table,
    the failed slides with their reasons, and with labels the slide-level AUROC and ROC curves."""
    from cmafnet.evaluation import plots

    shown = ("slide_id", "label", "status", "tissue_area_mm2", "positive_area_mm2", "positive_fraction",
             "prob_mean", "prob_top_k", "n_not_assessable", "seconds")  # fmt: skip
    tables = [TableResult.plain("slides", "Slides", shown, [[r.get(k) for k in shown] for r in rows])]
    failed = [[r["slide_id"], r["path"], r["reason"]] for r in rows if r["status"] == "failed"]
    if failed:
        tables.append(TableResult.plain("failed", "Failed slides", ["slide_id", "path", "reason"], failed))
    figures = []
    if auroc:
        tables.append(TableResult.plain(
            "slide_auroc", "Slide-level AUROC (95% bootstrap CI over slides)",
            ["score", "AUROC", "CI low", "CI high", "slides", "positive", "negative", "left out"],
            [[SLIDE_SCORES[a["score"]], a["auroc"], a["low"], a["high"], a["n"], a["n_pos"], a["n_neg"],
              a["left_out"]] for a in auroc],
        ))  # fmt: skip
        done = [r for r in rows if r["label"] is not None and r["status"] == "done"]
        curves = {
            SLIDE_SCORES[k]: ([r["label"] for r in done if r[k] is not None], [r[k] for r in done if r[k] is not None])
            for k in SLIDE_SCORES
        }  # fmt: skip
        for kind, name in (("roc", "ROC"), ("pr", "Precision-recall")):
            title = f"Slide-level {name} curves of each score"
            figures.append((title, plots.figure_png(plots.plot_curves(curves, kind, title))))
    return write_report(
        [],
        out_dir,
        title="cmafnet whole-slide cohort",
        notes=notes,
        extra_sections=[("Cohort", tables, figures)],
    )
