"""`cmafnet demo` end to end at the smallest size: every stage of the pipeline and the report."""

import pytest

from cmafnet.cli import main


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
    assert "Report:" in capsys.readouterr().out


def test_demo_rejects_a_missing_data_folder(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path / "d"), "--data", str(tmp_path / "nope")])
    assert rc == 2
    assert "folder not found" in capsys.readouterr().err
