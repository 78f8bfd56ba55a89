"""Trainer-level tests on a toy model: stages, exact resume, non-finite handling, 2-process DDP."""

from __future__ import annotations

import json
import socket

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from _training_toy import ddp_config, ddp_worker, make_trainer, resume_and_compare, toy_config, toy_data

from cmafnet.errors import CmafnetError
from cmafnet.training import run_stages
from cmafnet.training.checkpoint import load_checkpoint


def _state(trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def _start(trainer) -> None:
    trainer.out.mkdir(parents=True, exist_ok=True)


def test_three_stages_freeze_and_records(tmp_path):
    cfg = toy_config()
    tr = make_trainer(tmp_path, cfg)
    before = _state(tr)
    summary = run_stages(tr)
    assert summary["status"] == "finished" and summary["epochs"] == 6 and summary["global_step"] == 18
    rows = pd.read_csv(tmp_path / "metrics.csv")
    assert list(rows["stage_name"]) == ["branches"] * 2 + ["fusion"] * 2 + ["end_to_end"] * 2
    assert {"lr", "train_loss", "val_balanced_accuracy", "val_auprc", "grad_norm_c0", "margin_c1"} <= set(
        rows.columns
    )
    assert "train_ce_spatial" in rows.columns and rows["train_ce_spatial"].iloc[:2].notna().all()
    after = tr.model.state_dict()
    # the temporary heads train only in stage 1, and stages 2-3 never touch them
    assert not torch.equal(before["aux_heads.spatial.weight"], after["aux_heads.spatial.weight"])
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "checkpoints/last.pt").exists()
    meta = json.loads((tmp_path / "run.json").read_text())
    assert meta["status"] == "finished" and meta["best_epoch"] >= 3  # best is tracked from stage 2 on


def test_fusion_stage_freezes_extractors(tmp_path):
    cfg = toy_config(stages=[{"name": "fusion", "epochs": 1, "lr": 1e-2, "train": "fusion"}])
    tr = make_trainer(tmp_path, cfg)
    before = _state(tr)
    run_stages(tr)
    after = tr.model.state_dict()
    for k in before:
        changed = not torch.equal(before[k], after[k])
        if k.startswith(("spatial", "contextual", "aux_heads")):
            assert not changed, f"{k} changed in a fusion stage (BN statistics included)"
        elif k.startswith(("fusion", "head")) and k.endswith("weight"):
            assert changed, k


@pytest.mark.parametrize("stop_at", [4, 8, 9])  # mid-epoch stage 1; mid-epoch stage 2; end of an epoch
def test_resume_is_bit_identical(tmp_path, stop_at):
    cfg = toy_config()
    ref = make_trainer(tmp_path / "ref", cfg)
    run_stages(ref)
    part = make_trainer(tmp_path / "run", cfg, stop_after_steps=stop_at)
    assert run_stages(part)["status"] == "stopped"
    state = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    assert (
        state["progress"]["global_step"] == stop_at
        and state["progress"]["step_in_epoch"] == (stop_at - 1) % 3 + 1
    )
    resume_and_compare(ref, tmp_path / "run", cfg, state)


def test_callback_stop_and_signal(tmp_path):
    cfg = toy_config()
    tr = make_trainer(tmp_path, cfg, callbacks=[lambda t: t.p.global_step == 2])
    assert run_stages(tr)["status"] == "stopped"
    assert load_checkpoint(tmp_path / "checkpoints/last.pt")["progress"]["global_step"] == 2

    import os
    import signal

    def send_sigterm(t):
        if t.p.global_step == 5:
            os.kill(os.getpid(), signal.SIGTERM)

    tr2 = make_trainer(tmp_path / "sig", cfg, callbacks=[send_sigterm])
    assert run_stages(tr2)["status"] == "interrupted"
    assert load_checkpoint(tmp_path / "sig/checkpoints/last.pt")["progress"]["global_step"] == 5
    assert signal.getsignal(signal.SIGTERM) is not None  # the previous handler is back


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    cfg = toy_config(stages=[{"name": "all", "epochs": 2, "lr": 1e-2, "train": "all"}])
    tr = make_trainer(tmp_path, cfg, toy_data(nan_steps={2, 3}))
    summary = run_stages(tr)
    assert summary["status"] == "finished" and summary["nonfinite_steps"] == 2
    assert all(torch.isfinite(v).all() for v in tr.model.state_dict().values() if v.is_floating_point())
    assert pd.read_csv(tmp_path / "metrics.csv")["nonfinite_steps"].tolist() == [2, 2]


