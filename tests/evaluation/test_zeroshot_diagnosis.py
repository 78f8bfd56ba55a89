"""Zero-shot diagnosis: verdict against chance, trivial baselines, patient-level intervals, groups, scale."""

import json

import numpy as np
import pytest

from cmafnet.evaluation.zeroshot import (
    CHANCE,
    DISCRIMINATES,
    INVERTED,
    diagnose,
    field_of_view,
    field_of_view_table,
    group_scores,
)
from cmafnet.evaluation.zeroshot_plot import plot_score_distributions

PNG = b"\x89PNG\r\n\x1a\n"


def _cohort(seed: int, n_patients: int = 40, per_patient: int = 5):
    """``(N,)`` labels (one per patient, ~70 % malignant) and patient ids."""
    rng = np.random.default_rng(seed)
    patients = np.repeat(np.arange(n_patients), per_patient)
    y = (rng.random(n_patients) < 0.7).astype(int)[patients]
    return y, patients, rng


def test_good_scores_discriminate_and_negated_scores_are_inverted():
    y, patients, rng = _cohort(0)
    p = np.clip(0.5 + 0.3 * (2 * y - 1) + rng.normal(0, 0.2, y.size), 0, 1)
    good = diagnose(y, p, threshold=0.5, patients=patients, n_boot=50)
    bad = diagnose(y, 1 - p, threshold=0.5, patients=patients, n_boot=50)
    assert good["verdict"] == DISCRIMINATES and good["metrics"]["auroc"]["ci"][0] > 0.5
    assert bad["verdict"] == INVERTED and bad["metrics"]["auroc"]["ci"][1] < 0.5
    # negating the score mirrors the AUROC and (same resamples) its interval about 0.5
    assert bad["metrics"]["auroc"]["value"] == pytest.approx(1 - good["metrics"]["auroc"]["value"])
    lo, hi = good["metrics"]["auroc"]["ci"]
    assert bad["metrics"]["auroc"]["ci"] == pytest.approx([1 - hi, 1 - lo])
    assert (
        "0.5" in good["verdict_reason"]
        and f"{good['metrics']['auroc']['value']:.3f}" in good["verdict_reason"]
    )


def test_random_scores_with_many_patients_are_chance():
    y, patients, rng = _cohort(1)
    d = diagnose(y, rng.random(y.size), threshold=0.5, patients=patients, n_boot=60)
    lo, hi = d["metrics"]["auroc"]["ci"]
    assert lo < 0.5 < hi  # seed 1: AUROC 0.52 with a wide patient-level interval
    assert d["verdict"] == CHANCE


def test_prevalence_counts_and_trivial_rows():
    y = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0, 0])
    p = np.linspace(0.05, 0.95, 10)
    d = diagnose(y, p, threshold=0.5, patients=None, n_boot=0)
    assert d["prevalence"] == pytest.approx(0.7)
    assert (d["n"], d["n_malignant"], d["n_benign"], d["n_patients"]) == (10, 7, 3, None)
    mal, ben = d["trivial"]["everything_malignant"], d["trivial"]["everything_benign"]
    assert (mal["sensitivity"], mal["specificity"], mal["balanced_accuracy"]) == (1.0, 0.0, 0.5)
    assert (ben["sensitivity"], ben["specificity"], ben["balanced_accuracy"]) == (0.0, 1.0, 0.5)
    assert mal["auroc"] == ben["auroc"] == 0.5
    assert mal["auprc"] == ben["auprc"] == pytest.approx(0.7)
    # scores rise with index while malignant are the first 7: sensitivity = 2 of 7 (0.55, 0.65) at >= 0.5
    assert d["metrics"]["sensitivity"]["value"] == pytest.approx(2 / 7)
    # n_boot=0: no interval, so no claim against chance even for an AUROC far from 0.5
    assert d["metrics"]["auroc"]["ci"] is None and d["metrics"]["auroc"]["value"] == 0.0
    assert d["verdict"] == CHANCE


def test_interval_resamples_patients_not_images():
    # Patient 0: 50 malignant images all called malignant; patient 1: 50 all missed. Pooled
    # sensitivity 0.5. Resampling patients gives only 1 (0,0), 0.5 (0,1) and 0 (1,1): the interval
    # is [0, 1]. Resampling images treats 100 images as independent: a narrow interval around 0.5.
    y = np.ones(100, int)
    patients = np.repeat([0, 1], 50)
    p = np.where(patients == 0, 0.9, 0.1)
    by_patient = diagnose(y, p, threshold=0.5, patients=patients, n_boot=60)
    by_image = diagnose(y, p, threshold=0.5, patients=None, n_boot=60)
    assert by_patient["n_patients"] == 2 and by_patient["ci_by"] == "patient"
    assert by_patient["metrics"]["sensitivity"]["ci"] == [0.0, 1.0]
    assert by_image["ci_by"] == "image"
    lo, hi = by_image["metrics"]["sensitivity"]["ci"]
    assert 0.3 < lo < 0.5 < hi < 0.7


