"""`cmafnet demo` end to end at the smallest size: every stage of the pipeline and the report."""

import json
import re

import pytest

from cmafnet.cli import main

ROW = re.compile(
    r"at the operating threshold (?P<t>[0-9.]+) .*?: balanced accuracy (?P<bacc>[0-9.]+)%, "
    r"sensitivity (?P<sens>[0-9.]+)%, specificity (?P<spec>[0-9.]+)%"
)


RUNS = ("cmafnet", "resnet18_equal_compute", "resnet18_equal_epochs")


@pytest.mark.slow
def test_demo_writes_a_report_with_every_model_and_its_budget(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main([
        "demo", "--out", str(out), "--patients", "6", "--patches", "24", "--device", "cpu",
        "--set", "train.max_steps_per_epoch=1", "--set", "eval.bootstrap=0",
    ])  # fmt: skip
    assert rc == 0
    html = (out / "report" / "report.html").read_text()
    assert all(run in html for run in RUNS)
    assert "McNemar" in html
    for run in RUNS:
        assert (out / "runs" / run / "model.safetensors").exists()
        assert (out / "runs" / run / "metrics_test.json").exists()
    out_text = capsys.readouterr().out
    assert "Report:" in out_text
    # The ResNet-18 at equal compute spends the training MACs the CMAF-Net run recorded (within one of its
    # steps): derived from that run, not hard-coded; the equal-epoch one trains CMAF-Net's 5 epochs.
    meta = {run: json.loads((out / "runs" / run / "run.json").read_text()) for run in RUNS}
    cmaf_macs = meta["cmafnet"]["cost"]["total"]["macs"]
    budget = meta["resnet18_equal_compute"]["budget"]
    assert budget["kind"] == "match" and budget["target_macs"] == cmaf_macs
    assert abs(meta["resnet18_equal_compute"]["cost"]["total"]["macs"] - cmaf_macs) <= budget["macs_per_step"]
    assert meta["resnet18_equal_epochs"]["budget"] is None
    assert (
        meta["resnet18_equal_epochs"]["cost"]["total"]["steps"] == meta["cmafnet"]["cost"]["total"]["steps"]
    )
    # The report names each model's budget (training MACs, steps, epochs), and so does the summary.
    tables = json.loads((out / "report" / "report.json").read_text())["tables"]
    cost = {(c["row"], c["column"]): c for c in tables["training_cost"]["cells"]}
    assert cost["resnet18_equal_compute", "budget"]["text"] == f"cmafnet's training MACs ({cmaf_macs:.3g})"
    assert (
        cost["cmafnet", "budget"]["text"]
        == cost["resnet18_equal_epochs", "budget"]["text"]
        == "the configured epochs"
    )
    for run in RUNS:
        total = meta[run]["cost"]["total"]
        assert (cost[run, "macs"]["ours_mean"], cost[run, "steps"]["ours_mean"]) == (
            total["macs"],
            total["steps"],
        )
        assert f"<td>{run}</td>" in html.split("recorded training cost</h3>")[1].split("</table>")[0]
        line = out_text.split(f"] {run}: held-out test patients")[1].split("\n[")[0]
        assert (
            f"budget: {cost[run, 'budget']['text']}; trained " in line
            and f"{total['macs']:.3g} training MACs" in line
        )
        assert f"{total['steps']} steps" in line
    # The summary prints each run's operating-point row first, and its numbers are the report's.
    op = {(c["row"], c["column"]): c for c in tables["operating"]["cells"]}
    for run in RUNS:
        block = out_text.split(f"] {run}: held-out test patients")[1].splitlines()[1:4]
        assert block[0].strip().startswith("at the operating threshold") and "at threshold 0.5" in block[1]
        m = ROW.search(block[0])
        assert m["t"] == op[run, "threshold"]["text"]
        for key, name in (("bacc", "balanced_accuracy"), ("sens", "sensitivity"), ("spec", "specificity")):
            assert float(m[key]) == round(op[run, name]["ours_mean"], 1), (run, name)


def test_demo_rejects_a_missing_data_folder(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path / "d"), "--data", str(tmp_path / "nope")])
    assert rc == 2
    assert "folder not found" in capsys.readouterr().err
