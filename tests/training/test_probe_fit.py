"""The probe through the one trainer: probe_demo trains on cached embeddings, then evaluate and report work on its
run folder; the cache is reused across seeds and rebuilt for a changed input; the kNN head takes no gradient
step; the extraction's MACs are part of the cost record; inputs can be resampled to the backbone's scale."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from cmafnet.cli import main
from cmafnet.data.features import FEATURES_FILE
from cmafnet.data.store import PatchStore
from cmafnet.run import load_run

FAST = [
    "train.batch_size=16",
    "train.eval_batch_size=32",
    "train.stages.0.epochs=3",
    "model.probe.native_mpp=2.0",
]


def _train(store: Path, split: Path, out: Path, cache: Path, *sets: str) -> int:
    args = [a for s in (*FAST, f"model.probe.cache_dir={cache}", *sets) for a in ("--set", s)]
    return main(["train", "--config", "probe_demo", *args, "--store", str(store), "--split", str(split),
                 "--out", str(out), "--no-progress", "--device", "cpu"])  # fmt: skip


def _meta(run: Path) -> dict:
    return json.loads((run / "run.json").read_text())


@pytest.mark.slow
def test_probe_demo_trains_on_cached_embeddings_then_evaluates_and_reports(store_and_split, tmp_path, caplog):
    store, split = store_and_split
    cache = tmp_path / "cache"
    with caplog.at_level("WARNING", logger="cmafnet.training.probe_data"):
        assert _train(store, split, tmp_path / "a", cache) == 0
    # 50 px IDC patches at 4 um/px shown at 64 px: the backbone sees 3.125 um/px, not its 2.0
    assert any(
        "sees 3.12 um/px" in r.getMessage() and "match_scale" in r.getMessage() for r in caplog.records
    )
    meta = _meta(tmp_path / "a")
    ext, total = meta["cost"]["extraction"], meta["cost"]["total"]
    n_used = meta["n_train"] + meta["n_val"]
    assert meta["status"] == "finished" and ext["reused"] is False and ext["extracted_images"] == 96
    assert ext["images"] == n_used and ext["macs"] == n_used * ext["macs_per_image"] > 0
    assert total["macs"] == ext["macs"] + meta["cost"]["stages"]["probe"]["macs"]
    assert meta["cost"]["macs_per_image"] < ext["macs_per_image"] / 1000  # the steps train a linear head
    run = load_run(tmp_path / "a")
    probe = run.config.model.probe
    assert probe.input_mpp == pytest.approx(3.125) and probe.fingerprint == run.model.fingerprint
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "a" / "model.safetensors")) == {"head.weight", "head.bias"}

    # evaluate feeds images: the model embeds them as the cache did
    feats = np.load(Path(ext["cache"]) / FEATURES_FILE)
    images = torch.from_numpy(np.array(PatchStore.open(store).images[:8])).permute(0, 3, 1, 2)
    from cmafnet.inference.preprocess import build_preprocess

    pre, _ = build_preprocess(run, torch.device("cpu"))
    assert np.allclose(run.model.embed_images(pre(images)).numpy(), feats[:8], atol=1e-4)
    assert main(["evaluate", str(tmp_path / "a"), "--store", str(store), "--split", "test"]) == 0
    assert main(["report", str(tmp_path / "a"), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "report.html").exists()

    # another seed: the same embeddings, no extraction, the same extraction MACs charged
    assert _train(store, split, tmp_path / "b", cache, "train.seed=1") == 0
    again = _meta(tmp_path / "b")["cost"]["extraction"]
    assert again["reused"] is True and again["extracted_images"] == 0 and again["key"] == ext["key"]
    assert again["macs"] == ext["macs"]
    # another preprocessing: another key, a new extraction
    assert _train(store, split, tmp_path / "c", cache, "data.interpolation=bilinear") == 0
    other = _meta(tmp_path / "c")["cost"]["extraction"]
    assert other["reused"] is False and other["key"] != ext["key"]
    assert len(list(cache.iterdir())) == 2


@pytest.mark.slow
def test_knn_probe_takes_no_gradient_step(store_and_split, tmp_path, capsys):
    store, split = store_and_split
    assert (
        _train(
            store, split, tmp_path / "knn", tmp_path / "cache", "model.probe.head=knn", "model.probe.knn.k=5"
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "finished" and summary["global_step"] == 0
    meta = _meta(tmp_path / "knn")
    assert (
        meta["cost"]["stages"] == {} and meta["cost"]["total"]["macs"] == meta["cost"]["extraction"]["macs"]
    )
    rows = pd.read_csv(tmp_path / "knn" / "metrics.csv")
    assert list(rows["stage_name"]) == ["knn"] and rows["val_auprc"].notna().all()
    run = load_run(tmp_path / "knn")
    assert len(run.model.head.bank) == meta["n_train"]
    assert main(["evaluate", str(tmp_path / "knn"), "--store", str(store), "--bootstrap", "0"]) == 0


@pytest.mark.slow
def test_scale_matched_probe_resamples_inside_the_model(store_and_split, tmp_path):
    store, split = store_and_split
    assert _train(store, split, tmp_path / "raw", tmp_path / "cache", "train.stages.0.epochs=1") == 0
    assert _train(store, split, tmp_path / "scaled", tmp_path / "cache", "train.stages.0.epochs=1",
                  "model.probe.match_scale=true") == 0  # fmt: skip
    raw, scaled = (_meta(tmp_path / k)["cost"]["extraction"] for k in ("raw", "scaled"))
    # 3.125 um/px -> 2.0: 64 px become 100, covered by 2 x 2 tiles of 64: four backbone passes per image
    assert scaled["macs_per_image"] == pytest.approx(4 * raw["macs_per_image"], rel=0.01)
    assert scaled["key"] != raw["key"]
    model = load_run(tmp_path / "scaled").model
    assert model.zoom == pytest.approx(3.125 / 2.0)
    assert main(["evaluate", str(tmp_path / "scaled"), "--store", str(store), "--bootstrap", "0"]) == 0


def test_cached_embeddings_refuse_augmentation(store_and_split, tmp_path, capsys):
    store, split = store_and_split
    assert _train(store, split, tmp_path / "aug", tmp_path / "cache", "data.augment.enabled=true") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "data.augment.enabled: cached embeddings are not augmented" in err