def test_persistent_nonfinite_stops_with_clear_error(tmp_path):
    cfg = toy_config(stages=[{"name": "all", "epochs": 3, "lr": 1e-2, "train": "all"}], max_nonfinite_steps=3)
    tr = make_trainer(tmp_path, cfg, toy_data(nan_steps=set(range(4, 100))))  # epoch 1 (3 steps) is clean
    with pytest.raises(CmafnetError, match="3 consecutive non-finite steps"):
        run_stages(tr)
    state = load_checkpoint(tmp_path / "checkpoints/last.pt")  # the end-of-epoch-1 checkpoint, intact
    assert state["progress"]["global_step"] == 3 and state["progress"]["epoch"] == 1
    assert json.loads((tmp_path / "run.json").read_text())["status"] == "failed"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tmp_path):
    """2 ranks x 4 samples (gloo) vs 1 process x 8 samples: same batches, same averaged gradient.
    Tolerance 1e-5 absolute: only the all-reduce summation order differs."""
    mp.spawn(ddp_worker, args=(2, str(tmp_path / "ddp"), _free_port()), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp/final.pt", weights_only=True)
    single = make_trainer(
        tmp_path / "single", ddp_config(), toy_data(noise=0.0), model_kw={"dropout": 0.0, "bn": False}
    )
    run_stages(single)
    ref = single.model.state_dict()
    init = make_trainer(
        tmp_path / "init", ddp_config(), model_kw={"dropout": 0.0, "bn": False}
    ).model.state_dict()
    for k in ("head.weight", "fusion.0.weight", "spatial.0.weight"):
        assert not torch.equal(ref[k], init[k]), f"{k} did not train"
    for k in ref:
        torch.testing.assert_close(ddp[k], ref[k], atol=1e-5, rtol=0)


def test_switches_bf16_channels_last_sdpa(tmp_path):
    cfg = toy_config(
        amp="bf16", channels_last=True, sdpa_backend="math", clip={"kind": "agc"},
        stages=[{"name": "all", "epochs": 1, "lr": 1e-2, "train": "all"}],
    )  # fmt: skip
    tr = make_trainer(tmp_path, cfg)
    before = _state(tr)
    s = run_stages(tr)
    assert s["status"] == "finished" and s["nonfinite_steps"] == 0
    assert not torch.equal(before["head.weight"], tr.model.state_dict()["head.weight"])


@pytest.mark.parametrize("every", [{"checkpoint_every_steps": 1}, {"checkpoint_every_minutes": 1e-9}])
def test_mid_epoch_checkpoints_survive_a_crash_and_resume_exactly(tmp_path, every):
    """A process killed mid-epoch (no chance to save) loses at most the steps since the last periodic
    checkpoint; resuming from it ends bit-identical to a run never interrupted."""
    cfg = toy_config(**every)
    ref = make_trainer(tmp_path / "ref", cfg)
    run_stages(ref)

    def crash(run):
        if run.p.global_step == 5:  # step 5 of 18, mid-epoch (3 steps per epoch)
            raise RuntimeError("killed")

    part = make_trainer(tmp_path / "run", cfg, callbacks=[crash])
    with pytest.raises(RuntimeError, match="killed"):
        run_stages(part)
    state = load_checkpoint(tmp_path / "run/checkpoints/last.pt")
    # the step before the crash, mid-epoch (the epoch-end checkpoint of step 3 is the only other one)
    assert state["progress"]["global_step"] == 4 and state["progress"]["step_in_epoch"] == 1
    resume_and_compare(ref, tmp_path / "run", cfg, state)
