"""`cmafnet export`: ONNX (onnxruntime parity) and TorchScript, dynamic batch, failing parity."""

from __future__ import annotations

import json
import logging
import warnings

import numpy as np
import pytest
import torch

from cmafnet.cli import main


def test_onnx_export_parity(baseline_run, tmp_path, capsys, caplog):
    import onnx

    out = tmp_path / "model.onnx"
    caplog.set_level(logging.INFO)  # as the CLI logs without -v
    assert main(["export", str(baseline_run), "--format", "onnx", "--out", str(out), "--opset", "19"]) == 0
    assert "PASSED" in capsys.readouterr().out
    chatter = [
        r for r in caplog.records if r.name.startswith(("onnx", "torch.onnx")) and r.levelno < logging.WARNING
    ]
    assert chatter == []  # the exporters' per-pass INFO lines appear only with -v
    side = json.loads((tmp_path / "model.onnx.json").read_text())
    written = [o.version for o in onnx.load(str(out)).opset_import if o.domain in ("", "ai.onnx")]
    assert side["opset"] == 19 and written == [19]  # the sidecar records what the file holds
    assert side["parity"]["passed"] and side["parity"]["max_abs_diff"] <= 1e-4
    assert side["output"]["classes"] == ["no_idc", "idc"] and side["threshold"] == 0.3
    # Independent check: dynamic batch axis (batch 5 was never used in export) vs PyTorch.
    import onnxruntime as ort

    from cmafnet.run import load_run

    run = load_run(baseline_run)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        ref = torch.softmax(run.model(x), 1).numpy()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert got.shape == (5, 2)
    assert np.abs(got - ref).max() <= 1e-4


def test_torchscript_export_failing_parity_exit_1(baseline_run, tmp_path, capsys, monkeypatch):
    from cmafnet.inference import export as export_mod

    out = tmp_path / "model.pt"
    # An exported model that drifts by 0.01: the parity failure must exit 1 and say so; the file and
    # its sidecar are kept, and the file itself loads and runs.
    real = export_mod._exported_probs
    monkeypatch.setattr(export_mod, "_exported_probs", lambda *a: real(*a) + 0.01)
    assert main(["export", str(baseline_run), "--format", "torchscript", "--out", str(out)]) == 1
    assert "parity check FAILED" in capsys.readouterr().err
    side = json.loads((tmp_path / "model.pt.json").read_text())
    assert out.exists() and side["parity"]["passed"] is False
    assert side["parity"]["max_abs_diff"] == pytest.approx(0.01, abs=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in torch 2.14
        loaded = torch.jit.load(str(out))
    assert loaded(torch.randn(2, 3, 32, 32)).shape == (2, 2)


def test_export_run_without_model_exit_4(run_factory, tmp_path):
    run = run_factory(tmp_path / "nomodel", weights=False)
    assert main(["export", str(run)]) == 4


@pytest.mark.slow
def test_cmafnet_onnx_export_parity(cmaf_run, tmp_path):
    """The CMAF-Net graph (SDPA attention with per-head temperatures, gates) exports to ONNX."""
    from cmafnet.inference.export import export_run

    res = export_run(cmaf_run, "onnx", tmp_path / "cmaf.onnx")
    assert res.passed and res.max_abs_diff <= 1e-4
