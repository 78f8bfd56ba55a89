"""End to end: the shipped smoke config trains CMAF-Net through all three stages on a generated store,
through the ``cmafnet train`` command, and resumes."""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest

from cmafnet.cli import main
from cmafnet.config import load_config
from cmafnet.errors import ConfigError, RunFolderError
from cmafnet.run import load_run
from cmafnet.training import fit
from cmafnet.training.checkpoint import load_checkpoint, save_checkpoint

FAST = ["train.batch_size=16", "train.eval_batch_size=32", "train.max_steps_per_epoch=2"]


@pytest.mark.slow
def test_cli_smoke_trains_all_three_stages(store_and_split, tmp_path, capsys, caplog):
    store, split = store_and_split
    out = tmp_path / "run"
    t0 = time.perf_counter()
    sets = [arg for s in FAST for arg in ("--set", s)]
    with caplog.at_level("INFO", logger="cmafnet.training"):
        rc = main(["train", "--config", "smoke", *sets, "--store", str(store), "--split", str(split),
                   "--out", str(out), "--no-progress", "--device", "cpu"])  # fmt: skip
    elapsed = time.perf_counter() - t0
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["status"] == "finished" and summary["epochs"] == 3 and summary["global_step"] == 6
    assert elapsed < 60, f"smoke training took {elapsed:.1f}s"
    rows = pd.read_csv(out / "metrics.csv")
    assert list(rows["stage_name"]) == ["branches", "fusion", "end_to_end"]
    for col in ("train_ce_spatial", "train_cls", "train_kl_s", "train_redundancy", "val_auprc", "mi_zs_x",
                "mi_zt_x", "mi_zs_zt", "mi_zfused_y_lb", "attn_entropy_h0", "tau_h7", "gate_mean", "gate_std",
                "grad_norm_c0", "grad_norm_c1", "margin_c0", "lr"):  # fmt: skip
        assert col in rows.columns, col
    assert rows["mi_zs_x"].notna().all() and rows["tau_h0"].gt(0).all()
    # the trainer reports its own speed: per epoch (log line, metrics.csv) and per stage (run.json)
    assert rows["train_img_s"].gt(0).all() and rows["step_ms"].gt(0).all()
    assert rows["train_img_s"].to_numpy() == pytest.approx(
        2 * 16 / (rows["step_ms"].to_numpy() * 2 / 1e3), rel=1e-3
    )
    epoch_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert len(epoch_lines) == 3 and all(" img/s (" in line and " ms/step)" in line for line in epoch_lines)
    meta = json.loads((out / "run.json").read_text())
    speed = meta["stage_throughput"]
    assert list(speed) == ["branches", "fusion", "end_to_end"] and meta["device"]
    for name, row in zip(speed, rows.itertuples(), strict=True):
        assert speed[name]["steps"] == 2 and speed[name]["images"] == 32
        assert speed[name]["img_s"] == pytest.approx(32 / speed[name]["seconds"], rel=5e-3)  # both rounded
        assert speed[name]["img_s"] == pytest.approx(row.train_img_s, rel=1e-2)  # one epoch per stage
    assert summary["stage_throughput"] == speed
    assert meta["status"] == "finished" and meta["img_size"] == 64 and meta["classes"]
    assert meta["stain_reference"] is not None and meta["effective_batch_size"] == 16
    assert (meta["patch_mpp"], meta["patch_hw"], meta["patch_px"]) == (
        4.0,
        [50, 50],
        50,
    )  # the trainer's scale
    # training ended by fitting the temperature and choosing the threshold on its validation split
    cal = meta["calibration"]
    assert cal["fitted_on"] == "val" and cal["n"] == meta["n_val"] and cal["n_patients"] >= 1
    assert 0 < meta["threshold"] < 1 and meta["threshold_info"]["chosen_on"] == "val"
    assert summary["calibration"]["temperature"] == meta["temperature"]
    assert (out / "metrics_val.json").exists()
    loaded = load_run(out)  # the run folder is what evaluation/inference read
    assert loaded.model.training is False
    # a finished run refuses to be overwritten and resumes to a no-op
    with pytest.raises(RunFolderError, match="already holds a run"):
        fit(load_config("smoke", FAST), store, split, out, progress=False, device="cpu")
    again = fit(load_config("smoke", FAST), store, split, out, resume=True, progress=False, device="cpu")
    assert again["status"] == "finished" and again["global_step"] == 6


