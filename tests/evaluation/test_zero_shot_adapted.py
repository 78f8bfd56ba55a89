"""evaluate --zero-shot: the diagnosis, and each adaptation switched on, recorded and kept apart."""

import json

import numpy as np
import pandas as pd
import pytest
from test_eval_evaluate import BREAKHIS_SUBTYPES, _run_folder

from cmafnet.cli import main
from cmafnet.errors import ConfigError
from cmafnet.evaluation.evaluate import evaluate_run
from cmafnet.inference.adapt import Adaptation
from cmafnet.inference.predict import PredictOptions


@pytest.fixture
def run_and_target(tmp_path, store_factory):
    idc = store_factory("idc", n=24)
    bh = store_factory(
        "bh", n=48, dataset="breakhis", classes=("benign", "malignant"), subtypes=BREAKHIS_SUBTYPES,
        mags=("40X", "100X"),
    )  # fmt: skip
    return _run_folder(tmp_path / "run", idc), bh


def test_zero_shot_diagnosis_is_in_the_document(run_and_target):
    run, bh = run_and_target
    doc = evaluate_run(
        run, bh, zero_shot=True, bootstrap=50, scale_match=False, options=PredictOptions(batch_size=16)
    )
    d = doc["diagnosis"]
    assert d["verdict"] in (
        "discriminates",
        "not distinguishable from chance",
        "inverted (ranks benign above malignant)",
    )
    assert d["prevalence"] == pytest.approx(0.5) and d["ci_by"] == "patient" and d["n_patients"] == 6
    assert d["trivial"]["everything_malignant"]["balanced_accuracy"] == 0.5
    assert {r["group"] for r in d["by_subtype"]} == set(BREAKHIS_SUBTYPES)
    assert {r["group"] for r in d["by_magnification"]} == {"40X", "100X"}
    assert (run / "scores_zeroshot_all.png").stat().st_size > 1000
    assert doc["adaptation"]["label"] == "raw"
    json.dumps(doc, allow_nan=False)


def test_each_adaptation_is_recorded_under_its_own_name(run_and_target, capsys):
    run, bh = run_and_target
    before = (run / "run.json").read_text()
    rc = main(["evaluate", str(run), "--store", str(bh), "--zero-shot", "--no-scale-match", "--bootstrap", "0",
               "--tta", "d4", "--adabn", "balanced", "--site-calibration", "2", "--seed", "1"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "adaptation: TTA d4 + AdaBN balanced + site calibration k=2" in out and "diagnosis: " in out
    name = "zeroshot_all_tta-d4_adabn-balanced_site-calibration-k-2_seed1"
    doc = json.loads((run / f"metrics_{name}.json").read_text())
    site = doc["adaptation"]["site_calibration"]
    # the calibration patients are never scored
    scored = set(pd.read_csv(run / f"predictions_{name}.csv")["patient"])
    assert len(site["patients"]) == 2 and not scored & set(site["patients"]) and len(scored) == 4
    assert doc["n"] == site["scored_images"] == 32
    assert doc["operating_point"]["chosen_on"].startswith("site calibration (2 target patients")
    assert doc["adaptation"]["adabn"]["layers"] > 0  # the smoke CMAF-Net has BatchNorm
    assert (run / "run.json").read_text() == before  # the run's own record is not refitted by an adaptation
    # the raw zero-shot files are another evaluation's, untouched by this one
    assert not (run / "metrics_zeroshot_all.json").exists()


def test_tta_is_written_beside_the_raw_evaluation(run_and_target):
    run, bh = run_and_target
    raw = evaluate_run(
        run, bh, zero_shot=True, bootstrap=0, scale_match=False, options=PredictOptions(batch_size=16)
    )
    tta = evaluate_run(
        run,
        bh,
        zero_shot=True,
        bootstrap=0,
        scale_match=False,
        options=PredictOptions(batch_size=16, adapt=Adaptation(tta="flips")),
    )
    assert tta["name"] == "zeroshot_all_tta-flips" and tta["n"] == raw["n"]
    p_raw = pd.read_csv(run / "predictions_zeroshot_all.csv")["prob_malignant"].to_numpy()
    p_tta = pd.read_csv(run / "predictions_zeroshot_all_tta-flips.csv")["prob_malignant"].to_numpy()
    assert not np.allclose(p_raw, p_tta)  # random images: the views differ, and so do the means


def test_site_calibration_is_refused_off_a_foreign_site_and_needs_patients_left(run_and_target):
    run, bh = run_and_target
    with pytest.raises(ConfigError, match="--zero-shot"):
        evaluate_run(run, bh, options=PredictOptions(adapt=Adaptation(site_patients=2)))
    with pytest.raises(ConfigError):
        evaluate_run(
            run, bh, zero_shot=True, bootstrap=0, options=PredictOptions(adapt=Adaptation(site_patients=6))
        )


def test_the_report_has_the_diagnosis_section_and_figure(run_and_target, tmp_path):
    from cmafnet.evaluation.report import write_report

    run, bh = run_and_target
    evaluate_run(
        run, bh, zero_shot=True, bootstrap=20, scale_match=False, options=PredictOptions(batch_size=16)
    )
    evaluate_run(
        run,
        bh,
        zero_shot=True,
        bootstrap=20,
        scale_match=False,
        options=PredictOptions(batch_size=16, adapt=Adaptation(tta="flips")),
    )
    html = write_report([run], tmp_path / "report").read_text()
    section = html[html.index("<h2>Zero-shot diagnosis</h2>") :]
    assert (
        "everything malignant" in section
        and "TTA flips" in section
        and "Mean p(malignant) per subtype" in section
    )
    assert "p(malignant) per subtype and magnification" in section and "data:image/png;base64," in section
