"""Evaluation on another site: the adaptations ``evaluate`` applies (AdaBN on the target images, site
calibration on k labelled target patients) and the zero-shot diagnosis it writes.

The arithmetic lives in :mod:`cmafnet.inference.adapt` and :mod:`cmafnet.evaluation.zeroshot`; this
module connects them to a store's rows and to the metrics document.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cmafnet.errors import ConfigError
from cmafnet.inference.adapt import Adaptation, balanced_indices, site_calibrate, site_calibration_split


def adapt_to_target(
    predictor: Any, store: Any, rows: np.ndarray, y: np.ndarray, adapt: Adaptation, batch_size: int
) -> dict | None:
    """AdaBN on the evaluated images (``adabn=on``) or on a class-balanced sample of them (``balanced``:
    uses the labels, so that the re-estimated statistics do not absorb the target's class mix)."""
    if adapt.adabn == "off":
        return None
    pick = rows if adapt.adabn == "on" else rows[balanced_indices(y, adapt.seed)]
    what = f"{len(pick)} target images" + (" (class-balanced sample)" if adapt.adabn == "balanced" else "")
    batches = (store.images[np.sort(pick[i : i + batch_size])] for i in range(0, len(pick), batch_size))
    info = predictor.adapt_batchnorm(batches, what)
    if adapt.adabn == "on":
        info["risk"] = (
            "the re-estimated BatchNorm statistics absorb the target's class mix: under a class-proportion "
            "shift they move with the prevalence (--adabn balanced re-estimates on a class-balanced sample)"
        )
    return info


def site_calibration(
    logits: np.ndarray,
    y: np.ndarray,
    patients: np.ndarray | None,
    adapt: Adaptation,
    target_sensitivity: float,
) -> tuple[np.ndarray, float, dict, dict]:
    """Refit the temperature and threshold on ``adapt.site_patients`` labelled target patients (chosen by
    ``adapt.seed``). Returns the positions (into ``logits``) left to score, the temperature, the
    operating point (``threshold_info``'s shape) and what was fitted; the calibration patients are
    never scored."""
    if patients is None:
        raise ConfigError("--site-calibration: the target store names no patients")
    cal, rest = site_calibration_split(patients, y, adapt.site_patients, adapt.seed)
    fit = site_calibrate(logits[cal], y[cal], target_sensitivity, patients[cal])
    op = {
        "value": fit["threshold"], "target_sensitivity": target_sensitivity,
        "chosen_on": f"site calibration ({fit['n_patients']} target patients, {fit['n_images']} images)",
        "n_val": fit["n_images"], "temperature": fit["temperature"], "val_sensitivity": fit["sensitivity"],
        "val_specificity": fit["specificity"],
    }  # fmt: skip
    info = {**fit, "patients": sorted(str(p) for p in np.unique(patients[cal])), "scored_images": len(rest)}
    return rest, fit["temperature"], op, info


def zero_shot_diagnosis(
    y: np.ndarray,
    p_pos: np.ndarray,
    index: Any,
    rows: np.ndarray,
    *,
    threshold: float,
    n_boot: int,
    meta: dict,
    image_hw: tuple[int, int],
    figure: Path,
    title: str,
) -> dict:
    """Whether the run discriminates on the target (verdict from the AUROC's patient-level interval,
    beside the trivial rows), the mean score per subtype and magnification, the field of view against
    the run's training patches (``image_hw``: the stored images' size), and the score-distribution
    figure written to ``figure``."""
    from cmafnet.evaluation.zeroshot import diagnose, field_of_view_table, group_scores
    from cmafnet.evaluation.zeroshot_plot import plot_score_distributions

    col = lambda name: index[name].to_numpy()[rows] if name in index.columns else None  # noqa: E731
    patients, subtypes, mags = col("patient"), col("subtype"), col("magnification")
    subtypes = None if subtypes is None or not any(subtypes) else subtypes.astype(str)
    mags = None if mags is None else mags.astype(str)
    doc = diagnose(y, p_pos, threshold=threshold, patients=patients, n_boot=n_boot)
    doc["by_subtype"] = None if subtypes is None else group_scores(p_pos, subtypes, y, threshold=threshold)
    doc["by_magnification"] = None if mags is None else group_scores(p_pos, mags, y, threshold=threshold)
    doc["field_of_view"] = None
    if meta.get("patch_mpp") and meta.get("patch_hw") and "mpp" in index.columns:
        # the stored images (one canvas size) at their stored µm/px: the physical extent of the source's
        images = [
            {
                "magnification": m,
                "h": image_hw[0],
                "w": image_hw[1],
                "mpp": None if mpp != mpp else mpp,
            }  # NaN
            for m, mpp in zip(mags if mags is not None else ["all"] * len(rows), col("mpp"))
        ]
        doc["field_of_view"] = field_of_view_table(
            images, patch_mpp=meta["patch_mpp"], patch_hw=tuple(meta["patch_hw"])
        )
    doc["figure"] = str(plot_score_distributions(p_pos, subtypes, mags, y, figure, title))
    return doc
