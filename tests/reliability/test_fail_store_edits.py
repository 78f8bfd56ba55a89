"""Stores edited after ingest: pixels in place, meta fields; detected on open for training and evaluation."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from _corpus import one_error_line

from cmafnet.data.splits import load_split
from cmafnet.data.store import PatchStore
from cmafnet.errors import RunFolderError


def _flip_one_pixel(store, row: int = 5) -> None:
    images = np.load(store / "images.npy", mmap_mode="r+")
    images[row, 7, 9, 1] ^= 1  # the smallest possible edit
    images.flush()
    del images


def _edit_meta(store, **fields) -> None:
    meta = json.loads((store / "meta.json").read_text())
    meta.update(fields)
    (store / "meta.json").write_text(json.dumps(meta))


PIXELS_CHANGED = "images.npy does not match the pixel hash recorded at ingest"


def test_pixels_edited_in_place_refused_by_evaluate_train_and_split(
    cli, run_dir, store_copy, split_file, tmp_path
):
    _flip_one_pixel(store_copy)
    rc, _, err = cli("evaluate", run_dir, "--store", store_copy, "--split-file", split_file)
    assert rc == 4 and PIXELS_CHANGED in one_error_line(err)
    rc, _, err = cli(
        "train", "--config", "smoke", "--store", store_copy, "--split", split_file, "--out", tmp_path / "r",
        "--no-progress", "--device", "cpu", "--set", "train.max_steps_per_epoch=1",
    )  # fmt: skip
    assert rc == 4 and PIXELS_CHANGED in one_error_line(err)
    assert not (tmp_path / "r" / "model.safetensors").exists()
    rc, _, err = cli("split", store_copy, "--out", tmp_path / "s.json")
    assert rc == 4 and PIXELS_CHANGED in one_error_line(err)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"image_size": [64, 64]}, "meta.json image_size [64, 64] does not match images.npy (50x50)"),
        ({"classes": ["IDC", "non-IDC"]}, "meta.json changed after ingest: classes;"),
        (
            {"subtype_classes": ["A"], "dataset": "breakhis"},
            "changed after ingest: dataset, subtype_classes;",
        ),
    ],
)
def test_meta_fields_edited(cli, run_dir, store_copy, split_file, fields, named):
    _edit_meta(store_copy, **fields)
    rc, _, err = cli("evaluate", run_dir, "--store", store_copy, "--split-file", split_file)
    assert rc == 4 and named in one_error_line(err)


def test_image_size_digest_names_the_field(store_copy):
    """Even an image_size edit that still matches the array is caught by its digest."""
    meta = json.loads((store_copy / "meta.json").read_text())
    meta["content_hash"]["meta"]["image_size"] = "0" * 16  # as if image_size had another value at ingest
    (store_copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(RunFolderError, match=r"meta\.json changed after ingest: image_size;"):
        PatchStore.open(store_copy)


def test_removed_field_and_informational_fields(store_copy):
    meta = json.loads((store_copy / "meta.json").read_text())
    meta["decode_seconds"], meta["workers"] = 99.0, 64  # timings: not part of the meaning
    (store_copy / "meta.json").write_text(json.dumps(meta))
    PatchStore.open(store_copy)
    del meta["per_class"]
    (store_copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(RunFolderError, match=r"changed after ingest: per_class \(removed\)"):
        PatchStore.open(store_copy)


def test_skip_variable_says_so(cli, run_dir, store_copy, split_file, monkeypatch, caplog):
    _flip_one_pixel(store_copy)
    monkeypatch.setenv("CMAFNET_SKIP_PIXEL_HASH", "1")
    with caplog.at_level(logging.WARNING):
        rc, _, err = cli(
            "evaluate", run_dir, "--store", store_copy, "--split-file", split_file, "--bootstrap", 0
        )
    assert rc == 0, err
    assert "pixel hash NOT checked (CMAFNET_SKIP_PIXEL_HASH is set)" in caplog.text
    _edit_meta(store_copy, image_size=[8, 8])  # meta is still checked while pixels are skipped
    rc, _, err = cli("evaluate", run_dir, "--store", store_copy, "--split-file", split_file)
    assert rc == 4


def test_rerunning_ingest_rebuilds_an_edited_store(cli, idc_src, store_dir, store_copy, split_file, caplog):
    _flip_one_pixel(store_copy)
    with caplog.at_level(logging.WARNING):
        rc, _, err = cli("ingest", "idc", idc_src, "--out", store_copy, "--workers", 1, "--no-progress")
    assert rc == 0, err
    assert PIXELS_CHANGED in caplog.text and "rebuilding the store" in caplog.text
    rebuilt, original = PatchStore.open(store_copy), PatchStore.open(store_dir)
    np.testing.assert_array_equal(np.asarray(rebuilt.images), np.asarray(original.images))
    assert rebuilt.store_hash == original.store_hash
    assert len(load_split(split_file, rebuilt).test)  # the split made before still applies


def test_store_without_content_hash_warns_and_reingest_keeps_its_identity(cli, idc_src, store_copy, caplog):
    meta = json.loads((store_copy / "meta.json").read_text())
    meta.pop("content_hash")  # as written by an older cmafnet
    (store_copy / "meta.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING):
        old = PatchStore.open(store_copy)
    assert "has no content hash" in caplog.text
    rc, _, err = cli(
        "ingest", "idc", idc_src, "--out", store_copy, "--force", "--workers", 1, "--no-progress"
    )
    assert rc == 0, err
    new = PatchStore.open(store_copy)
    assert "content_hash" in new.meta and new.store_hash == old.store_hash


def test_pixel_digest_is_chunking_and_thread_independent(monkeypatch):
    from cmafnet.data import integrity

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 9, 11, 3), dtype=np.uint8)
    monkeypatch.setattr(integrity, "CHUNK_BYTES", 256)  # many chunks on a tiny array
    ref = integrity.pixel_digest(images, workers=1)
    assert integrity.pixel_digest(images, workers=4) == ref
    for flat in (0, images.size - 1):  # the first and the last byte
        edited = images.copy().reshape(-1)
        edited[flat] ^= 1
        assert integrity.pixel_digest(edited.reshape(images.shape), workers=4) != ref
    assert integrity.pixel_digest(images.reshape(7, 11, 9, 3)) != ref  # same bytes, other shape
