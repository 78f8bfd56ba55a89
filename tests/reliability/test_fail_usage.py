"""Bad usage is exit 2 with one line, before any work; the documented codes are complete."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
from _corpus import one_error_line, rgb_png

import cmafnet.data.ingest as ingest_mod
from cmafnet.cli import build_parser

README = Path(__file__).resolve().parents[2] / "README.md"


TRAIN = ["train", "--config", "smoke", "--store", "STORE", "--split", "SPLIT", "--out", "TMP/r"]
PREDICT = ["predict", "RUN", "TMP/g.png", "--out", "TMP/p.csv"]
# case -> (argv with RUN / STORE / SPLIT / TMP placeholders, text the one error line must hold)
CASES = {
    "predict --threshold 2": (
        [*PREDICT, "--threshold", "2"],
        "argument --threshold: must be in [0, 1], got 2",
    ),
    "predict --threshold nan": ([*PREDICT, "--threshold", "nan"], "argument --threshold"),
    "predict --batch 0": ([*PREDICT, "--batch", "0"], "argument --batch: must be >= 1, got 0"),
    "evaluate --batch-size 0": (["evaluate", "RUN", "--store", "STORE", "--batch-size", "0"], "--batch-size"),
    "evaluate --bootstrap -1": (["evaluate", "RUN", "--store", "STORE", "--bootstrap", "-1"], "--bootstrap"),
    "export --opset 5": (["export", "RUN", "--opset", "5"], "argument --opset: must be >= 18, got 5"),
    "export --opset 99": (
        ["export", "RUN", "--opset", "99"],
        "--opset 99: the ONNX exporter writes opsets 18 to",
    ),
    "export --tolerance -1": (["export", "RUN", "--tolerance", "-1"], "argument --tolerance: must be >= 0"),
    "train --stop-after-steps 0": ([*TRAIN, "--stop-after-steps", "0"], "--stop-after-steps"),
    "train --stop-after-steps -1": ([*TRAIN, "--stop-after-steps", "-1"], "--stop-after-steps"),
    "train --set unparseable": (
        [*TRAIN, "--set", "train.batch_size=[1"],
        "--set train.batch_size=[1: not valid YAML",
    ),
    "train.stages=[]": ([*TRAIN, "--set", "train.stages=[]"], "train.stages: the stage list is empty"),
    "every stage 0 epochs": (
        [*TRAIN, "--set", "train.stages=[{name: a, epochs: 0, lr: 0.1}]"],
        "train.stages: every stage has 0 epochs",
    ),
    "ingest --workers 0": (["ingest", "idc", "TMP", "--out", "TMP/s", "--workers", "0"], "--workers"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_usage_is_exit_2_in_one_line_before_any_work(cli, run_dir, store_dir, split_file, tmp_path, case):
    rgb_png(tmp_path / "g.png")
    where = {"RUN": str(run_dir), "STORE": str(store_dir), "SPLIT": str(split_file), "TMP": str(tmp_path)}
    argv = [where.get(a.split("/")[0], a.split("/")[0]) + a[len(a.split("/")[0]) :] for a in CASES[case][0]]
    before = sorted(p.name for p in run_dir.iterdir())
    rc, stdout, err = cli(*argv)
    assert rc == 2
    assert CASES[case][1] in one_error_line(err)
    assert stdout == "" and sorted(p.name for p in run_dir.iterdir()) == before  # nothing written
    assert not (tmp_path / "r").exists() and not (tmp_path / "p.csv").exists()


def test_strict_on_an_existing_store_with_rejections(cli, idc_src, tmp_path):
    src = Path(shutil.copytree(idc_src, tmp_path / "src"))
    next(src.rglob("*.png")).write_bytes(b"")
    args = ["ingest", "idc", src, "--out", tmp_path / "s", "--workers", 1, "--no-progress"]
    rc, _, err = cli(*args)
    assert rc == 0, err
    rc, _, err = cli(*args, "--strict")  # up to date, but it holds a rejection
    assert rc == 3
    assert "--strict: 1 of 48 files were rejected when" in one_error_line(err) and "(1 zero bytes)" in err
    rc, stdout, err = cli(*args)  # without --strict: the no-op it always was
    assert rc == 0 and "nothing to do" in stdout, err


def test_interrupted_is_130_in_one_line(cli, idc_src, tmp_path, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ingest_mod, "ingest", interrupt)
    rc, _, err = cli("ingest", "idc", idc_src, "--out", tmp_path / "s")
    assert rc == 130 and one_error_line(err) == "cmafnet ingest: interrupted"


def test_exit_codes_documented():
    text = README.read_text()
    line = next(
        ln for ln in text.splitlines() if "exit codes are" in ln.lower() or "exit codes:" in ln.lower()
    )
    block = text[text.index(line) : text.index(line) + 600]
    for code in (
        "0 ok",
        "1 runtime failure",
        "2 bad usage",
        "3 bad input data",
        "4 missing",
        "130 interrupted",
    ):
        assert code in block, code
    assert "130 interrupted" in build_parser().epilog


def test_predict_with_every_kind_of_bad_row_still_writes_the_good_ones(cli, run_dir, tmp_path):
    """What a user meets in one folder: each bad file is a row, the good ones are predicted."""
    folder = tmp_path / "mixed"
    goods = [rgb_png(folder / f"good{i}.png", seed=i) for i in range(2)]
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("hello")
    rc, _, err = cli(
        "predict", run_dir, folder, "--out", tmp_path / "p.csv", "--no-tissue-check", "--no-progress"
    )
    assert rc == 0, err
    rows = pd.read_csv(tmp_path / "p.csv", keep_default_na=False).set_index("path")
    assert all(rows.loc[str(g), "status"] == "ok" for g in goods)
    assert rows.loc[str(folder / "empty.png"), "error"] == "zero bytes"
    assert rows.loc[str(folder / "text.png"), "error"] == "not an image: format not recognised"
