"""Patient-level, class-stratified train/val/test splits, saved once and checked on load.

Stratification is on each patient's *majority class* (ties: the lower class index): a patient
goes to exactly one split with all of its images. Patient counts per split are allocated with
largest-remainder rounding, first for the totals (so each split is within one patient of
``ratio * n_patients``), then per class; every class gets at least one patient in every split
with a positive ratio. sklearn's ``train_test_split(stratify=...)`` was not used: it needs every
split to hold at least one member per class *in its rounded size* and fails on small cohorts such
as the 11-patient IDC sample, without naming the class at fault.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cmafnet.errors import ConfigError, RunFolderError
from cmafnet.files import atomic_write_bytes

SPLITS = ("train", "val", "test")
SPLIT_VERSION = 1


@dataclass
class Split:
    """Index arrays into a store plus the patients behind them."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    patients: dict[str, list[str]]
    store_hash: str
    seed: int
    ratios: tuple[float, float, float]
    label_kind: str = "label"
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    note: str = ""  # e.g. "each image is its own patient": the split is by image

    def indices(self, name: str) -> np.ndarray:
        if name not in SPLITS:
            raise ConfigError(f"unknown split '{name}' (train | val | test)")
        return getattr(self, name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": SPLIT_VERSION,
            **({"note": self.note} if self.note else {}),
            "by": "patient",
            "stratify": "patient majority class",
            "label_kind": self.label_kind,
            "store_hash": self.store_hash,
            "seed": self.seed,
            "ratios": list(self.ratios),
            "splits": {
                s: {
                    "patients": self.patients[s],
                    "indices": [int(i) for i in self.indices(s)],
                    "class_counts": self.class_counts.get(s, {}),
                }
                for s in SPLITS
            },
        }


def allocate(class_sizes: dict[Any, int], ratios: tuple[float, ...]) -> dict[Any, np.ndarray]:
    """Patients per (class, split): totals within one of the target, >= 1 where the ratio > 0.

    Raises:
        ValueError: a class has fewer patients than there are splits with a positive ratio.
    """
    r = np.asarray(ratios, float)
    need = int((r > 0).sum())
    for c, n in class_sizes.items():
        if n < need:
            raise ValueError(
                f"class '{c}' has {n} patient(s) but the ratios {tuple(float(x) for x in ratios)} need at "
                f"least {need} (one per split): use fewer splits or another label kind"
            )
    total = sum(class_sizes.values())
    exact = total * r  # split totals by largest remainder
    totals = np.floor(exact).astype(int)
    totals[np.argsort(-(exact - totals), kind="stable")[: total - totals.sum()]] += 1
    alloc = {c: np.floor(n * r).astype(int) for c, n in class_sizes.items()}
    left = {c: n - alloc[c].sum() for c, n in class_sizes.items()}
    deficit = totals - sum(alloc.values())
    # hand out the leftover patients by remainder, respecting the split totals
    cand = sorted(
        ((n * r[s] - np.floor(n * r[s]), c, s) for c, n in class_sizes.items() for s in range(len(r))),
        key=lambda t: -t[0],
    )
    for _, c, s in cand:
        if left[c] > 0 and deficit[s] > 0 and r[s] > 0:
            alloc[c][s] += 1
            left[c] -= 1
            deficit[s] -= 1
    for c in class_sizes:
        while left[c] > 0:
            s = int(np.argmax(np.where(r > 0, deficit, -(10**9))))
            alloc[c][s] += 1
            left[c] -= 1
            deficit[s] -= 1
    # at least one patient of each class in each used split: take it from the class's largest split
    for c in class_sizes:
        for s in np.flatnonzero(r > 0):
            if alloc[c][s] == 0:
                donor = int(np.argmax(alloc[c]))
                alloc[c][donor] -= 1
                alloc[c][s] += 1
    return alloc