@pytest.mark.slow
def test_fit_resume_checks_config_and_stops(store_and_split, tmp_path):
    store, split = store_and_split
    cfg = load_config("smoke", [*FAST, "train.sam.enabled=false", "model.head.dropout=0.0"])
    out = tmp_path / "run"
    s = fit(cfg, store, split, out, progress=False, stop_after_steps=1, device="cpu")
    assert s["status"] == "stopped" and s["global_step"] == 1
    assert json.loads((out / "run.json").read_text())["status"] == "stopped"
    with pytest.raises(ConfigError, match="config differs"):
        fit(load_config("smoke", FAST), store, split, out, resume=True, progress=False, device="cpu")
    # a run started before a config key existed resumes: the stored config is validated again first
    state = load_checkpoint(out / "checkpoints/last.pt")
    assert "checkpoint_every_steps" in state["config"]
    state["config"] = "\n".join(x for x in state["config"].splitlines() if "checkpoint_every_steps" not in x)
    save_checkpoint(out / "checkpoints/last.pt", {k: v for k, v in state.items() if k != "format"})
    s = fit(cfg, store, split, out, resume=True, progress=False, stop_after_steps=2, device="cpu")
    assert s["status"] == "stopped" and s["global_step"] == 2
    # a folder without a checkpoint is never a dead end: --resume starts it from the beginning
    s = fit(
        cfg, store, split, tmp_path / "empty", resume=True, progress=False, stop_after_steps=1, device="cpu"
    )
    assert s["status"] == "stopped" and s["global_step"] == 1
    with pytest.raises(ConfigError, match="batch_size"):
        fit(load_config("smoke", ["train.batch_size=4096"]), store, split, tmp_path / "big", progress=False,
            device="cpu")  # fmt: skip


@pytest.mark.parametrize("deterministic", [False, True])
def test_fit_chooses_kernels_for_the_run_and_restores_the_flags(store_and_split, tmp_path, deterministic):
    """cuDNN autotunes during a run unless ``train.deterministic``; the process's flags come back after."""
    import torch

    store, split = store_and_split
    seen: list[tuple[bool, bool, bool]] = []

    def flags() -> tuple[bool, bool, bool]:
        cudnn = torch.backends.cudnn
        return cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled()

    def record(trainer) -> None:
        seen.append(flags())

    before = flags()
    cfg = load_config("smoke", [*FAST, f"train.deterministic={str(deterministic).lower()}"])
    fit(
        cfg,
        store,
        split,
        tmp_path / "run",
        progress=False,
        stop_after_steps=1,
        device="cpu",
        callbacks=[record],
    )
    assert seen and set(seen) == {(not deterministic, deterministic, deterministic)}
    assert flags() == before


def test_imbalance_applies_to_training_indices_only(store_and_split):
    import numpy as np

    from cmafnet.training import prepare_data

    store, split = store_and_split
    natural = prepare_data(load_config("smoke"), store, split, torch_device())
    data = prepare_data(load_config("smoke", ["data.imbalance=90:10"]), store, split, torch_device())
    n0, n1 = data.class_counts
    assert n0 == natural.class_counts[0] and n1 == round(n0 * 10 / 90)
    assert np.array_equal(data.val_idx, natural.val_idx)  # validation keeps the natural ratio
    assert data.meta["stain_reference"]["method"] == "macenko"


def torch_device():
    import torch

    return torch.device("cpu")


@pytest.mark.slow
def test_real_model_resume_is_bit_identical(store_and_split, tmp_path):
    """CMAF-Net with augmentation, SAM, A-CBFL and all regularisers, stopped mid-run and resumed."""
    import torch

    store, split = store_and_split
    cfg = load_config("smoke", ["train.batch_size=16", "train.max_steps_per_epoch=1"])
    fit(cfg, store, split, tmp_path / "a", progress=False, device="cpu")
    fit(cfg, store, split, tmp_path / "b", progress=False, device="cpu", stop_after_steps=2)
    fit(cfg, store, split, tmp_path / "b", progress=False, device="cpu", resume=True)
    a = torch.load(tmp_path / "a/checkpoints/last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "b/checkpoints/last.pt", weights_only=True)["model"]
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
