"""Physical scale: recorded in stores, resolved for runs, and inference resampled and tiled at it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cmafnet.data import scale as dscale
from cmafnet.data.ingest import ingest, summary_lines
from cmafnet.data.splits import split_store
from cmafnet.data.store import PatchStore
from cmafnet.data.synthetic import write_breakhis_like
from cmafnet.errors import ConfigError
from cmafnet.inference.predict import PredictOptions, Predictor, predict_files
from cmafnet.inference.resampling import (
    SMALLER_THAN_PATCH,
    aggregate,
    make_tiles,
    resample,
    run_scale,
    tile_origins,
)
from cmafnet.inference.temperature import apply_temperature


def test_documented_values_and_stored_mpp():
    assert dscale.IDC_MPP == 4.0
    assert dscale.BREAKHIS_MPP == {40: 0.4924, 100: 0.197, 200: 0.0985, 400: 0.0492}
    assert dscale.breakhis_mpp(200, mpp_40x=0.5) == pytest.approx(0.1)
    # unchanged size; padded edge patch (no scale change); canvas resized x0.5; anisotropic resize
    assert dscale.stored_mpp(4.0, (50, 50), (50, 50), (50, 50), False) == (4.0, False)
    assert dscale.stored_mpp(4.0, (35, 50), (50, 50), (50, 50), False) == (4.0, False)
    assert dscale.stored_mpp(0.49, (460, 700), (230, 350), (460, 700), False) == (pytest.approx(0.98), False)
    v, aniso = dscale.stored_mpp(1.0, (100, 200), (100, 100), (100, 100), True)
    assert v == pytest.approx(2**0.5) and aniso
    assert dscale.stored_mpp(None, (1, 1), (2, 2), (2, 2), True) == (None, False)


def test_run_scale_resolution():
    assert run_scale({"patch_mpp": 2.0, "patch_hw": [32, 48]}).tile_hw == (32, 48)
    s = run_scale({"dataset": "idc"})
    assert (s.mpp, s.tile_hw) == (4.0, (50, 50)) and "no patch_mpp" in s.source
    unknown = run_scale({"dataset": "folder", "patch_mpp": None, "patch_scale_source": "mixed"})
    assert unknown.mpp is None and unknown.source == "mixed"


def test_resample_tile_and_aggregate():
    img = np.zeros((460, 700, 3), np.uint8)
    assert resample(img, 0.98, 4.0).shape == (113, 172, 3)  # 700 * 0.245 = 171.5 -> 172
    assert (
        tile_origins(172, 50) == [0, 41, 81, 122]
        and tile_origins(50, 50) == [0]
        and tile_origins(30, 50) == [0]
    )
    tiles, status = make_tiles(np.zeros((113, 172, 3), np.uint8), (50, 50))
    assert status == "" and len(tiles) == 3 * 4 and all(t.shape == (50, 50, 3) for t in tiles)
    # 40 x 40 covers 64% of a 50 x 50 patch: padded with white; 30 x 30 (36%) is not assessable.
    (pad,), status = make_tiles(np.zeros((40, 40, 3), np.uint8), (50, 50))
    assert status == "" and (pad[40:] == 255).all() and (pad[:40, :40] == 0).all()
    assert make_tiles(np.zeros((30, 30, 3), np.uint8), (50, 50)) == ([], SMALLER_THAN_PATCH)
    p = np.array([[0.9, 0.1], [0.3, 0.7]])
    np.testing.assert_allclose(aggregate(p, "mean"), [0.6, 0.4])
    np.testing.assert_allclose(aggregate(p, "max"), [0.3, 0.7])
    with pytest.raises(ConfigError, match="binary"):
        aggregate(np.full((2, 3), 1 / 3), "max")


def test_ingest_records_microns_per_pixel(tmp_path):
    src = tmp_path / "bh"
    write_breakhis_like(src, patients_per_subtype=1, images_per_magnification=1, seed=0)
    meta = ingest("breakhis", src, tmp_path / "store", workers=1, size=(46, 70), progress=False)
    store = PatchStore.open(tmp_path / "store")
    mpp = dscale.image_mpp(store)
    mags = store.index["magnification"].astype(int).to_numpy()
    # 46 x 70 stands for the native 460 x 700: ten times the documented pixel size.
    np.testing.assert_allclose(mpp, [dscale.BREAKHIS_MPP[m] * 10 for m in mags], rtol=1e-6)
    assert meta["mpp"] is None and meta["mpp_by_magnification"]["40X"] == pytest.approx(4.924)
    assert "ASSUMPTION" in meta["mpp_source"]
    assert any(line.startswith("microns per pixel: 40X 4.924") for line in summary_lines(meta))


def _folder(root, names):
    for cls, name in names:
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((20, 20, 3), 120 + 10 * len(name), np.uint8)).save(root / cls / name)


def test_folder_patients_from_regex_or_said_to_be_images(tmp_path):
    names = [(c, f"P{k}_{c}_{i}.png") for c in ("a", "b") for k in range(3) for i in range(2)]
    _folder(tmp_path / "src", names)
    meta = ingest("folder", tmp_path / "src", tmp_path / "s1", workers=1, progress=False, mpp=0.5,
                  patient_regex=r"^(?P<patient>P\d+)_")  # fmt: skip
    store = PatchStore.open(tmp_path / "s1")
    assert sorted(store.index["patient"].unique()) == ["P0", "P1", "P2"] and meta["n_own_patient"] == 0
    assert meta["mpp"] == 0.5 and "--patient-regex" in meta["patient_source"]
    assert not split_store(store, ratios=(0.34, 0.33, 0.33)).note
    # Without a patient source every image is its own patient, and the summary and split say so.
    meta2 = ingest("folder", tmp_path / "src", tmp_path / "s2", workers=1, progress=False)
    assert meta2["n_own_patient"] == len(names) and meta2["mpp"] is None
    assert any("each is its own patient" in line for line in summary_lines(meta2))
    split = split_store(PatchStore.open(tmp_path / "s2"), ratios=(0.5, 0.25, 0.25))
    assert "split is by image" in split.note and "by image" in split.to_dict()["note"]
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        ingest("folder", tmp_path / "src", tmp_path / "s3", patient_regex="(")
    with pytest.raises(ConfigError, match=r"folder. only"):
        ingest("idc", tmp_path / "src", tmp_path / "s4", patient_regex="x")


def test_predict_matches_the_training_scale(baseline_run, tmp_path):
    # baseline_run: an IDC run without patch_mpp -> the documented 4.0 um/px, 50 px patches.
    rng = np.random.default_rng(0)
    img = rng.integers(60, 200, (100, 100, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    out = {}
    for mpp in (2.0, 4.0, 1.0):  # 50 px -> 1 tile; 100 px -> 4 tiles; 25 px -> smaller than a patch
        s = predict_files(
            baseline_run,
            [tmp_path / "a.png"],
            tmp_path / f"p{mpp}.csv",
            mpp=mpp,
            tissue_check=False,
            progress=False,
            options=PredictOptions(device="cpu"),
        )
        out[mpp] = pd.read_csv(s.out, keep_default_na=False).iloc[0]
        assert "matched" in s.scale
    assert (out[2.0]["n_tiles"], out[4.0]["n_tiles"]) == (1, 4) and out[1.0]["status"] == "not_assessable"
    assert out[1.0]["flags"] == "not_assessable:smaller_than_patch"
    # The per-image probability is the mean over the four 50 px tiles of the image at 4 um/px.
    p = Predictor.from_run_dir(baseline_run, options=PredictOptions(device="cpu"))
    tiles = [img[y : y + 50, x : x + 50] for y in (0, 50) for x in (0, 50)]
    expected = apply_temperature(p.logits_from_input(p.to_input(tiles)), p.temperature).mean(0)
    assert float(out[4.0]["prob_idc"]) == pytest.approx(expected[1], abs=1e-5)
    squeezed = predict_files(
        baseline_run,
        [tmp_path / "a.png"],
        tmp_path / "sq.csv",
        tissue_check=False,
        progress=False,
        options=PredictOptions(device="cpu"),
    )
    assert "squeezed" in squeezed.scale and pd.read_csv(squeezed.out)["scale"].iloc[0] == "squeezed"