def make_patient_split(
    patients: np.ndarray,
    labels: np.ndarray,
    *,
    ratios: tuple[float, float, float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    store_hash: str = "",
    label_kind: str = "label",
    class_names: list[str] | None = None,
) -> Split:
    """Split image indices by patient, stratified on each patient's majority class.

    Args:
        patients: patient id of every image, ``(N,)``.
        labels: integer class of every image, ``(N,)``.
        ratios: train/val/test fractions (summing to 1; val or test may be 0).
        seed: the shuffle seed (same inputs and seed -> same split).
        store_hash: recorded so :func:`load_split` can refuse another store.
        label_kind: recorded (``label`` or ``subtype``).
        class_names: names used in messages and counts (default: the integers).

    Raises:
        ValueError: bad ratios, or a class with too few patients (named).
    """
    patients = np.asarray(patients).astype(str)
    labels = np.asarray(labels, np.int64)
    if len(patients) != len(labels) or len(labels) == 0:
        raise ValueError("patients and labels must be non-empty and of equal length")
    r = np.asarray(ratios, float)
    if r.shape != (3,) or (r < 0).any() or r[0] <= 0 or abs(r.sum() - 1) > 1e-6:
        raise ValueError(f"ratios {tuple(ratios)} must be three non-negative numbers summing to 1, train > 0")
    names = class_names or [str(i) for i in range(int(labels.max()) + 1)]
    uniq, inv = np.unique(patients, return_inverse=True)
    counts = np.zeros((len(uniq), int(labels.max()) + 1), np.int64)
    np.add.at(counts, (inv, labels), 1)
    majority = counts.argmax(1)  # ties -> lower class index
    rng = np.random.default_rng(seed)
    groups: dict[str, list[str]] = {s: [] for s in SPLITS}
    by_class = {c: uniq[majority == c] for c in np.unique(majority)}
    alloc = allocate({names[c]: len(p) for c, p in by_class.items()}, tuple(r))
    for c, pts in by_class.items():
        pts = rng.permutation(np.sort(pts))
        bounds = np.cumsum(alloc[names[c]])
        for s, chunk in zip(SPLITS, np.split(pts, bounds[:-1])):
            groups[s] += [str(p) for p in chunk]
    split_of = {p: s for s in SPLITS for p in groups[s]}
    assign = np.array([split_of[p] for p in uniq])[inv]
    idx = {s: np.flatnonzero(assign == s) for s in SPLITS}
    class_counts = {
        s: {names[c]: int((labels[idx[s]] == c).sum()) for c in range(len(names))} for s in SPLITS
    }
    return Split(
        train=idx["train"], val=idx["val"], test=idx["test"],
        patients={s: sorted(groups[s]) for s in SPLITS}, store_hash=store_hash, seed=seed,
        ratios=tuple(float(x) for x in r), label_kind=label_kind, class_counts=class_counts,
    )  # fmt: skip


def split_store(store: Any, *, ratios=(0.7, 0.1, 0.2), seed: int = 0, label_kind: str = "label") -> Split:
    """:func:`make_patient_split` on a :class:`~cmafnet.data.store.PatchStore`."""
    labels, names = store.targets(label_kind)
    split = make_patient_split(
        store.patients(), labels, ratios=ratios, seed=seed, store_hash=store.store_hash,
        label_kind=label_kind, class_names=names,
    )  # fmt: skip
    own = int((getattr(store, "meta", None) or {}).get("n_own_patient", 0))
    if own:
        split.note = (
            f"{own} of {len(labels)} images had no patient in the store (ingest: no patient folder, manifest "
            "column or --patient-regex): each is its own patient, so this split is by image, not by patient"
        )
    return split


def save_split(split: Split, path: str | Path, *, overwrite: bool = False) -> None:
    """Write the split once. An existing different split is kept unless ``overwrite``.

    Raises:
        RunFolderError: ``path`` holds a different split and ``overwrite`` is False.
    """
    path = Path(path)
    data = (json.dumps(split.to_dict(), indent=1) + "\n").encode()
    if path.exists() and not overwrite:
        if path.read_bytes() == data:
            return
        raise RunFolderError(f"{path} already holds a different split; splits are written once (use --force)")
    atomic_write_bytes(path, data)


def load_split(path: str | Path, store: Any | None = None) -> Split:
    """Read a split, assert patient-disjointness and (given a store) its hash and patients.

    Raises:
        RunFolderError: missing/corrupt file, store hash mismatch, overlapping patients, indices
            out of range or not matching the recorded patients.
    """
    path = Path(path)
    if not path.exists():
        raise RunFolderError(f"{path}: split file not found (make one with 'cmafnet split')")
    try:
        d = json.loads(path.read_text())
        parts = {s: d["splits"][s] for s in SPLITS}
        split = Split(
            **{s: np.asarray(parts[s]["indices"], np.int64) for s in SPLITS},
            patients={s: list(parts[s]["patients"]) for s in SPLITS},
            store_hash=d["store_hash"], seed=int(d["seed"]), ratios=tuple(d["ratios"]),
            label_kind=d.get("label_kind", "label"),
            class_counts={s: parts[s].get("class_counts", {}) for s in SPLITS}, note=d.get("note", ""),
        )  # fmt: skip
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        what = f"missing key {err}" if isinstance(err, KeyError) else str(err).splitlines()[0][:120]
        raise RunFolderError(f"{path}: corrupt split file ({what})") from None
    seen: dict[str, str] = {}
    for s in SPLITS:
        for p in split.patients[s]:
            if p in seen:
                raise RunFolderError(f"{path}: patient {p} is in both {seen[p]} and {s}")
            seen[p] = s
    all_idx = np.concatenate([split.indices(s) for s in SPLITS])
    if len(np.unique(all_idx)) != len(all_idx):
        raise RunFolderError(f"{path}: an image index appears in two splits")
    if store is not None:
        if split.store_hash != store.store_hash:
            raise RunFolderError(
                f"{path} was made for store {split.store_hash[:12]}, not {store.store_hash[:12]} ({store.path})"
            )
        if len(all_idx) and (all_idx.min() < 0 or all_idx.max() >= len(store)):
            raise RunFolderError(f"{path}: indices out of range for a store of {len(store)} images")
        pat = store.patients()
        for s in SPLITS:
            bad = set(pat[split.indices(s)].astype(str)) - set(split.patients[s])
            if bad:
                raise RunFolderError(
                    f"{path}: {s} holds images of patients not listed in it: {', '.join(str(b) for b in sorted(bad)[:5])}"
                )
    return split
