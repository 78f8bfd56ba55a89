"""End to end on real IDC patches: ingest -> patient split -> train -> evaluate -> report.

The patches are the shared IDC sample (CMAFNET_SAMPLE_DATA: 5,697 real 50x50 patches, 11 patients)
when it is set, else its subset committed under ``tests/assets/idc`` (475 patches, 3 patients, both
classes each; see its PROVENANCE.md), so this test runs on a bare clone. They are ingested, split
by patient, used to train the shipped ``smoke`` CMAF-Net config (all three stages, SAM, every
regulariser) for longer than the smoke run, evaluated on held-out patients and reported in HTML;
with the shared sample the trained run is also applied zero-shot to its 14 real BreakHis images.
One module-scoped fixture trains once; the tests read its outputs.

The balanced-accuracy floor was set from measurement (docs/decisions/evaluation.md, "End-to-end
floor on the real IDC sample"). Shared sample: this split (seed 0) with training seeds 0 / 1 / 2
gave test balanced accuracy 0.817 / 0.813 / 0.783 at the 0.5 threshold; other splits (seeds 1-4)
gave 0.847 / 0.859 / 0.676 / 0.791. Committed subset: split seed 0 (test patient 8865) with
training seeds 0 / 1 / 2 gave 0.829 / 0.825 / 0.842; the other test patients 0.808 / 0.857 / 0.870
(8867) and 0.762 / 0.742 / 0.778 / 0.835 (8863). The floor, 0.65, is below every measurement and
far above chance (0.5); an undertrained run (one epoch per stage on the subset) measured 0.50.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from cmafnet.config import load_config
from cmafnet.data.ingest import ingest
from cmafnet.data.splits import load_split, save_split, split_store
from cmafnet.data.store import PatchStore
from cmafnet.evaluation.evaluate import evaluate_run
from cmafnet.evaluation.report import write_report
from cmafnet.inference.predict import PredictOptions
from cmafnet.training import fit

pytestmark = pytest.mark.slow  # trains CMAF-Net on real patches: 1.5-3 min on 2 shared cores

BREAKHIS_SUBDIR = Path("breakhis") / "BreaKHis_v1"
SEED = 0
# (0.6, 0.2, 0.2): the split is stratified on each patient's majority class. Shared sample: 4
# mostly-benign and 7 IDC-only patients, so every split gets a patient of each majority class, hence
# both classes (seed 0 puts 8913 + 8917 in test: 873 benign, 397 IDC patches). Committed subset: its
# 3 patients each have both classes, one per split (seed 0: 8867 / 8863 / 8865).
RATIOS = (0.6, 0.2, 0.2)
# The smoke config's 4 steps per epoch leave the model at chance at the 0.5 threshold (measured:
# test balanced accuracy 0.50, AUROC 0.91, all predicted benign); 16 steps of 32 patches per stage
# (48 in all, ~770 patches per stage) learn the task. The subset's training patient fills 5 steps
# per epoch, so it trains 2 epochs per stage (30 steps). Bootstrap CIs are not what this test checks.
OVERRIDES = [
    f"train.seed={SEED}",
    "train.max_steps_per_epoch=16",
    "train.device=cpu",
    "eval.bootstrap=0",
]
# What each source holds (images, patients) and what it trains with on top of OVERRIDES.
SOURCES = {
    "shared": {"images": 5_697, "patients": 11, "overrides": []},
    "assets": {"images": 475, "patients": 3, "overrides": [f"train.stages.{i}.epochs=2" for i in range(3)]},
}
# Set from measurement (module docstring): below the lowest of 7 runs (0.676, a harder split), well
# above chance; an untrained or broken pipeline measured 0.50 here.
BALANCED_ACCURACY_FLOOR = 0.65
# BreakHis stored at half its native 460x700 (H x W): the aspect ratio is kept and the model resizes
# to its 64 px input anyway, so the full size would only cost memory and time.
BREAKHIS_SIZE = (230, 350)


@pytest.fixture(scope="module")
def trained(idc_sample: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Ingest the real IDC patches, split by patient, train the smoke config, evaluate and report."""
    src, kind = idc_sample
    root = tmp_path_factory.mktemp("e2e_real")
    store_dir = root / "idc_store"
    meta = ingest("idc", src, store_dir, workers=1, progress=False)
    store = PatchStore.open(store_dir)
    split_path = root / "split.json"
    save_split(split_store(store, ratios=RATIOS, seed=SEED), split_path)

    run_dir = root / "run"
    cfg = load_config("smoke", [*OVERRIDES, *SOURCES[kind]["overrides"]])
    summary = fit(cfg, store_dir, split_path, run_dir, progress=False)
    test_doc = evaluate_run(
        run_dir, store_dir, split_path=split_path, split="test", options=PredictOptions(device="cpu")
    )
    report = write_report([run_dir], root / "report", title=f"end-to-end on real IDC patches ({kind})")
    return {
        "root": root, "kind": kind, "cfg": cfg, "meta": meta, "store": store, "store_dir": store_dir,
        "split_path": split_path, "run_dir": run_dir, "summary": summary, "test": test_doc, "report": report,
    }  # fmt: skip


