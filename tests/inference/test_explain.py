"""--explain: CMAF attention/gate overlays for CMAF-Net runs, Grad-CAM for baselines."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from cmafnet.cli import main
from cmafnet.inference.explain import HEADER_PX, LABEL_PX, cmaf_maps, overlay
from cmafnet.inference.predict import PredictOptions
from cmafnet.models.output import ModelOutput

TILE = "unlabeled_he/histolab_he_tiles/tissue-level0-7352-11762-7864-12274.png"


def test_cmaf_maps_attention_received_and_gate():
    b, h, n = 2, 4, 9
    attn = torch.full((b, h, n, n), 0.0)
    attn[0, :, :, 7] = 1.0  # image 0: every query attends to key 7 only
    attn[1] = 1.0 / n  # image 1: uniform
    gate = torch.rand(b, 16, 3, 3)
    maps = cmaf_maps(
        ModelOutput(logits=torch.zeros(b, 2), attn=attn, gate=gate, f_t=torch.zeros(b, 16, 3, 3))
    )
    assert maps["attention"].shape == (b, 3, 3)
    assert maps["attention"][0].flatten().argmax() == 7 and maps["attention"][0].sum() == n
    torch.testing.assert_close(maps["attention"][1], torch.ones(3, 3))
    torch.testing.assert_close(maps["gate"], gate.mean(1))
    assert cmaf_maps(ModelOutput(logits=torch.zeros(1, 2))) == {}  # baselines: nothing to show


def test_overlay_shape_and_blend():
    img = np.full((20, 30, 3), 128, np.uint8)
    heat = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = overlay(img, heat)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert not np.array_equal(out[:, 0], out[:, -1])  # low vs high end of the map differ


def test_explain_cmaf_and_gradcam(cmaf_run, baseline_run, sample_data, tmp_path):
    for run, panels in ((cmaf_run, 3), (baseline_run, 2)):  # image | attention | gate ; image | grad-cam
        d = tmp_path / run.name
        rc = main(["predict", str(run), str(sample_data / TILE), "--out", str(d / "p.csv"), "--explain",
                   str(d / "explain"), "--device", "cpu", "--no-progress"])  # fmt: skip
        assert rc == 0
        pngs = sorted((d / "explain").glob("*.png"))
        assert len(pngs) == 1 and pngs[0].name.startswith("00001_tissue-level0")
        arr = np.asarray(Image.open(pngs[0]))
        top = HEADER_PX + LABEL_PX  # title bar and panel labels above the panels
        side = arr.shape[0] - top
        assert arr.shape[1] == panels * side  # panels side by side
        body = arr[top:]
        assert not np.array_equal(body[:, :side], body[:, side : 2 * side])  # the map panel is an overlay
        assert (arr[:top] < 128).any()  # the title and labels are drawn (dark text on white)


def test_explanation_title_names_file_probability_and_decision(baseline_run, tmp_path, monkeypatch):
    from cmafnet.inference import explain as explain_mod
    from cmafnet.inference.explain import Explainer
    from cmafnet.inference.predict import Predictor

    titles = []
    real = explain_mod.titled
    monkeypatch.setattr(
        explain_mod, "titled", lambda c, t, labels: titles.append((t, labels)) or real(c, t, labels)
    )
    predictor = Predictor.from_run_dir(baseline_run, options=PredictOptions(device="cpu"))
    img = np.full((40, 40, 3), 200, np.uint8)
    Explainer(predictor, tmp_path / "x").explain(
        [img], [tmp_path / "a_tile.png"], np.array([[0.2, 0.8]]), ["idc"]
    )
    ((title, labels),) = titles
    assert title == f"a_tile.png  |  P(idc) = 0.800  |  decision: idc (threshold {predictor.threshold:.3g})"
    assert labels == ["image", "grad-cam"]
