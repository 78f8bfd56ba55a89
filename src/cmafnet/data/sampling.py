"""Controlled imbalance (paper Table 2): undersample the training split's minority class.

Only the minority class is reduced, so every majority image stays; validation and test splits are
never passed here. A request *less* imbalanced than the natural ratio cannot be met by removing
minority images and raises ``ValueError`` (we do not undersample the majority instead: that would
change the amount of majority data between rows of the sweep).
"""

from __future__ import annotations

import logging

import numpy as np

from cmafnet.config import parse_ratio

log = logging.getLogger(__name__)


def class_counts(indices: np.ndarray, labels: np.ndarray) -> dict[int, int]:
    """Images per class among ``indices`` (``labels`` is store-wide)."""
    vals, counts = np.unique(np.asarray(labels)[np.asarray(indices, np.int64)], return_counts=True)
    return {int(v): int(c) for v, c in zip(vals, counts)}


def undersample_to_ratio(
    indices: np.ndarray,
    labels: np.ndarray,
    ratio: str,
    seed: int,
) -> np.ndarray:
    """Keep every majority image and a seeded random subset of the minority class.

    Args:
        indices: store indices of the training split.
        labels: store-wide binary labels (``labels[indices]`` are the split's labels).
        ratio: ``"90:10"``: majority:minority.

    Returns:
        The kept indices, sorted. The minority count is ``round(n_major * min / maj)``, so the
        achieved ratio is the requested one within one image.

    Raises:
        ValueError: not binary, a bad ratio, or a natural ratio already more imbalanced than asked.
    """
    indices = np.asarray(indices, np.int64)
    labels = np.asarray(labels)
    if len(indices) and indices.max() >= len(labels):
        raise ValueError("labels must be the store-wide label array (labels[indices] are the split's labels)")
    f_maj, f_min = parse_ratio(ratio)
    if f_min > f_maj:
        f_maj, f_min = f_min, f_maj  # "10:90" means the same as "90:10"
    y = labels[indices]
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) != 2:
        raise ValueError(
            f"controlled imbalance needs exactly two classes in the split, found {classes.tolist()}"
        )
    major, minor = (classes[1], classes[0]) if counts[1] >= counts[0] else (classes[0], classes[1])
    n_maj, n_min = int(counts.max()), int(counts.min())
    exact, asked = n_maj * f_min / f_maj, f"{100 * f_maj:g}:{100 * f_min:g}"
    if exact > n_min + 1:  # within one image counts as reachable
        natural = 100 * n_maj / (n_maj + n_min)
        raise ValueError(
            f"requested {asked} but the split is already {natural:.1f}:{100 - natural:.1f} "
            f"({n_maj} vs {n_min}); only the minority class is undersampled, so a less imbalanced ratio "
            "cannot be reached"
        )
    target = max(min(round(exact), n_min), 1)
    rng = np.random.default_rng(seed)
    minor_idx = indices[y == minor]
    keep = np.concatenate([indices[y == major], rng.choice(minor_idx, size=target, replace=False)])
    log.info("imbalance %s: class %s %d kept, class %s %d -> %d", asked, major, n_maj, minor, n_min, target)
    return np.sort(keep)