def _finite_or_explained(metrics: dict[str, Any], where: str) -> None:
    """Every metric is a finite number, or None with the reason recorded under ``undefined``."""
    undefined = metrics.get("undefined", {})
    for key, value in metrics.items():
        if key in ("undefined", "class_names"):
            continue
        if key == "confusion":
            arr = np.asarray(value)
            assert arr.shape == (2, 2) and (arr >= 0).all(), f"{where}: confusion {value}"
            assert arr.sum() == metrics["n"], f"{where}: confusion total != n"
        elif value is None:
            assert key in undefined, f"{where}: {key} is None without a reason"
        else:
            assert isinstance(value, (int, float)) and math.isfinite(value), f"{where}: {key}={value!r}"


def test_ingest_and_patient_split(trained: dict[str, Any]) -> None:
    store: PatchStore = trained["store"]
    expected = SOURCES[trained["kind"]]
    assert len(store) + trained["meta"].get("n_rejected", 0) == expected["images"]
    split = load_split(trained["split_path"], store)  # re-checks patient-disjointness and the hash
    assert len(store.patients()) == len(store)
    assert len({p for s in ("train", "val", "test") for p in split.patients[s]}) == expected["patients"]
    for s in ("train", "val", "test"):
        counts = split.class_counts[s]
        assert all(n > 0 for n in counts.values()), f"{s} lacks a class: {counts}"
    assert not set(split.patients["test"]) & set(split.patients["train"])


def test_training_finished(trained: dict[str, Any]) -> None:
    summary = trained["summary"]
    assert summary["status"] == "finished"
    run_dir: Path = trained["run_dir"]
    assert (run_dir / "model.safetensors").is_file()
    log = pd.read_csv(run_dir / "metrics.csv")
    # one row per epoch, the three stages in order, each as long as configured
    stages = trained["cfg"].train.stages
    assert list(log["stage_name"]) == [st.name for st in stages for _ in range(st.epochs)]
    assert [st.name for st in stages] == ["branches", "fusion", "end_to_end"]
    assert np.isfinite(log["train_loss"]).all()


def test_held_out_balanced_accuracy_above_measured_floor(trained: dict[str, Any]) -> None:
    doc = trained["test"]
    split = load_split(trained["split_path"], trained["store"])
    m = doc["metrics"]
    assert doc["split"] == "test" and m["n"] == len(split.test)
    assert m["n_pos"] > 0 and m["n_neg"] > 0
    _finite_or_explained(m, "test")
    # Headline balanced accuracy at the 0.5 threshold on patients never seen in training.
    assert m["balanced_accuracy"] > BALANCED_ACCURACY_FLOOR, (
        f"test balanced accuracy {m['balanced_accuracy']:.3f} <= floor {BALANCED_ACCURACY_FLOOR} "
        f"(AUROC {m['auroc']:.3f})"
    )
    assert m["auroc"] > BALANCED_ACCURACY_FLOOR
    preds = pd.read_csv(doc["paths"]["predictions"])
    assert len(preds) == m["n"]
    assert set(preds["patient"].astype(str)) == set(split.patients["test"])


