"""`cmafnet export`: ONNX (onnxruntime parity) and TorchScript, dynamic batch, failing parity."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from cmafnet.cli import main


def test_onnx_export_parity(baseline_run, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert main(["export", str(baseline_run), "--format", "onnx", "--out", str(out)]) == 0
    assert "PASSED" in capsys.readouterr().out
    side = json.loads((tmp_path / "model.onnx.json").read_text())
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


def test_torchscript_export_failing_parity_exit_1(baseline_run, tmp_path, capsys):
    out = tmp_path / "model.pt"
    # A negative tolerance cannot be met: the parity failure must exit 1 and say so; the file and
    # its sidecar are kept, and the measured difference itself is within 1e-4 (TorchScript is exact).
    assert (
        main(["export", str(baseline_run), "--format", "torchscript", "--out", str(out), "--tolerance", "-1"])
        == 1
    )
    assert "parity check FAILED" in capsys.readouterr().err
    side = json.loads((tmp_path / "model.pt.json").read_text())
    assert out.exists() and side["parity"]["passed"] is False and side["parity"]["max_abs_diff"] <= 1e-4
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
