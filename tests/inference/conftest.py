"""Run folders built exactly as training writes them (config.yaml, run.json, model.safetensors)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from cmafnet.config import dump_config, load_config
from cmafnet.models import create_model
from cmafnet.run import CONFIG_FILE, WEIGHTS_FILE, save_weights, write_meta

CLASSES = ["no_idc", "idc"]


def make_run(
    root: Path,
    model: str = "resnet18",
    threshold: float | None = 0.3,
    weights: bool = True,
    stain: bool = False,
    stain_reference: dict | None = None,
    img_size: int = 64,
) -> Path:
    """A tiny run folder (smoke config, 64 px, random init) following the run-folder contract.

    Stain normalisation is off unless asked for: Macenko on 512-px tiles dominates CPU test time.
    """
    root.mkdir(parents=True, exist_ok=True)
    cfg = load_config(
        "smoke",
        [f"model.name={model}", f"data.stain.enabled={str(stain).lower()}", f"model.img_size={img_size}"],
    )
    (root / CONFIG_FILE).write_text(dump_config(cfg))
    meta = {"classes": CLASSES, "img_size": cfg.model.img_size, "status": "finished", "dataset": "idc"}
    if threshold is not None:
        meta["threshold"] = threshold
    if stain_reference is not None:
        meta["stain_reference"] = stain_reference
    write_meta(root, meta)
    if weights:
        torch.manual_seed(0)
        save_weights(create_model(cfg.model), root / WEIGHTS_FILE)
    return root


@pytest.fixture(scope="session")
def run_factory():
    """``make_run`` as a fixture (test folders are not packages, so tests cannot import it)."""
    return make_run


@pytest.fixture(scope="session")
def baseline_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 32 px: the smallest valid input; the CPU test machine is shared, so every FLOP counts.
    return make_run(tmp_path_factory.mktemp("runs") / "resnet18", img_size=32)


@pytest.fixture(scope="session")
def cmaf_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "cmafnet", model="cmafnet")


def write_tiled_tiff(path: Path, rgb: np.ndarray, mpp: float, tile: int = 128) -> Path:
    """A single-level, uncompressed, tiled RGB TIFF stating ``mpp`` (OpenSlide's "generic tiff").

    Written byte by byte (Pillow writes strips only, which OpenSlide refuses); the resolution is in
    pixels per centimetre, which OpenSlide turns into ``openslide.mpp-x`` / ``-y``.
    """
    h, w, _ = rgb.shape
    tiles = []
    for ty in range(0, h, tile):
        for tx in range(0, w, tile):
            t = np.full((tile, tile, 3), 255, np.uint8)  # edge tiles padded with white
            blk = rgb[ty : ty + tile, tx : tx + tile]
            t[: blk.shape[0], : blk.shape[1]] = blk
            tiles.append(t.tobytes())
    n = len(tiles)
    res = struct.pack("<2I", round(1e4 / mpp * 1000), 1000)  # pixels per cm as a rational
    # (tag, type, count, value or None = offset into the data after the IFD); SHORT=3, LONG=4, RATIONAL=5
    entries = [(256, 4, 1, w), (257, 4, 1, h), (258, 3, 3, None), (259, 3, 1, 1), (262, 3, 1, 2),
               (277, 3, 1, 3), (282, 5, 1, None), (283, 5, 1, None), (284, 3, 1, 1), (296, 3, 1, 3),
               (322, 3, 1, tile), (323, 3, 1, tile), (324, 4, n, None), (325, 4, n, None)]  # fmt: skip
    extra_at = 8 + 2 + 12 * len(entries) + 4
    data_at = extra_at + 6 + 16 + 8 * n
    offsets = struct.pack(f"<{n}I", *(data_at + k * len(tiles[0]) for k in range(n)))
    extra = (
        struct.pack("<3H", 8, 8, 8) + res + res + offsets + struct.pack(f"<{n}I", *(len(t) for t in tiles))
    )
    where = {
        258: extra_at,
        282: extra_at + 6,
        283: extra_at + 14,
        324: extra_at + 22,
        325: extra_at + 22 + 4 * n,
    }
    out = bytearray(b"II*\x00" + struct.pack("<IH", 8, len(entries)))
    for tag, typ, count, value in entries:
        inline = typ == 3 and count == 1  # one SHORT sits in the entry's value field, padded
        value = where[tag] if value is None else value
        out += (
            struct.pack("<HHIHH", tag, typ, count, value, 0)
            if inline
            else struct.pack("<HHII", tag, typ, count, value)
        )
    out += struct.pack("<I", 0) + extra + b"".join(tiles)
    path.write_bytes(bytes(out))
    return path


@pytest.fixture(scope="session")
def generated_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 768 x 640 px generated H&E-like slide at 2 um/px: a block of tissue on glass (SYNTHETIC)."""
    from cmafnet.data.synthetic import _patient_stain, render

    rng = np.random.default_rng(0)
    img = np.full((640, 768, 3), 242, np.uint8)  # glass
    # a mosaic of 8 x 9 generated 64-px patches, malignant on the left half
    patches = render(rng, np.tile(np.arange(9) < 4, 8), 64, 64, _patient_stain(rng))  # (72, 64, 64, 3)
    img[64:576, 96:672] = patches.reshape(8, 9, 64, 64, 3).transpose(0, 2, 1, 3, 4).reshape(512, 576, 3)
    return write_tiled_tiff(tmp_path_factory.mktemp("slides") / "generated.tiff", img, mpp=2.0)