def test_calibration_fitted_on_validation_improves_held_out_ece(trained: dict[str, Any]) -> None:
    from cmafnet.evaluation.calibration import calibration_report
    from cmafnet.run import MIN_CALIBRATION_PATIENTS

    doc = trained["test"]
    meta = json.loads((trained["run_dir"] / "run.json").read_text())
    t, fit = meta["temperature"], meta["calibration"]
    assert fit["fitted_on"] == "val" and fit["nll_after"] <= fit["nll_before"]
    # Applied by default only when fitted on enough validation patients, and the output says which.
    applied = fit["n_patients"] >= MIN_CALIBRATION_PATIENTS
    assert doc["calibration"]["temperature"] == (t if applied else 1.0), doc["calibration"]
    assert applied or "not applied" in doc["calibration"]["source"]
    # The operating threshold was chosen on the validation probabilities at the temperature applied.
    assert meta["threshold_info"]["temperature"] == doc["calibration"]["temperature"]
    # Fitted on the validation patients, judged on the test patients it never saw.
    pred = pd.read_csv(trained["run_dir"] / "predictions_test.csv")
    cal = calibration_report(pred["label"].to_numpy(), pred[["logit_non-IDC", "logit_IDC"]].to_numpy(), t)
    assert cal["ece_after"] <= cal["ece_before"], cal
    assert cal["brier_after"] <= cal["brier_before"], cal
    # The run recorded the scale it was trained at (the IDC store's documented 4 um/px, 50 px patches).
    assert (meta["patch_mpp"], meta["patch_hw"]) == (4.0, [50, 50])


def test_report_written(trained: dict[str, Any]) -> None:
    report: Path = trained["report"]
    assert report.is_file() and report.name == "report.html"
    html = report.read_text()
    assert "<html" in html.lower() and "data:image/png;base64," in html
    assert json.loads((report.parent / "report.json").read_text())


def test_zero_shot_breakhis_per_magnification(trained: dict[str, Any], sample_data: Path) -> None:
    """BreakHis is not redistributable, so this part needs the shared sample."""
    src = sample_data / BREAKHIS_SUBDIR
    files = sorted(src.rglob("*.png"))
    # expected per-magnification counts from the file names, e.g. SOB_B_F-14-25197-100-001.png
    mag_re = re.compile(r"-(\d+)-\d+\.png$")
    expected = Counter(mag_re.search(f.name)[1] + "X" for f in files)
    store_dir = trained["root"] / "breakhis_store"
    ingest("breakhis", src, store_dir, workers=1, size=BREAKHIS_SIZE, strict=True, progress=False)
    assert len(PatchStore.open(store_dir)) == len(files) == 14

    doc = evaluate_run(
        trained["run_dir"],
        store_dir,
        split="all",
        zero_shot=True,
        bootstrap=0,
        options=PredictOptions(device="cpu"),
    )
    assert doc["zero_shot"] and doc["metrics"]["n"] == 14
    _finite_or_explained(doc["metrics"], "zero-shot")
    by_mag = doc["by_magnification"]
    assert set(by_mag) == set(expected) == {"40X", "100X", "200X", "400X"}
    for mag, entry in by_mag.items():
        assert entry["n"] == expected[mag], mag
        _finite_or_explained(entry["metrics"], f"zero-shot {mag}")
        _finite_or_explained(entry["operating_metrics"], f"zero-shot {mag} (operating)")
    preds = pd.read_csv(doc["paths"]["predictions"])
    probs = preds[["prob_benign", "prob_malignant"]].to_numpy()
    assert len(preds) == 14 and np.isfinite(probs).all() and (probs >= 0).all()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)

    # Scale-matched beside squeezed: stored at 230 x 350 (half size), 40X is ~0.98 um/px, so a 40X field
    # resampled to the run's 4 um/px is ~86 x 57 px = 2 x 2 tiles of 50 px; 100X and finer fields
    # are smaller than half a 50 px patch at 4 um/px and are excluded (not assessable at that scale).
    matched = doc["scale_matched"]
    sc = matched["scale"]
    assert sc["mode"] == "match" and sc["mpp"] == 4.0 and sc["n_total"] == 14
    assert sc["n_assessable"] == expected["40X"] == matched["n"]
    assert sc["excluded"] == {"smaller_than_patch": 14 - expected["40X"]}
    assert set(sc["excluded_by_magnification"]) == {"100X", "200X", "400X"} and sc["tiles_per_image"] == 4
    assert set(matched["by_magnification"]) == {"40X"}
    _finite_or_explained(matched["metrics"], "zero-shot scale-matched")
    print(
        "zero-shot BreakHis 40X sensitivity / specificity at the operating threshold: squeezed",
        by_mag["40X"]["operating_metrics"]["sensitivity"], by_mag["40X"]["operating_metrics"]["specificity"],
        "scale-matched", matched["by_magnification"]["40X"]["operating_metrics"]["sensitivity"],
        matched["by_magnification"]["40X"]["operating_metrics"]["specificity"],
    )  # fmt: skip
