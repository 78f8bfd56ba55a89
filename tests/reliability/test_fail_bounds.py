"""Bounded inputs: a YAML alias bomb, a microns-per-pixel value outside the physical range, an image that
resampling would blow up, a tile plan past memory and an infinite budget are each one line with the
documented exit code, refused before any work."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from _corpus import FAST, one_error_line, rgb_png

from cmafnet.data import scale
from cmafnet.data.ingest import ingest
from cmafnet.errors import InputDataError
from cmafnet.inference.wsi import plan_tiling

# Nine lines that expand to 9^9 = 387 million strings once their aliases are followed.
BOMB = "\n".join(
    ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    + ["train: {stages: *a8}"]
)
REFUSED = "refused, its aliases expand to more than 10,000 values"


def test_an_alias_bomb_as_config_is_exit_2(cli, store_dir, split_file, tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    rc, _, err = cli(
        "train", "--config", bomb, "--store", store_dir, "--split", split_file, "--out", tmp_path / "r"
    )
    assert rc == 2 and f"{bomb}: {REFUSED} at line " in one_error_line(err)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("train: " + "[" * 100_000, "refused, nested more than 50 levels deep"),  # Python's recursion limit
        ("train: &t {stages: [*t]}", "refused, an alias names a node that contains it"),
        ("train: {budget: {macs: .inf}}", "train.budget.macs: Input should be a finite number (got inf)"),
    ],
)
def test_other_unbounded_configs_are_exit_2(cli, store_dir, split_file, tmp_path, text, problem):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    rc, _, err = cli(
        "train", "--config", config, "--store", store_dir, "--split", split_file, "--out", tmp_path / "r"
    )
    assert rc == 2 and problem in one_error_line(err)


def test_an_alias_bomb_in_set_is_exit_2(cli, store_dir, split_file, tmp_path):
    tens = [", ".join([f"*{x}"] * 10) for x in "abc"]  # 10^4 values in four short levels
    value = f"[&a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1], &b [{tens[0]}], &c [{tens[1]}], [{tens[2]}]]"
    rc, _, err = cli("train", *FAST, "--set", f"train.stages={value}", "--store", store_dir, "--split", split_file,
                     "--out", tmp_path / "r")  # fmt: skip
    assert rc == 2 and REFUSED in one_error_line(err)


@pytest.mark.parametrize("command", ["train --resume", "evaluate", "predict", "report"])
def test_an_alias_bomb_as_a_runs_config_is_exit_4(cli, run_dir, store_dir, split_file, tmp_path, command):
    run = shutil.copytree(run_dir, tmp_path / "run")
    (run / "config.yaml").write_text(BOMB)
    argv = {
        "train --resume": ["train", "--resume", "--out", run, "--store", store_dir, "--split", split_file],
        "evaluate": ["evaluate", run, "--store", store_dir, "--all"],
        "predict": ["predict", run, rgb_png(tmp_path / "g.png"), "--out", tmp_path / "p.csv"],
        "report": ["report", run, "--out", tmp_path / "report"],
    }[command]
    rc, _, err = cli(*argv)
    assert rc == 4 and f"{run / 'config.yaml'}: {REFUSED}" in one_error_line(err)


@pytest.mark.parametrize("value", ["1000", "1e9", "0.001", "nan"])
def test_mpp_outside_the_physical_range_is_exit_2(cli, run_dir, idc_src, tmp_path, value):
    cases = [
        (["predict", run_dir, rgb_png(tmp_path / "g.png"), "--out", tmp_path / "p.csv", "--input-mpp", value],
         "--input-mpp"),
        (["ingest", "idc", idc_src, "--out", tmp_path / "s", "--mpp", value], "--mpp"),
        (["wsi", run_dir, tmp_path / "g.png", "--out", tmp_path / "w", "--target-mpp", value], "--target-mpp"),
    ]  # fmt: skip
    for argv, option in cases:
        rc, _, err = cli(*argv)
        assert rc == 2 and f"argument {option}: must be in [0.01, 100], got {value}" in one_error_line(err)
    assert (
        not (tmp_path / "p.csv").exists() and not (tmp_path / "s").exists() and not (tmp_path / "w").exists()
    )


def test_mpp_a_manifest_or_a_resize_puts_outside_the_range_is_exit_2(cli, tmp_path):
    for i, label in enumerate(["a", "a", "b", "b"]):
        rgb_png(tmp_path / "src" / label / f"{i}.png", size=40, seed=i)
    rows = [
        {"path": f"{lb}/{i}.png", "label": lb, "mpp": 1e9 if i == 2 else 0.5} for i, lb in enumerate("aabb")
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    rc, _, err = cli("ingest", "folder", tmp_path / "m.csv", "--out", tmp_path / "s1")
    assert (
        rc == 2
        and "row 4 column mpp must be 0.01 to 100 microns per pixel, got '1000000000.0'"
        in one_error_line(err)
    )
    # 40 px at 90 um/px stored at 8 px would be 450 um/px: the source value is fine, the resize is not
    rc, _, err = cli(
        "ingest",
        "folder",
        tmp_path / "src",
        "--out",
        tmp_path / "s2",
        "--mpp",
        "90",
        "--size",
        "8x8",
        "--no-progress",
    )
    assert (
        rc == 2
        and "--size 8x8: " in one_error_line(err)
        and "would be stored at 450 microns per pixel" in err
    )
    assert not (tmp_path / "s2" / "meta.json").exists()


def test_a_store_recording_an_impossible_mpp_is_exit_4_in_scale_matched_evaluation(
    cli, run_dir, idc_src, tmp_path, monkeypatch
):
    monkeypatch.setattr(scale, "MPP_RANGE", (0.0, float("inf")))  # a store written before the range
    ingest("idc", idc_src, tmp_path / "store", workers=1, progress=False, mpp=1e9)
    monkeypatch.undo()
    run = shutil.copytree(run_dir, tmp_path / "run")
    rc, _, err = cli(
        "evaluate", run, "--store", tmp_path / "store", "--all", "--scale-match", "--bootstrap", "0"
    )
    line = one_error_line(err)  # it was an OverflowError traceback from Pillow
    assert (
        rc == 4
        and "store/index.csv column mpp: image 0 is 1e+09 microns per pixel, outside 0.01 to 100" in line
    )


def test_an_image_past_the_pixel_cap_once_resampled_is_one_error_row(cli, run_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CMAFNET_MAX_IMAGE_PIXELS", "100000")
    small, large = rgb_png(tmp_path / "small.png", size=8), rgb_png(tmp_path / "large.png", size=40)
    out = tmp_path / "p.csv"
    # 100 um/px inputs, a run trained at 4 um/px: x25, so 8 px -> 200 px (40,000 px) and 40 px -> 1000 px
    args = ["--out", out, "--input-mpp", "100", "--no-tissue-check", "--no-progress"]
    rc, _, err = cli("predict", run_dir, small, large, *args)
    assert rc == 0, err
    rows = pd.read_csv(out).set_index("path")
    assert rows.loc[str(small), "status"] == "ok" and rows.loc[str(large), "status"] == "error"
    assert rows.loc[str(large), "error"] == (
        "too large: resampled from 100 to 4 um/px it would be 1000 x 1000 pixels, limit 100,000 "
        "(CMAFNET_MAX_IMAGE_PIXELS)"
    )
    rc, _, err = cli("predict", run_dir, large, *args)
    assert rc == 3 and "none of the 1 inputs could be read" in one_error_line(err)


class Slide:
    """What plan_tiling reads of an OpenSlide slide: a single-level scan (no pyramid to read from)."""

    level_count, level_downsamples = 1, (1.0,)

    def __init__(self, mpp: float, dimensions: tuple[int, int] = (2220, 2967)) -> None:
        self.properties = {"openslide.mpp-x": str(mpp), "openslide.mpp-y": str(mpp)}
        self.dimensions = dimensions

    def get_best_level_for_downsample(self, ds: float) -> int:
        return 0


def test_a_tile_plan_past_memory_is_refused_before_any_read():
    pytest.importorskip("openslide")
    with pytest.raises(
        Exception, match=r"2220 x 2967 = 6,586,740 tiles of 1 level-0 px, more than 1,000,000"
    ):
        plan_tiling(Slide(0.499), mpp=0.01)  # the MemoryError of old
    with pytest.raises(Exception, match=r"each tile would be read as 10020 x 10020 pixels at level 0, limit"):
        plan_tiling(Slide(0.499, (40_000, 40_000)), mpp=100)  # 50 px at 100 um/px, no pyramid
    with pytest.raises(
        InputDataError, match=r"the slide states 1e-09 microns per pixel, outside 0.01 to 100"
    ):
        plan_tiling(Slide(1e-9))
