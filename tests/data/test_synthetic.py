"""The SYNTHETIC generators write layouts the real parsers accept, with learnable class signal."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from cmafnet.data.ingest import ingest
from cmafnet.data.store import PatchStore
from cmafnet.data.synthetic import write_breakhis_like, write_idc_like


def test_idc_like(synthetic_store: PatchStore) -> None:
    idx = synthetic_store.index
    assert len(synthetic_store) == 800 and synthetic_store.meta["n_rejected"] == 0
    assert idx.patient.str.startswith("syn").all() and synthetic_store.meta["synthetic"]
    per_patient = idx.groupby("patient").label.agg(["min", "max"])
    assert (per_patient["min"] == 0).all() and (per_patient["max"] == 1).all()  # both classes each
    # class signal: malignant patches are darker (more hematoxylin)
    y, _ = synthetic_store.targets()
    mean = np.asarray(synthetic_store.images).reshape(len(y), -1).mean(1)
    assert mean[y == 1].mean() < mean[y == 0].mean() - 10


def test_idc_like_speed_and_seed(tmp_path: Path) -> None:
    t = time.perf_counter()
    write_idc_like(tmp_path / "a", n_patients=4, patches_per_patient=30, seed=3)
    assert time.perf_counter() - t < 10  # generous: CI cores are shared
    write_idc_like(tmp_path / "b", n_patients=4, patches_per_patient=30, seed=3)
    fa = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    fb = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.png"))
    assert fa == fb and (tmp_path / "a" / fa[0]).read_bytes() == (tmp_path / "b" / fb[0]).read_bytes()


def test_breakhis_like(tmp_path: Path) -> None:
    root = write_breakhis_like(tmp_path / "bh", patients_per_subtype=1, images_per_magnification=2)
    meta = ingest("breakhis", root, tmp_path / "store", workers=1, progress=False, size=(46, 70))
    store = PatchStore.open(tmp_path / "store")
    assert meta["n_rejected"] == 0 and len(store) == 8 * 4 * 2 and store.image_size == (46, 70)
    assert sorted(store.index.subtype.unique()) == sorted(["A", "F", "PT", "TA", "DC", "LC", "MC", "PC"])
    assert sorted(store.index.magnification.unique()) == [40, 100, 200, 400]
    assert meta["synthetic"] and meta["resized"] == 0
