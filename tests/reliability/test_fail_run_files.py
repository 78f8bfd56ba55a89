"""Corrupt or misplaced files: one line naming the file, the documented exit code, nothing half-written."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from _corpus import one_error_line, rgb_png


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".partial", ".tmp")))


def test_truncated_weights_then_restored(cli, run_dir, tmp_path):
    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    weights = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(weights[:100])  # a copy cut short
    good = rgb_png(tmp_path / "good.png")
    rc, _, err = cli("predict", run, good, "--out", tmp_path / "p.csv", "--no-progress")
    assert rc == 4
    line = one_error_line(err)
    assert "model.safetensors: corrupt or truncated safetensors file" in line
    assert not (tmp_path / "p.csv").exists() and _leftovers(tmp_path) == []
    (run / "model.safetensors").write_bytes(weights)  # what the user does next: copy it again
    rc, _, err = cli("predict", run, good, "--out", tmp_path / "p.csv", "--no-progress")
    assert rc == 0, err


def test_broken_run_json(cli, run_dir, tmp_path):
    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    (run / "run.json").write_text('{"classes": [')
    rc, _, err = cli("predict", run, rgb_png(tmp_path / "g.png"), "--out", tmp_path / "p.csv")
    assert rc == 4
    assert "run.json: not readable JSON (Expecting value: line 1 column 14" in one_error_line(err)
    rc, _, err = cli("evaluate", run, "--store", tmp_path)
    assert rc == 4 and "run.json: not readable JSON" in one_error_line(err)


def test_broken_config_in_a_run_folder_is_a_run_folder_error(cli, run_dir, tmp_path):
    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    (run / "config.yaml").write_text("model: [\n")
    rc, _, err = cli("export", run, "--format", "torchscript")
    assert rc == 4 and "config.yaml: not valid YAML" in one_error_line(err)


def test_zero_byte_images_npy(cli, run_dir, store_copy, split_file):
    (store_copy / "images.npy").write_bytes(b"")
    rc, _, err = cli("evaluate", run_dir, "--store", store_copy, "--split-file", split_file)
    assert rc == 4
    assert one_error_line(err).endswith(
        "images.npy: is empty (0 bytes); re-ingest the store ('cmafnet ingest ... --force')"
    )


def test_binary_and_non_utf8_manifests(cli, tmp_path):
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")  # an image renamed .csv
    rc, _, err = cli("ingest", "folder", binary, "--out", tmp_path / "s1", "--no-progress")
    assert rc == 3 and "bin.csv: CSV manifest is not a text file (it holds NUL bytes)" in one_error_line(err)
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("path,label\ncaf\u00e9.png,a\n".encode("latin-1"))
    rc, _, err = cli("ingest", "folder", latin1, "--out", tmp_path / "s2", "--no-progress")
    assert (
        rc == 3
        and "latin1.csv: CSV manifest is not UTF-8 text (byte 0xe9 at offset 14)" in one_error_line(err)
    )
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s2").exists()


def test_predict_out_is_a_folder(cli, run_dir, tmp_path):
    outdir = tmp_path / "results"
    outdir.mkdir()
    good = rgb_png(tmp_path / "good.png")
    rc, _, err = cli("predict", run_dir, good, "--out", outdir, "--no-progress")
    assert rc == 2
    assert f"--out {outdir}: is a folder; give a file name" in one_error_line(err)
    assert list(outdir.iterdir()) == [] and _leftovers(tmp_path) == []
    rc, _, err = cli(
        "predict", run_dir, good, "--out", outdir / "p.csv", "--no-progress"
    )  # the fix it suggests
    assert rc == 0 and (outdir / "p.csv").exists(), err


def test_other_outputs_of_the_wrong_kind(cli, run_dir, store_dir, tmp_path):
    rc, _, err = cli("split", store_dir, "--out", tmp_path)
    assert (
        rc == 2 and f"--out {tmp_path}: is a folder; give a file name, e.g. {tmp_path / 'split.json'}" in err
    )
    (tmp_path / "file").write_text("x")
    rc, _, err = cli("evaluate", run_dir, "--store", store_dir, "--out", tmp_path / "file")
    assert rc == 2 and "exists and is not a folder" in one_error_line(err)
    rc, _, err = cli("export", run_dir, "--format", "torchscript", "--out", tmp_path)
    assert rc == 2 and "is a folder; give a file name, e.g." in one_error_line(err)


def test_ingest_out_is_an_existing_file(cli, idc_src, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    rc, _, err = cli("ingest", "idc", idc_src, "--out", target, "--no-progress")
    assert rc == 2 and f"--out {target}: exists and is not a folder" in one_error_line(err)
    assert target.read_text() == "keep me"


def test_pickled_checkpoint_is_refused_in_one_line(cli, tmp_path):
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"model": {"w": torch.zeros(2)}, "extra": Payload()}, tmp_path / "evil.pt")
    rc, _, err = cli(
        "info", "--config", "smoke", "--set", "model.name=resnet18", "--set", "model.img_size=32",
        "--set", f"model.weights={tmp_path / 'evil.pt'}",
    )  # fmt: skip
    assert rc == 4
    line = one_error_line(err)
    assert "evil.pt: refused to load: it holds pickled Python objects (posix.mkdir)" in line
    assert "weights_only" not in line and not marker.exists()


def test_strict_refusal_leaves_no_partial(cli, idc_src, tmp_path):
    src = Path(shutil.copytree(idc_src, tmp_path / "src"))
    bad = next(src.rglob("*.png"))
    bad.write_bytes(b"not a png")
    rc, _, err = cli(
        "ingest", "idc", src, "--out", tmp_path / "s", "--strict", "--workers", 1, "--no-progress"
    )
    assert rc == 3
    assert "--strict: 1 of 48 files rejected (1 not an image)" in one_error_line(err)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["rejected.csv"]
