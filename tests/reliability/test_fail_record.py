"""A damaged or hand-edited run.json: one line naming the file and the field, exit 4, never a silent default."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from _corpus import FAST, one_error_line, rgb_png

from cmafnet.run import RunRecord

COST = {
    "stages": {"s1": {"steps": 2, "images": 16, "passes": 2, "macs": 1e9, "seconds": 1.0}},
    "total": {"steps": 2, "images": 16, "passes": 2, "macs": 1e9, "seconds": 1.0},
    "macs_per_image": 3e7, "device": "cpu", "convention": "forward MACs x passes",
}  # fmt: skip
THRESHOLD_INFO = {
    "value": 0.4, "target_sensitivity": 0.9, "chosen_on": "val", "n_val": 20, "temperature": 1.5,
    "val_sensitivity": 0.9, "val_specificity": 0.7,
}  # fmt: skip


def _edited(run_dir: Path, tmp_path: Path, **fields: object) -> Path:
    """A copy of ``run_dir`` whose run.json has ``fields`` set (NaN written as JSON's NaN token)."""
    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    doc = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**doc, **fields}))
    return run


def _predict(cli, run: Path, tmp_path: Path, *extra: object) -> tuple[int, str]:
    rc, _, err = cli("predict", run, rgb_png(tmp_path / "g.png"), "--out", tmp_path / "p.csv", "--no-progress",
                     *extra)  # fmt: skip
    assert not (tmp_path / "p.csv").exists()
    return rc, err


@pytest.mark.parametrize("value", [1e-300, float("nan"), -1, 0, "abc", float("inf")])
def test_a_damaged_temperature_is_exit_4(cli, run_dir, tmp_path, value):
    run = _edited(run_dir, tmp_path, temperature=value)
    rc, err = _predict(cli, run, tmp_path)
    line = one_error_line(err)
    assert rc == 4 and "run.json: temperature: " in line, line


@pytest.mark.parametrize("value", [float("nan"), 2, -1, 0, 1, "0.5"])
def test_a_damaged_threshold_is_exit_4(cli, run_dir, tmp_path, value):
    run = _edited(run_dir, tmp_path, threshold=value)
    rc, err = _predict(cli, run, tmp_path)
    assert rc == 4 and "run.json: threshold: " in one_error_line(err)


def test_a_threshold_chosen_at_temperature_0_is_exit_4(cli, run_dir, tmp_path):
    # (once, mapped to another temperature, it flipped decisions)
    run = _edited(run_dir, tmp_path, threshold=0.4, threshold_info={**THRESHOLD_INFO, "temperature": 0})
    rc, err = _predict(cli, run, tmp_path, "--calibration", "off")
    assert rc == 4 and "run.json: threshold_info.temperature: " in one_error_line(err)


def test_a_valid_threshold_and_temperature_are_used_and_said(cli, run_dir, tmp_path):
    run = _edited(run_dir, tmp_path, threshold=0.4, threshold_info=THRESHOLD_INFO)
    rc, _, err = cli(
        "predict", run, rgb_png(tmp_path / "g.png"), "--out", tmp_path / "p.csv", "--no-progress"
    )
    assert rc == 0, err
    assert (tmp_path / "p.csv").exists()


def test_a_patch_size_of_zero_is_exit_4(cli, run_dir, tmp_path):
    run = _edited(run_dir, tmp_path, patch_mpp=4.0, patch_hw=[0, 0])
    rc, err = _predict(cli, run, tmp_path, "--input-mpp", "0.5")
    assert rc == 4 and "run.json: patch_hw.0: " in one_error_line(err)


@pytest.mark.parametrize("macs", [float("nan"), "1e9", -5])
def test_a_reference_run_with_a_damaged_cost_is_exit_4(cli, run_dir, store_dir, split_file, tmp_path, macs):
    ref = _edited(run_dir, tmp_path, cost={**COST, "total": {**COST["total"], "macs": macs}})
    out = tmp_path / "out"
    rc, _, err = cli("train", *FAST, "--store", store_dir, "--split", split_file, "--out", out,
                     "--set", f"train.budget.match={ref}")  # fmt: skip
    assert rc == 4 and "run.json: cost.total.macs: " in one_error_line(err)
    assert not out.exists()


def test_a_run_json_of_another_version_or_with_unknown_keys_is_exit_4(cli, run_dir, tmp_path):
    run = _edited(run_dir, tmp_path, schema_version=0)
    rc, err = _predict(cli, run, tmp_path)
    assert rc == 4 and "run.json: schema_version: " in one_error_line(err)
    doc = json.loads((run / "run.json").read_text())
    del doc["schema_version"]
    (run / "run.json").write_text(json.dumps(doc))
    rc, err = _predict(cli, run, tmp_path)
    assert rc == 4 and "written by an earlier cmafnet version" in one_error_line(err)
    (run / "run.json").write_text(json.dumps({**doc, "schema_version": 1, "temprature": 1.2}))
    rc, err = _predict(cli, run, tmp_path)
    assert rc == 4 and "run.json: temprature: Extra inputs are not permitted" in one_error_line(err)


def test_every_key_training_writes_is_in_the_record(run_dir):
    # the corpus run is written through the record: it reads back unchanged
    doc = json.loads((run_dir / "run.json").read_text())
    assert RunRecord.model_validate(doc).model_dump(exclude_unset=True) == doc
