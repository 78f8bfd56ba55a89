"""Broken experiment result files: one line naming each (exit 4) and its row marked invalid, never a
traceback or a silent "…"; a missing result stays "not run yet"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _corpus import one_error_line

from cmafnet.experiments.paper_tables import expand
from cmafnet.run import write_json, write_meta

ROWS = ("resnet50", "cmafnet")


@pytest.fixture
def exp(tmp_path: Path) -> Path:
    """Table 1 at smoke scale with ResNet-50 and CMAF-Net finished (seed 0), as the runner leaves them."""
    out = tmp_path / "exp"
    for spec in expand("table1", 1, "smoke"):
        if spec.row in ROWS:
            run_dir = out / "runs" / spec.run_id
            run_dir.mkdir(parents=True)
            write_meta(run_dir, {"status": "finished"})
            write_json(run_dir / "experiment.json", spec.to_dict())
            metrics = {"sensitivity": 0.8, "specificity": 0.9, "balanced_accuracy": 0.85}
            write_json(run_dir / "result_test.json", {"spec": spec.to_dict(), "metrics": metrics})
    return out


def _aggregate(cli, out: Path) -> tuple[int, str, str, dict[str, str]]:
    rc, stdout, err = cli(
        "experiment", "table1", "--out", out, "--scale", "smoke", "--seeds", 1, "--aggregate-only"
    )
    md = (out / "table1" / "table.md").read_text()
    rows = {line.split(" | ")[0][2:]: line for line in md.splitlines() if line.startswith("| ")}
    return rc, stdout, err, rows


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "not readable JSON ("),  # cut short in the middle
        ("", "is empty (0 bytes)"),
        ("[1, 2]", "not a JSON object (a list)"),
        ('{"metrics": {"sensitivity": "high"}}', "malformed (metrics.sensitivity: should be a number"),
        ('{"metrics": [0.8]}', "malformed (metrics: Input should be a valid dictionary"),
        ('{"metrics": {}, "sensitivity": 0.8}', "malformed (unexpected key 'sensitivity')"),
    ],
)
def test_a_broken_result_is_one_line_and_an_invalid_row(
    cli, exp: Path, content: str | None, reason: str
) -> None:
    path = exp / "runs" / "resnet50" / "seed0" / "result_test.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2] if content is None else content)
    rc, _, err, rows = _aggregate(cli, exp)
    assert rc == 4
    line = one_error_line(err)
    assert (
        line.startswith(f"cmafnet experiment: error: {path}: {reason}")
        and "remove the file and rerun" in line
    )
    short = reason.split(" (")[0]
    assert f"| invalid: seed0/result_test.json {short} |" in rows["ResNet-50"]
    assert "80.00" in rows["CMAF-Net (Ours)"] and "invalid" not in rows["CMAF-Net (Ours)"]


def test_a_missing_result_is_not_run_yet(cli, exp: Path) -> None:
    (exp / "runs" / "resnet50" / "seed0" / "result_test.json").unlink()
    rc, _, err, rows = _aggregate(cli, exp)
    assert rc == 0 and err == ""
    assert (
        rows["ResNet-50"].startswith("| ResNet-50 | … | 72.34 ± 2.1 |") and "invalid" not in rows["ResNet-50"]
    )


def test_a_truncated_experiment_json_is_one_line(cli, exp: Path, tmp_path: Path) -> None:
    """The runner re-evaluates a finished run whose result is missing; its claim file is cut short."""
    run_dir = exp / "runs" / "resnet50" / "seed0"
    (run_dir / "result_test.json").unlink()
    (run_dir / "experiment.json").write_text(json.dumps({"fingerprint": "x"})[:10])
    rc, _, err = cli("experiment", "table1", "--out", exp, "--store", tmp_path, "--scale", "smoke", "--seeds", 1,
                     "--only", "resnet50", "--no-aggregate")  # fmt: skip
    assert rc == 4
    line = one_error_line(err)
    assert line.startswith(f"cmafnet experiment: error: {run_dir / 'experiment.json'}: not readable JSON (")
