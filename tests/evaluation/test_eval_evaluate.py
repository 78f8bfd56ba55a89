"""evaluate_run: clear failures for wrong inputs, and an end-to-end pass with a random-init run."""

import json

import numpy as np
import pandas as pd
import pytest

from cmafnet.cli import main
from cmafnet.config import dump_config, load_config
from cmafnet.data.splits import save_split, split_store
from cmafnet.data.store import PatchStore
from cmafnet.errors import ConfigError, RunFolderError
from cmafnet.evaluation.evaluate import evaluate_run, resolve_targets
from cmafnet.inference.predict import PredictOptions
from cmafnet.run import save_weights, write_meta

BREAKHIS_SUBTYPES = ("A", "F", "PT", "TA", "DC", "LC", "MC", "PC")


def _run_folder(path, store_path=None, *, classes=("non-IDC", "IDC"), with_model=True, num_classes=2):
    """A run folder in the run.py layout, with random-init smoke weights (no training needed)."""
    path.mkdir(parents=True)
    cfg = load_config("smoke", [f"model.num_classes={num_classes}"])
    (path / "config.yaml").write_text(dump_config(cfg))
    write_meta(path, {"classes": list(classes), "img_size": cfg.model.img_size})
    if store_path is not None:
        store = PatchStore.open(store_path)
        save_split(split_store(store, ratios=(0.5, 0.25, 0.25), seed=0), path / "split.json")
    if with_model:
        from cmafnet.models import create_model

        save_weights(create_model(cfg.model), path / "model.safetensors")
    return path


def test_run_without_model_fails_clearly(tmp_path, store_factory):
    store = store_factory()
    run = _run_folder(tmp_path / "run", store, with_model=False)
    with pytest.raises(RunFolderError, match="no model"):
        evaluate_run(run, store)
    assert main(["evaluate", str(run), "--store", str(store)]) == 4
    with pytest.raises(RunFolderError, match="not a run folder"):
        evaluate_run(tmp_path, store)


def test_store_with_other_class_set_fails_clearly(tmp_path, store_factory):
    idc = store_factory("idc")
    bh = store_factory("bh", dataset="breakhis", classes=("benign", "malignant"), subtypes=BREAKHIS_SUBTYPES)
    run = _run_folder(tmp_path / "run", idc, with_model=False)
    (run / "model.safetensors").write_bytes(b"")  # the class check comes before loading weights
    with pytest.raises(RunFolderError, match=r"class set mismatch.*--zero-shot"):
        evaluate_run(run, bh)
    assert main(["evaluate", str(run), "--store", str(bh)]) == 4


def test_resolve_targets(store_factory):
    bh = PatchStore.open(
        store_factory("bh", dataset="breakhis", classes=("benign", "malignant"), subtypes=BREAKHIS_SUBTYPES)
    )
    y, names, kind = resolve_targets(["non-IDC", "IDC"], bh, zero_shot=True)
    assert kind == "label" and names == ["benign", "malignant"] and (y == bh.targets("label")[0]).all()
    y8, _, kind8 = resolve_targets(list(BREAKHIS_SUBTYPES), bh)
    assert kind8 == "subtype" and (y8 == bh.targets("subtype")[0]).all()
    # Same class set in another order: labels are remapped by name.
    yr, _, _ = resolve_targets(["malignant", "benign"], bh)
    assert (yr == 1 - bh.targets("label")[0]).all()
    with pytest.raises(ConfigError, match="binary run"):
        resolve_targets(list(BREAKHIS_SUBTYPES), bh, zero_shot=True)
    with pytest.raises(RunFolderError, match="mismatch"):
        resolve_targets(["a", "b", "c"], bh)


def test_evaluate_end_to_end_with_threshold_and_zero_shot(tmp_path, store_factory):
    idc = store_factory("idc", n=24)
    bh = store_factory(
        "bh", n=16, dataset="breakhis", classes=("benign", "malignant"), subtypes=BREAKHIS_SUBTYPES,
        mags=("40X", "100X", "200X", "400X"),
    )  # fmt: skip
    run = _run_folder(tmp_path / "run", idc)
    doc = evaluate_run(run, idc, split="test", bootstrap=20, options=PredictOptions(batch_size=8))
    pred = pd.read_csv(run / "predictions_test.csv", dtype={"id": str})
    split = json.loads((run / "split.json").read_text())
    assert sorted(pred["row"]) == sorted(split["splits"]["test"]["indices"])
    assert {"id", "patient", "label", "prob_non-IDC", "prob_IDC", "source", "magnification"} <= set(
        pred.columns
    )
    assert np.allclose(pred[["prob_non-IDC", "prob_IDC"]].sum(axis=1), 1, atol=1e-5)
    saved = json.loads((run / "metrics_test.json").read_text())
    assert saved["metrics"]["n"] == len(pred) == doc["n"]
    # The operating threshold was chosen on validation, stored in run.json and used for the metrics.
    meta = json.loads((run / "run.json").read_text())
    assert meta["threshold"] == doc["operating_point"]["value"]
    assert meta["threshold_info"]["chosen_on"] == "val"
    assert meta["threshold_info"]["val_sensitivity"] >= load_config("smoke").eval.target_sensitivity
    assert "ci" in doc and doc["ci"]["balanced_accuracy"]["by"] == "patient"

    # Zero-shot on a BreakHis-like store: every image, per magnification, the stored threshold reused.
    zs = evaluate_run(run, bh, zero_shot=True, bootstrap=0, options=PredictOptions(batch_size=8))
    assert zs["name"] == "zeroshot_all" and zs["n"] == 16
    assert set(zs["by_magnification"]) == {"40X", "100X", "200X", "400X"}
    assert zs["operating_point"]["value"] == meta["threshold"]
    assert "prob_malignant" in pd.read_csv(run / "predictions_zeroshot_all.csv").columns
    # The report's Table 3 layout picks the zero-shot evaluation up (figures are tested elsewhere).
    from cmafnet.evaluation.report_tables import collect_run, zero_shot_table

    (label, cells), *_ = zero_shot_table([collect_run(run)])[0].rows
    assert label.endswith(" / zeroshot_all") and {"40X", "400X", "average", "std"} <= set(cells)


def test_real_breakhis_samples_zero_shot_and_8_class(tmp_path, sample_data, store_factory):
    """Real BreakHis files through ingest: zero-shot per magnification and an 8-class evaluation."""
    from cmafnet.data.ingest import ingest

    bh = tmp_path / "bh"
    ingest("breakhis", sample_data / "breakhis", bh, workers=1, size=(64, 64), progress=False)
    store = PatchStore.open(bh)
    binary = _run_folder(tmp_path / "idc_run", store_factory("idc"))
    zs = evaluate_run(
        binary, bh, zero_shot=True, bootstrap=0, choose_threshold=False, options=PredictOptions(batch_size=8)
    )
    assert zs["n"] == len(store)
    assert set(zs["by_magnification"]) >= {"40X"} and len(zs["by_magnification"]) == 4
    assert sum(e["n"] for e in zs["by_magnification"].values()) == len(store)
    json.dumps(zs, allow_nan=False)  # undefined metrics on tiny groups are None, never NaN

    sub = _run_folder(
        tmp_path / "sub_run", classes=store.subtype_classes, num_classes=len(store.subtype_classes)
    )
    doc = evaluate_run(sub, bh, split="all", bootstrap=5, options=PredictOptions(batch_size=8))
    assert doc["target"] == "subtype" and len(doc["metrics"]["confusion"]) == 8
    assert set(doc["metrics"]["per_class_recall"]) == set(store.subtype_classes)
    json.dumps(doc, allow_nan=False)
