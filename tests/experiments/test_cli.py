"""`cmafnet experiment`: --list, --dry-run, shard flags and clear errors with exit codes."""

from __future__ import annotations

from pathlib import Path

import pytest

from cmafnet.cli import main
from cmafnet.experiments.cost import anchor_rates, method_rate, run_seconds
from cmafnet.experiments.paper_tables import expand
from cmafnet.run import write_meta


def test_list_prints_every_table_with_runs_and_cost(capsys: pytest.CaptureFixture) -> None:
    assert main(["experiment", "--list"]) == 0
    out = capsys.readouterr().out
    for i, runs in zip(range(1, 9), (75, 150, 20, 25, 15, 95, 35, 4), strict=True):
        line = next(x for x in out.splitlines() if x.startswith(f"table{i} "))
        assert f"= {runs}" in line
        assert float(line.split()[4]) > 0  # GPU-hours
    assert "Assumptions" in out


def test_cost_follows_throughput_and_data_size() -> None:
    rates, _ = anchor_rates()
    t1 = {s.row: run_seconds(s, rates) for s in expand("table1", 1)}
    assert t1["densenet121"] > t1["resnet50"]  # slower model, same data
    assert t1["cmafnet"] > t1["resnet50"]  # SAM doubles the step cost
    t2 = {(s.row, s.column): run_seconds(s, rates) for s in expand("table2", 1)}
    assert t2[("resnet50", "99:1")] < t2[("resnet50", "80:20")] < t2[("resnet50", None)]  # undersampling
    tr, _ = method_rate("transfuse", rates)
    assert tr < min(method_rate("resnet50", rates)[0], method_rate("deit_s", rates)[0])


def _fake_run(path: Path, model: str, stage_img_s: dict[str, float], img_size: int = 224) -> Path:
    """A run folder whose run.json records per-stage throughput, as `cmafnet train` writes it."""

    path.mkdir(parents=True)
    speed = {
        k: {"img_s": v, "step_ms": 1e5 / v, "images": 1000, "seconds": 1000 / v, "steps": 10}
        for k, v in stage_img_s.items()
    }
    doc = {"model": model, "device": "NVIDIA H200", "img_size": img_size, "stage_throughput": speed}
    write_meta(path, doc)
    return path


def test_calibrate_costs_a_model_at_its_measured_stage_throughput(tmp_path: Path, capsys) -> None:
    from cmafnet.experiments.cost import IDC_TOTAL, load_calibration

    rates, _ = anchor_rates()
    row = next(s for s in expand("table1", 1) if s.row == "cmafnet")
    speeds = {"branches": 4000.0, "fusion": 8000.0, "end_to_end": 2000.0}
    calib = {"cmafnet": load_calibration(_fake_run(tmp_path / "c", "cmafnet", speeds))}
    plain, calibrated = run_seconds(row, rates), run_seconds(row, rates, calib)
    # paper stages 30/40/30 epochs of 70% of IDC at the measured speeds, plus the uncalibrated eval
    train = 0.7 * IDC_TOTAL
    expected_train = 30 * train / 4000 + 40 * train / 8000 + 30 * train / 2000
    assert calibrated - expected_train == pytest.approx(
        plain - 100 * train / method_rate("cmafnet", rates)[0]
    )
    assert main(["experiment", "--list", "--calibrate", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert (
        "Calibrated training throughput, per stage: cmafnet: branches 4,000, fusion 8,000, end_to_end 2,000"
        in out
    )
    assert "half the naive dual-branch proxy" not in out  # that assumption no longer applies
    _fake_run(tmp_path / "small", "resnet50", {"all": 900.0}, img_size=64)
    assert main(["experiment", "--list", "--calibrate", str(tmp_path / "small")]) == 0
    assert "not to scale" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["experiment", "--list", "--calibrate", str(tmp_path / "empty")]) == 4
    assert main(["experiment", "table1", "--out", "x", "--calibrate", str(tmp_path / "c")]) == 2


def test_dry_run_with_shard(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["experiment", "table7", "--store", str(tmp_path), "--out", str(tmp_path / "o"), "--seeds", "2"]
    assert main([*args, "--dry-run", "--shard", "0/3"]) == 0
    first = [x for x in capsys.readouterr().out.splitlines() if "would train" in x]
    assert main([*args, "--dry-run", "--shard", "1/3"]) == 0
    second = [x for x in capsys.readouterr().out.splitlines() if "would train" in x]
    assert first and second and set(first).isdisjoint(second)
    assert len(first) + len(second) < 14
    assert not (tmp_path / "o" / "runs").exists()


@pytest.mark.parametrize(
    ("argv", "code", "msg"),
    [
        (["experiment"], 2, "--list"),
        (["experiment", "tabel2", "--out", "x"], 2, "table2"),
        (["experiment", "table1"], 2, "--out"),
        (["experiment", "table1", "--out", "x", "--shard", "3/2"], 2, "--shard"),
        (["experiment", "table1", "--out", "x", "--seeds", "0"], 2, "--seeds"),
        (["experiment", "table1", "--out", "x", "--set", "model.nope=1", "--store", "."], 2, "nope"),
        (["experiment", "table1", "--out", "x"], 3, "--store"),
        (["experiment", "table4", "--out", "x", "--store", "."], 3, "--breakhis-store"),
    ],
)
def test_errors(argv: list[str], code: int, msg: str, tmp_path: Path, capsys: pytest.CaptureFixture,
                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    assert main(argv) == code
    assert msg in capsys.readouterr().err
