"""`cmafnet demo` end to end at the smallest size: every stage of the pipeline and the report."""

import json
import re

import pytest

from cmafnet.cli import main

ROW = re.compile(
    r"at the operating threshold (?P<t>[0-9.]+) .*?: balanced accuracy (?P<bacc>[0-9.]+)%, "
    r"sensitivity (?P<sens>[0-9.]+)%, specificity (?P<spec>[0-9.]+)%"
)


@pytest.mark.slow
def test_demo_writes_a_report_with_both_models(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main([
        "demo", "--out", str(out), "--patients", "6", "--patches", "24", "--device", "cpu",
        "--set", "train.max_steps_per_epoch=1", "--set", "eval.bootstrap=0",
    ])  # fmt: skip
    assert rc == 0
    html = (out / "report" / "report.html").read_text()
    assert "cmafnet" in html and "resnet18" in html
    assert "McNemar" in html
    for run in ("cmafnet", "resnet18"):
        assert (out / "runs" / run / "model.safetensors").exists()
        assert (out / "runs" / run / "metrics_test.json").exists()
    out_text = capsys.readouterr().out
    assert "Report:" in out_text
    # The summary prints each run's operating-point row first, and its numbers are the report's.
    summary = json.loads((out / "report" / "report.json").read_text())["summary"]["binary"]
    for run in ("cmafnet", "resnet18"):
        block = out_text.split(f"] {run}: held-out test patients")[1].splitlines()[1:4]
        assert block[0].strip().startswith("at the operating threshold") and "at threshold 0.5" in block[1]
        m = ROW.search(block[0])
        (row,) = [r for r in summary if r["run"] == run and r["rule"].startswith("operating threshold")]
        assert float(m["t"]) == round(row["threshold"], 4)
        for key, name in (("bacc", "balanced_accuracy"), ("sens", "sensitivity"), ("spec", "specificity")):
            assert float(m[key]) == round(100 * row[name], 1), (run, name)


def test_demo_rejects_a_missing_data_folder(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path / "d"), "--data", str(tmp_path / "nope")])
    assert rc == 2
    assert "folder not found" in capsys.readouterr().err
