"""Patient-level splits and controlled imbalance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cmafnet.cli import main
from cmafnet.data.sampling import class_counts, undersample_to_ratio
from cmafnet.data.splits import SPLITS, load_split, make_patient_split, save_split, split_store
from cmafnet.data.store import PatchStore
from cmafnet.errors import RunFolderError


def _cohort(n_patients: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Patients with 5-30 images each and mixed classes (majority class 0 for two thirds)."""
    rng = np.random.default_rng(seed)
    pats, labels = [], []
    for p in range(n_patients):
        n = int(rng.integers(5, 30))
        frac = 0.2 if p % 3 else 0.8
        pats += [f"p{p}"] * n
        labels += (rng.random(n) < frac).astype(int).tolist()
    return np.array(pats), np.array(labels)


@pytest.mark.parametrize("n_patients", [11, 30, 97])
def test_disjoint_and_ratios(n_patients: int) -> None:
    pats, y = _cohort(n_patients)
    ratios = (0.7, 0.1, 0.2)
    s = make_patient_split(pats, y, ratios=ratios, seed=3)
    sets = [set(s.patients[k]) for k in SPLITS]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert set().union(*sets) == set(pats)
    for k, r, pset in zip(SPLITS, ratios, sets):
        assert abs(len(pset) - r * n_patients) <= 1, (k, len(pset), r * n_patients)
        assert set(pats[s.indices(k)]) == pset  # every image follows its patient
    all_idx = np.concatenate([s.indices(k) for k in SPLITS])
    assert sorted(all_idx) == list(range(len(pats)))
    for k in SPLITS:  # stratified: both majority classes present in every split
        assert len(set(y[s.indices(k)])) == 2


def test_split_deterministic_by_seed() -> None:
    pats, y = _cohort(40)
    a = make_patient_split(pats, y, seed=1)
    b = make_patient_split(pats, y, seed=1)
    c = make_patient_split(pats, y, seed=2)
    assert a.patients == b.patients and np.array_equal(a.train, b.train)
    assert a.patients != c.patients


def test_impossible_request_names_class() -> None:
    pats = np.array(["a", "b", "c", "d", "e"])
    y = np.array([0, 0, 0, 0, 1])  # one patient of class 1 cannot fill three splits
    with pytest.raises(ValueError, match="class 'tumour' has 1 patient"):
        make_patient_split(pats, y, class_names=["normal", "tumour"])
    with pytest.raises(ValueError, match="summing to 1"):
        make_patient_split(pats, y, ratios=(0.5, 0.1, 0.1))


def test_idc_sample_split_and_file(idc_store: PatchStore, tmp_path: Path) -> None:
    s = split_store(idc_store, ratios=(0.7, 0.1, 0.2), seed=0)
    assert sum(len(v) for v in s.patients.values()) == 11
    path = tmp_path / "split.json"
    save_split(s, path)
    save_split(s, path)  # identical: fine
    loaded = load_split(path, idc_store)
    assert loaded.patients == s.patients and np.array_equal(loaded.test, s.test)
    with pytest.raises(RunFolderError, match="different split"):
        save_split(split_store(idc_store, seed=5), path)
    # a split of another store is refused
    d = json.loads(path.read_text())
    d["store_hash"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(d))
    with pytest.raises(RunFolderError, match="made for store"):
        load_split(tmp_path / "other.json", idc_store)
    # a patient in two splits is refused on load
    d = json.loads(path.read_text())
    d["splits"]["val"]["patients"].append(d["splits"]["train"]["patients"][0])
    (tmp_path / "leak.json").write_text(json.dumps(d))
    with pytest.raises(RunFolderError, match="in both train and val"):
        load_split(tmp_path / "leak.json")


def test_split_cli(synthetic_store: PatchStore, tmp_path: Path) -> None:
    out = tmp_path / "s.json"
    args = ["split", str(synthetic_store.path), "--by", "patient", "--ratios", "0.7", "0.1", "0.2"]
    assert main([*args, "--seed", "4", "--out", str(out)]) == 0
    assert load_split(out, synthetic_store).seed == 4
    assert main([*args, "--seed", "5", "--out", str(out)]) == 4  # written once
    assert (
        main(
            [
                "split",
                str(synthetic_store.path),
                "--ratios",
                "0.5",
                "0.3",
                "0.3",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )


@pytest.mark.parametrize("ratio", ["80:20", "90:10", "95:5", "99:1"])
def test_undersample_exact_ratio_train_only(ratio: str, synthetic_store: PatchStore) -> None:
    y, _ = synthetic_store.targets()
    s = split_store(synthetic_store, seed=0)
    before = {k: class_counts(s.indices(k), y) for k in SPLITS}
    keep = undersample_to_ratio(s.train, y, ratio, seed=0)
    maj, mnr = (float(v) for v in ratio.split(":"))
    c = class_counts(keep, y)
    assert c[0] == before["train"][0]  # majority untouched
    assert abs(c[1] - c[0] * mnr / maj) <= 1  # the requested ratio within one image
    assert set(keep) <= set(s.train)
    assert np.array_equal(undersample_to_ratio(s.train, y, ratio, seed=0), keep)
    assert not np.array_equal(undersample_to_ratio(s.train, y, ratio, seed=1), keep)
    assert {k: class_counts(s.indices(k), y) for k in ("val", "test")} == {
        k: before[k] for k in ("val", "test")
    }


def test_undersample_refuses_less_imbalanced() -> None:
    y = np.array([0] * 90 + [1] * 10)
    with pytest.raises(ValueError, match=r"already 90\.0:10\.0"):
        undersample_to_ratio(np.arange(100), y, "80:20", seed=0)
    assert len(undersample_to_ratio(np.arange(100), y, "90:10", seed=0)) == 100
    with pytest.raises(ValueError, match="two classes"):
        undersample_to_ratio(np.arange(90), y, "90:10", seed=0)
