"""Bad input files: decompression bombs, devices, FIFOs, folders named like images, huge files.

Each job must process its valid files and list every bad one with its reason.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pandas as pd
import pytest
from _corpus import FifoWatch, one_error_line, png_header, rgb_png
from PIL import Image

from cmafnet.data.store import PatchStore
from cmafnet.data.validation import decode_image

TOO_LARGE = "too large"


def _rejected(store: Path) -> dict[str, tuple[str, str]]:
    df = pd.read_csv(store / "rejected.csv", keep_default_na=False)
    return {Path(p).name: (r, d) for p, r, d in zip(df["path"], df["reason"], df["detail"])}


def test_bomb_in_predict_is_one_rejected_row(cli, run_dir, tmp_path):
    good = rgb_png(tmp_path / "good.png")
    bomb = png_header(tmp_path / "bomb.png", 60000, 60000)  # 429 bytes in the wild; ~100 here
    out = tmp_path / "x.csv"
    rc, stdout, err = cli("predict", run_dir, good, bomb, "--out", out, "--no-tissue-check", "--no-progress")
    assert rc == 0, err
    assert "Traceback" not in err and "DecompressionBomb" not in err
    rows = pd.read_csv(out, keep_default_na=False).set_index("path")
    assert rows.loc[str(good), "status"] == "ok" and rows.loc[str(good), "decision"] in ("non-IDC", "IDC")
    assert rows.loc[str(bomb), "status"] == "error"
    assert rows.loc[str(bomb), "error"].startswith("too large: 60000 x 60000 pixels")
    assert f"rejected {bomb}: too large" in stdout


def test_bomb_in_ingest_folder_is_one_rejection(cli, tmp_path):
    src = tmp_path / "src"
    for c in ("a", "b"):
        for i in range(3):
            rgb_png(src / c / f"{i}.png", seed=i)
    png_header(src / "a" / "bomb.png", 60000, 60000)
    rc, stdout, err = cli("ingest", "folder", src, "--out", tmp_path / "s", "--workers", 1, "--no-progress")
    assert rc == 0, err
    assert len(PatchStore.open(tmp_path / "s")) == 6  # every valid file is in the store
    reason, detail = _rejected(tmp_path / "s")["bomb.png"]
    assert reason == TOO_LARGE and detail.startswith("60000 x 60000 pixels")
    assert "rejected: 1 (1 too large; see rejected.csv)" in stdout
    assert not (tmp_path / "s" / ".partial").exists()


def test_pixel_cap_replaces_pillows_warning_and_can_be_raised(tmp_path, monkeypatch):
    # 100 Mpx: above Pillow's warning threshold (89 Mpx), below its error (179 Mpx).
    header = png_header(tmp_path / "wide.png", 10000, 10000)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        dec = decode_image(header)
    assert (dec.reason, dec.detail.split(",")[0]) == (TOO_LARGE, "10000 x 10000 pixels")
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    # A real image over a lowered cap is rejected before decoding; the user raises the cap again.
    img = rgb_png(tmp_path / "real.png", size=40)
    monkeypatch.setenv("CMAFNET_MAX_IMAGE_PIXELS", "1000")
    assert decode_image(img).detail.startswith("40 x 40 pixels, limit 1,000 (CMAFNET_MAX_IMAGE_PIXELS)")
    monkeypatch.setenv("CMAFNET_MAX_IMAGE_PIXELS", "2000")
    assert decode_image(img).array.shape == (40, 40, 3)


def test_manifest_with_device_fifo_folder_and_missing_rows(cli, tmp_path):
    src = tmp_path / "src"
    rows = ["path,label"]
    for c in ("a", "b"):
        for i in range(2):
            rgb_png(src / c / f"{i}.png", seed=i)
            rows.append(f"{c}/{i}.png,{c}")
    os.mkfifo(src / "fifo.png")  # opening it to read would block forever
    (src / "dir.png").mkdir()
    rows += ["/dev/null,a", "fifo.png,a", "dir.png,b", "missing.png,b"]
    (src / "m.csv").write_text("\n".join(rows) + "\n")
    with FifoWatch(src / "fifo.png") as watch:
        rc, _, err = cli(
            "ingest", "folder", src / "m.csv", "--out", tmp_path / "s", "--workers", 1, "--no-progress"
        )
    assert rc == 0, err
    assert not watch.blocked_reader, "the FIFO was opened for reading"
    assert len(PatchStore.open(tmp_path / "s")) == 4
    rej = _rejected(tmp_path / "s")
    assert rej["null"] == ("not a regular file", "a device")
    assert rej["fifo.png"] == ("not a regular file", "a FIFO")
    assert rej["dir.png"] == ("not a regular file", "a folder")
    assert rej["missing.png"] == ("file not found", "")


def test_byte_cap_is_checked_before_reading(tmp_path, monkeypatch):
    sparse = tmp_path / "huge.png"
    with open(sparse, "wb") as f:
        f.truncate(300 << 20)  # 300 MiB of nothing: only stat() may look at it
    dec = decode_image(sparse)
    assert (dec.reason, dec.detail) == (TOO_LARGE, "300 MiB file, limit 256 MiB (CMAFNET_MAX_FILE_MB)")
    small = rgb_png(tmp_path / "ok.png", size=200)
    monkeypatch.setenv("CMAFNET_MAX_FILE_MB", "0.01")  # 10 KiB: the user lowers the cap
    assert decode_image(small).reason == TOO_LARGE
    monkeypatch.delenv("CMAFNET_MAX_FILE_MB")
    assert decode_image(small).reason is None


def test_bad_cap_variable_is_usage(cli, idc_src, tmp_path, monkeypatch):
    monkeypatch.setenv("CMAFNET_MAX_FILE_MB", "lots")
    rc, _, err = cli("ingest", "idc", idc_src, "--out", tmp_path / "s", "--no-progress")
    assert rc == 2
    assert "CMAFNET_MAX_FILE_MB='lots': expected a positive number" in one_error_line(err)


def test_missing_path_on_the_command_line_is_a_row_like_in_a_csv(cli, run_dir, tmp_path):
    good = rgb_png(tmp_path / "good.png")
    listing = tmp_path / "list.csv"
    listing.write_text("path\nmissing_in_csv.png\n/dev/null\n")
    out = tmp_path / "p.csv"
    rc, _, err = cli(
        "predict",
        run_dir,
        good,
        tmp_path / "missing.png",
        listing,
        "--out",
        out,
        "--no-tissue-check",
        "--no-progress",
    )
    assert rc == 0, err
    rows = pd.read_csv(out, keep_default_na=False)
    assert list(rows["status"]) == ["ok", "error", "error", "error"]
    assert list(rows["error"]) == ["", "file not found", "file not found", "not a regular file: a device"]


def test_slide_that_is_not_a_regular_file(cli, run_dir, tmp_path):
    pytest.importorskip("openslide")  # the wsi extra
    os.mkfifo(tmp_path / "slide.svs")
    with FifoWatch(tmp_path / "slide.svs") as watch:
        rc, _, err = cli("wsi", run_dir, tmp_path / "slide.svs", "--out", tmp_path / "o")
    assert rc == 3 and not watch.blocked_reader
    assert one_error_line(err).endswith("slide.svs: slide is not a regular file (a FIFO)")
    (tmp_path / "o.txt").write_text("x")
    rc, _, err = cli("wsi", run_dir, tmp_path / "slide.svs", "--out", tmp_path / "o.txt")
    assert rc == 2 and "exists and is not a folder" in one_error_line(err)