def test_undefined_metrics_are_none_and_document_is_json():
    y = np.ones(20, int)  # one class only: specificity, balanced accuracy, AUROC undefined
    d = diagnose(y, np.linspace(0, 1, 20), threshold=0.5, patients=np.arange(20) % 4, n_boot=20)
    for k in ("specificity", "balanced_accuracy", "auroc"):
        assert d["metrics"][k] == {"value": None, "ci": None}
    assert d["trivial"]["everything_malignant"]["specificity"] is None
    assert d["verdict"] == CHANCE and "undefined" in d["verdict_reason"]
    json.dumps(d, allow_nan=False)
    # a single patient: every resample is that patient, so no interval is reported
    one = diagnose(np.arange(20) % 2, np.linspace(0, 1, 20), threshold=0.5, patients=np.zeros(20), n_boot=20)
    assert all(m["ci"] is None for m in one["metrics"].values()) and one["n_patients"] == 1
    with pytest.raises(ValueError, match="0 \\(benign\\)"):
        diagnose(np.array([0, 2]), np.array([0.1, 0.2]), threshold=0.5, patients=None)


def test_group_scores_ranked_by_mean():
    groups = np.array(["A", "A", "B", "B", "B", "C", "C"])
    p = np.array([0.2, 0.4, 0.9, 0.8, 0.7, 0.4, 0.6])
    y = np.array([0, 0, 1, 1, 1, 0, 1])
    rows = group_scores(p, groups, y)
    assert [r["group"] for r in rows] == ["B", "C", "A"]
    b, c, a = rows
    assert (b["n"], b["label"], b["mean"], b["median"], b["frac_called_malignant"]) == pytest.approx(
        (3, "malignant", 0.8, 0.8, 1.0)
    )
    assert c["label"] is None and c["mean"] == pytest.approx(0.5) and c["frac_called_malignant"] == 0.5
    assert a["label"] == "benign" and a["mean"] == pytest.approx(0.3) and a["frac_called_malignant"] == 0.0
    assert all(r["label"] is None for r in group_scores(p, groups))
    json.dumps(group_scores(p, np.array([40, 40, 100, 100, 100, 400, 400]), y))  # numpy ints -> int


def test_field_of_view_known_sizes():
    # 700 x 460 px at 0.49 µm/px = 343 x 225.4 µm; a 50 x 50 IDC patch at 4.0 µm/px = 200 x 200 µm
    assert field_of_view((460, 700), 0.49, 4.0, (50, 50)) == pytest.approx(700 * 0.49 * 460 * 0.49 / 200**2)
    assert field_of_view((460, 700), 0.49, 4.0, (50, 50)) == pytest.approx(1.9328, abs=1e-4)
    assert field_of_view((50, 50), 4.0, 4.0, (50, 50)) == 1.0
    with pytest.raises(ValueError):
        field_of_view((0, 10), 1.0, 1.0, (50, 50))


def test_field_of_view_table_counts_small_images():
    rows = [
        {"magnification": "40X", "h": 460, "w": 700, "mpp": 0.4924},  # 57 x 86 px at 4 µm/px: fits
        {"magnification": "400X", "h": 460, "w": 700, "mpp": 0.0492},  # 6 x 9 px: 2 % of a patch
        {"magnification": "400X", "h": 40, "w": 60, "mpp": 4.0},  # 40 x 50 of 50 x 50: padded, kept
        {"magnification": "400X", "h": 460, "w": 700, "mpp": None},
    ]
    t = field_of_view_table(rows, patch_mpp=4.0, patch_hw=(50, 50))
    assert [r["magnification"] for r in t] == ["40X", "400X"]  # numeric order
    m40, m400 = t
    assert (m40["images"], m40["smaller_than_patch"], m40["excluded"], m40["mpp_unknown"]) == (1, 0, 0, 0)
    assert m40["patches_per_image"] == pytest.approx(field_of_view((460, 700), 0.4924, 4.0, (50, 50)))
    assert (m400["images"], m400["smaller_than_patch"], m400["excluded"], m400["mpp_unknown"]) == (3, 2, 1, 1)
    small = field_of_view((460, 700), 0.0492, 4.0, (50, 50))
    assert m400["patches_per_image"] == pytest.approx((small + 40 * 60 / 2500) / 2)


def test_plot_writes_png(tmp_path):
    rng = np.random.default_rng(0)
    subtypes = rng.choice(["A", "F", "DC", "LC"], 120)
    y = np.isin(subtypes, ["DC", "LC"]).astype(int)
    mags = rng.choice(["40X", "400X"], 120)
    path = plot_score_distributions(
        rng.random(120), subtypes, mags, y, tmp_path / "fig" / "scores.png", "zero-shot"
    )
    data = path.read_bytes()
    assert path == tmp_path / "fig" / "scores.png" and data.startswith(PNG) and len(data) > 10_000
    from PIL import Image

    w, h = Image.open(path).size
    assert w > 2 * h  # two panels side by side
    one = plot_score_distributions(rng.random(120), subtypes, None, y, tmp_path / "one.png", "subtypes only")
    assert Image.open(one).size[0] < w  # one panel
