"""A run folder is never a dead end: a run that died before its first checkpoint restarts, with or without
--resume, without deleting anything by hand."""

from __future__ import annotations

import json

from _corpus import FAST


def test_a_run_killed_before_its_first_checkpoint_restarts(cli, store_dir, split_file, tmp_path):
    out = tmp_path / "run"
    args = ["train", *FAST, "--store", store_dir, "--split", split_file, "--out", out]
    rc, _, err = cli(*args, "--stop-after-steps", "1")
    assert rc == 0, err
    (out / "checkpoints" / "last.pt").unlink()  # as if killed before the first checkpoint was written
    assert json.loads((out / "run.json").read_text())["status"] == "stopped"
    rc, _, err = cli(*args, "--resume", "--stop-after-steps", "1")  # --resume: starts from the beginning
    assert rc == 0, err
    assert json.loads((out / "run.json").read_text())["global_step"] == 1
    (out / "checkpoints" / "last.pt").unlink()
    rc, _, err = cli(*args)  # a plain rerun: the same
    assert rc == 0, err
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    rc, _, err = cli(*args)  # a folder with a checkpoint is still protected
    assert rc == 4 and "already holds a run: pass --resume" in err
