"""Temperature scaling: a hand-checkable fit, the NLL guarantee, and one temperature for evaluate and predict."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.special import softmax

from cmafnet.config import dump_config, load_config
from cmafnet.data.splits import save_split, split_store
from cmafnet.data.store import PatchStore
from cmafnet.evaluation.calibration import calibration_report
from cmafnet.evaluation.evaluate import evaluate_run
from cmafnet.inference.predict import PredictOptions, Predictor, predict_files
from cmafnet.inference.temperature import (
    apply_temperature,
    fit_temperature,
    nll,
    run_temperature,
    threshold_at_temperature,
)
from cmafnet.run import MIN_CALIBRATION_PATIENTS, save_weights, write_meta


def test_fit_matches_the_closed_form_of_a_hand_checkable_case():
    # Every sample has logits (0, m); a fraction q is of class 1. NLL(T) is minimal where
    # sigmoid(m / T) = q, i.e. T* = m / logit(q): m = 4, q = 0.75 -> T* = 4 / ln 3 = 3.6410.
    m, n = 4.0, 400
    logits = np.tile([0.0, m], (n, 1))
    y = np.r_[np.ones(300, int), np.zeros(100, int)]
    t, info = fit_temperature(logits, y)
    assert t == pytest.approx(4 / math.log(3), rel=1e-4)
    assert apply_temperature(logits, t)[0, 1] == pytest.approx(0.75, abs=1e-5)
    # NLL at the optimum is the entropy of Bernoulli(0.75).
    assert info["nll_after"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), abs=1e-8)
    assert info["nll_before"] == pytest.approx(nll(logits, y, 1.0)) and info["nll_after"] < info["nll_before"]


@pytest.mark.parametrize("seed", range(6))
def test_validation_nll_never_increases(seed):
    rng = np.random.default_rng(seed)
    n, c = 200, 2 + seed % 3
    y = rng.integers(0, c, n)
    scale = [0.05, 0.5, 1.0, 3.0, 10.0, 40.0][seed]  # under- to over-confident
    logits = scale * (rng.normal(size=(n, c)) + 1.5 * np.eye(c)[y])
    t, info = fit_temperature(logits, y)
    assert 0.05 <= t <= 20.0
    assert nll(logits, y, t) <= nll(logits, y, 1.0) + 1e-12
    assert info["nll_after"] == pytest.approx(nll(logits, y, t))


def test_calibration_never_changes_a_decision():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(500, 2)) * 3
    p1, p3 = apply_temperature(logits, 1.0)[:, 1], apply_temperature(logits, 3.0)[:, 1]
    assert ((p1 >= 0.5) == (p3 >= 0.5)).all()  # argmax is invariant
    for t in (0.1, 0.37, 0.5, 0.8, 0.97):
        t3 = threshold_at_temperature(t, 1.0, 3.0)
        assert ((p1 >= t) == (p3 >= t3)).all()
        assert threshold_at_temperature(t3, 3.0, 1.0) == pytest.approx(t)
    assert run_temperature({"temperature": 2.0}, "off")[0] == 1.0
    assert run_temperature({}, "on")[0] == 1.0
    # auto: applied only when fitted on enough validation patients
    stored = lambda k: {"temperature": 2.0, "calibration": {"n_patients": k}}  # noqa: E731
    assert run_temperature(stored(MIN_CALIBRATION_PATIENTS), "auto")[0] == 2.0
    t, why = run_temperature(stored(MIN_CALIBRATION_PATIENTS - 1), "auto")
    assert t == 1.0 and "not applied" in why
    assert run_temperature(stored(MIN_CALIBRATION_PATIENTS - 1), "on")[0] == 2.0
    rep = calibration_report(np.array([0, 1, 1]), np.array([[0.0, 1.0], [0.0, 2.0], [1.0, 0.0]]), 2.0)
    assert {"ece_before", "ece_after", "brier_before", "brier_after", "nll_before", "nll_after"} <= set(rep)


def _store_and_run(tmp_path, store_factory):
    store = store_factory("idc", n=36)
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config("smoke", ["data.stain.enabled=false", "model.name=resnet18", "model.img_size=32"])
    (run / "config.yaml").write_text(dump_config(cfg))
    write_meta(run, {"classes": ["non-IDC", "IDC"], "img_size": 32, "dataset": "idc"})
    save_split(split_store(PatchStore.open(store), ratios=(0.34, 0.33, 0.33), seed=0), run / "split.json")
    import torch

    from cmafnet.models import create_model

    torch.manual_seed(0)
    model = create_model(cfg.model)
    with torch.no_grad():  # a confident random model, so the temperature has something to fix
        for p in model.parameters():
            if p.ndim == 2:  # the classifier: large logits
                p.mul_(40.0)
    save_weights(model, run / "model.safetensors")
    return store, run


def test_evaluate_fits_stores_and_predict_applies_the_same_temperature(tmp_path, store_factory):
    store, run = _store_and_run(tmp_path, store_factory)
    doc = evaluate_run(
        run, store, split="test", bootstrap=0, options=PredictOptions(batch_size=8, calibrate="on")
    )
    meta = json.loads((run / "run.json").read_text())
    t = meta["temperature"]
    assert t != 1.0 and meta["calibration"]["fitted_on"] == "val"
    assert 0 < meta["calibration"]["n_patients"] < MIN_CALIBRATION_PATIENTS
    assert meta["calibration"]["nll_after"] <= meta["calibration"]["nll_before"]
    # The operating threshold was chosen on calibrated validation probabilities, at that temperature.
    assert meta["threshold_info"]["temperature"] == t == doc["calibration"]["temperature"]
    pred = pd.read_csv(run / "predictions_test.csv")
    logits = pred[["logit_non-IDC", "logit_IDC"]].to_numpy()
    np.testing.assert_allclose(pred["prob_IDC"], softmax(logits / t, axis=1)[:, 1], atol=1e-9)

    # predict on the same pixels (saved as PNG) reports the same calibrated probabilities.
    ps = PatchStore.open(store)
    rows = pred["row"].to_numpy()
    paths = []
    for r in rows:
        paths.append(tmp_path / "img" / f"{r:03d}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(np.asarray(ps.images[r])).save(paths[-1])
    out = predict_files(
        run,
        paths,
        tmp_path / "p.csv",
        tissue_check=False,
        progress=False,
        options=PredictOptions(device="cpu", calibrate="on"),
    )
    got = pd.read_csv(out.out)
    np.testing.assert_allclose(got["prob_IDC"], pred["prob_IDC"], atol=1e-5)
    assert (got["threshold"] == meta["threshold"]).all()
    assert (got["decision"] == np.where(pred["pred"] == 1, "IDC", "non-IDC")).all()
    # Switched off: the raw softmax, and the stored threshold mapped so that no decision changes.
    raw = pd.read_csv(
        predict_files(
            run,
            paths,
            tmp_path / "r.csv",
            tissue_check=False,
            progress=False,
            options=PredictOptions(device="cpu", calibrate="off"),
        ).out
    )
    np.testing.assert_allclose(raw["prob_IDC"], softmax(logits, axis=1)[:, 1], atol=1e-5)
    assert (raw["decision"] == got["decision"]).all()
    assert raw["threshold"].iloc[0] == pytest.approx(threshold_at_temperature(meta["threshold"], t, 1.0))
    # wsi builds the same Predictor: same temperature, same mapped threshold.
    p = Predictor.from_run_dir(run, options=PredictOptions(device="cpu", calibrate="on"))
    assert (p.temperature, p.threshold) == (t, meta["threshold"])
    # By default (auto) a temperature from under 10 validation patients is stored, not applied, and said so.
    auto = Predictor.from_run_dir(run, options=PredictOptions(device="cpu"))
    assert auto.temperature == 1.0 and "not applied" in auto.calibration
    assert auto.threshold == pytest.approx(threshold_at_temperature(meta["threshold"], t, 1.0))
    # evaluate --calibration off: T = 1 for that evaluation, nothing refitted.
    doc0 = evaluate_run(
        run, store, split="test", bootstrap=0, options=PredictOptions(batch_size=8, calibrate="off")
    )
    assert doc0["calibration"]["temperature"] == 1.0
    assert json.loads((run / "run.json").read_text())["temperature"] == t
    assert doc0["operating_point"]["metrics"]["confusion"] == doc["operating_point"]["metrics"]["confusion"]
