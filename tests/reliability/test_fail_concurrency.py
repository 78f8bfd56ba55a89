"""A folder a live process writes is never written by a second one: `train`, `--resume`, `evaluate`,
`ingest` and an experiment's run folders are refused at once (exit 4, one line naming the holder's pid)
or, in an experiment, left to the holder; the lock of a killed process is taken over without cleanup."""

from __future__ import annotations

import os
import shutil

import pytest
from _corpus import FAST, SMOKE_SETS, Holder, one_error_line, python, snapshot

from cmafnet.experiments.runner import Context, run_table
from cmafnet.files import LOCK_FILE, FolderInUse, hold_folder
from cmafnet.run import write_meta

# A trainer that stops inside its first step's callback (after run.json, config.yaml and split.json are
# written) until the test kills it.
TRAINER = """import sys, time
from cmafnet.config import load_config
from cmafnet.training import fit
store, split, out = sys.argv[1:4]
def block(run):
    print("training", flush=True)
    time.sleep(600)
fit(load_config("smoke", sys.argv[4:]), store, split, out, progress=False, callbacks=[block], device="cpu")
"""


@pytest.mark.slow
def test_two_trains_into_one_out_one_proceeds_and_a_killed_trainers_lock_is_taken_over(
    cli, store_dir, split_file, tmp_path
):
    out = tmp_path / "run"
    first = python(TRAINER, store_dir, split_file, out, *SMOKE_SETS)
    try:
        assert first.stdout is not None and first.stdout.readline().strip() == "training"
        before = snapshot(out)
        assert {"config.yaml", "run.json", "split.json"} <= set(before)
        rc, _, err = cli("train", *FAST, "--set", "train.seed=1", "--store", store_dir, "--split", split_file,
                         "--out", out)  # fmt: skip
        line = one_error_line(err)
        assert rc == 4 and f"pid {first.pid} " in line and "(cmafnet train)" in line, line
        assert snapshot(out) == before  # the second run changed nothing: the first one's files are intact
    finally:
        first.kill()  # kill -9: the lock file stays, naming a dead process
        first.wait(60)
    assert f"pid {first.pid} " in (out / LOCK_FILE).read_text()
    with hold_folder(out, "cmafnet train"):  # taken over at once (a real command does so in the ingest test)
        assert f"pid {os.getpid()} " in (out / LOCK_FILE).read_text()


def test_resume_and_evaluate_of_a_held_run_exit_4_naming_the_holder(
    cli, run_dir, store_dir, split_file, tmp_path
):
    run = shutil.copytree(run_dir, tmp_path / "run")
    before = snapshot(run)
    with Holder(run, "cmafnet train") as holder:
        for argv in (
            [
                "train",
                "--resume",
                "--out",
                run,
                "--store",
                store_dir,
                "--split",
                split_file,
                "--device",
                "cpu",
            ],
            ["evaluate", run, "--store", store_dir, "--all", "--device", "cpu"],
        ):
            rc, out, err = cli(*argv)
            line = one_error_line(err)
            assert rc == 4 and f"{run}: in use by pid {holder.pid} " in line and "(cmafnet train)" in line, (
                line
            )
            assert out == "" and snapshot(run) == before
        holder.release()
    assert not (run / LOCK_FILE).exists()  # removed by its holder on release


def test_evaluate_into_a_held_out_folder_exits_4(cli, run_dir, store_dir, tmp_path):
    with Holder(tmp_path / "eval", "cmafnet evaluate") as holder:
        rc, _, err = cli("evaluate", run_dir, "--store", store_dir, "--all", "--out", tmp_path / "eval")
        assert rc == 4 and f"in use by pid {holder.pid} " in one_error_line(err)
        assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [LOCK_FILE]


def test_ingest_into_a_held_out_exits_4_and_a_killed_holder_is_taken_over(cli, idc_src, tmp_path):
    store = tmp_path / "store"
    args = ["ingest", "idc", idc_src, "--out", store, "--workers", "1", "--no-progress"]
    with Holder(store, "cmafnet ingest") as holder:
        rc, _, err = cli(*args)
        assert rc == 4 and f"in use by pid {holder.pid} " in one_error_line(err)
        assert sorted(p.name for p in store.iterdir()) == [LOCK_FILE]  # nothing written
        holder.kill()
    rc, _, err = cli(*args)
    assert rc == 0, err
    assert (store / "meta.json").exists() and not (store / LOCK_FILE).exists()


def test_a_hold_in_this_process_nests_and_a_held_folder_is_refused(tmp_path):
    folder = tmp_path / "a" / "b"
    with hold_folder(folder, "cmafnet train"), hold_folder(folder, "cmafnet evaluate"):
        assert "(cmafnet train)" in (folder / LOCK_FILE).read_text()  # the nested hold is a no-op
    assert not (tmp_path / "a").exists()  # a hold that wrote nothing leaves nothing
    with Holder(folder) as holder, pytest.raises(FolderInUse) as err, hold_folder(folder, "cmafnet train"):
        pass
    assert err.value.exit_code == 4 and f"pid {holder.pid} " in str(err.value)


class Work:
    """The runner's train and evaluate steps, recorded (no model is trained)."""

    def __init__(self) -> None:
        self.trained: list[str] = []

    def train(self, spec, run_dir, ctx, resume) -> None:
        self.trained.append(spec.run_id)
        write_meta(run_dir, {"status": "finished"})

    def evaluate(self, spec, run_dir, ctx) -> dict:
        return {"metrics": {}}


def test_an_experiment_leaves_a_held_run_folder_to_its_holder(tmp_path):
    ctx = Context(out=tmp_path / "exp", store=tmp_path, scale="smoke")
    held = ctx.out / "runs" / "resnet50" / "seed0"
    work = Work()
    with Holder(held, "cmafnet experiment") as holder:
        s = run_table("table1", ctx, seeds=1, only=["resnet50", "densenet121"], train_fn=work.train,
                      eval_fn=work.evaluate)  # fmt: skip
        assert len(s.busy) == 1 and s.busy[0].startswith(f"resnet50/seed0 (in use by pid {holder.pid} on ")
        assert work.trained == ["densenet121/seed0"] and sorted(p.name for p in held.iterdir()) == [LOCK_FILE]
        holder.release()
    s = run_table("table1", ctx, seeds=1, only=["resnet50", "densenet121"], train_fn=work.train,
                  eval_fn=work.evaluate)  # fmt: skip
    assert not s.busy and work.trained[1:] == ["resnet50/seed0"] and s.skipped == ["densenet121/seed0"]
