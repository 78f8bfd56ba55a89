"""Messages speak the user's language: no object reprs, numpy scalars or raw dicts."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from _corpus import one_error_line, rgb_png

from cmafnet.data.validation import decode_image

INTERNALS = re.compile(r"object at 0x|np\.(float|int|str_)|numpy\.|\{'")


def test_not_an_image_has_no_object_repr(tmp_path):
    (tmp_path / "x.png").write_text("hello, this is text")
    dec = decode_image(tmp_path / "x.png")
    assert (dec.reason, dec.detail) == ("not an image", "format not recognised")


def test_split_errors_print_plain_numbers_and_ids(cli, run_dir, store_dir, split_file, tmp_path):
    src = tmp_path / "src"
    for c in ("a", "b"):
        for i in range(2):  # two images = two patients per class: too few for three splits
            rgb_png(src / c / f"{i}.png", seed=i)
    assert cli("ingest", "folder", src, "--out", tmp_path / "s", "--workers", 1, "--no-progress")[0] == 0
    rc, _, err = cli("split", tmp_path / "s", "--ratios", "0.5", "0.25", "0.25", "--out", tmp_path / "x.json")
    assert rc == 2
    line = one_error_line(err)
    assert "the ratios (0.5, 0.25, 0.25) need at least 3" in line and not INTERNALS.search(line)
    # A split file whose patient lists were edited: the patient is named as written.
    doc = json.loads(split_file.read_text())
    moved = doc["splits"]["val"]["patients"].pop()
    doc["splits"]["test"]["patients"].append(moved)
    edited = tmp_path / "split.json"
    edited.write_text(json.dumps(doc))
    rc, _, err = cli("evaluate", run_dir, "--store", store_dir, "--split-file", edited)
    assert rc == 4
    line = one_error_line(err)
    assert line.endswith(f"val holds images of patients not listed in it: {moved}") and not INTERNALS.search(
        line
    )


def test_rejection_counts_are_text(cli, idc_src, tmp_path):
    src = Path(shutil.copytree(idc_src, tmp_path / "src"))
    pngs = sorted(src.rglob("*.png"))
    pngs[0].write_bytes(b"")
    pngs[1].write_text("text")
    pngs[2].write_text("more text")
    rc, stdout, err = cli("ingest", "idc", src, "--out", tmp_path / "s", "--workers", 1, "--no-progress")
    assert rc == 0, err
    assert "rejected: 3 (2 not an image, 1 zero bytes; see rejected.csv)" in stdout
    for p in pngs:
        p.write_bytes(b"")
    rc, _, err = cli("ingest", "idc", src, "--out", tmp_path / "t", "--workers", 1, "--no-progress")
    assert rc == 3
    line = one_error_line(err)
    assert "all 48 files rejected (48 zero bytes)" in line and not INTERNALS.search(line)


def test_config_errors_name_values_not_dicts(cli, store_dir, split_file, tmp_path):
    rc, _, err = cli("info", "--config", "smoke", "--set", "model.fusion={kind: cmaf, dim: 63, heads: 8}")
    assert rc == 2
    line = one_error_line(err)
    assert line.endswith("model.fusion: heads (8) must divide dim (63)") and not INTERNALS.search(line)
    stages = ",".join(["{name: s, epochs: 0, lr: 0.1}"] * 20)
    rc, _, err = cli(
        "train", "--config", "smoke", "--store", store_dir, "--split", split_file, "--out", tmp_path / "r",
        "--set", f"train.stages=[{stages}]",
    )  # fmt: skip
    assert rc == 2
    assert len(one_error_line(err)) < 250  # the offending value is shortened, not dumped
