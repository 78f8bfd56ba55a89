"""Ingest: the real IDC and BreakHis samples, the input policy, resume, the store contract."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmafnet.cli import main
from cmafnet.data import ingest as ingest_mod
from cmafnet.data import validation as V
from cmafnet.data.ingest import ingest
from cmafnet.data.store import PatchStore
from cmafnet.errors import InputDataError, RunFolderError

# shared/data/README.md: patches per patient and class of the IDC sample
IDC_README = {
    "8863": (772, 207), "8865": (657, 55), "8867": (1480, 162), "8913": (873, 0), "8917": (0, 397),
    "8918": (0, 120), "8950": (0, 190), "8951": (0, 180), "8955": (0, 181), "8956": (0, 340), "8957": (0, 83),
}  # fmt: skip


def test_idc_sample_counts(idc_store: PatchStore) -> None:
    idx = idc_store.index
    assert len(idc_store) == 5697 == idc_store.images.shape[0]
    assert idc_store.images.shape[1:] == (50, 50, 3) and idc_store.images.dtype == np.uint8
    counts = idx.groupby(["patient", "label"]).size().unstack(fill_value=0)
    got = {p: (int(counts.loc[p].get(0, 0)), int(counts.loc[p].get(1, 0))) for p in counts.index}
    assert got == IDC_README
    assert idc_store.classes == ["non-IDC", "IDC"]
    y, names = idc_store.targets("label")
    assert y.dtype == np.int64 and names == ["non-IDC", "IDC"] and y.sum() == 1915
    assert idc_store.meta["n_rejected"] == 0
    assert "images: found 5,697, published 277,524" in idc_store.meta["differences_from_published"]
    # coordinates parsed from the name, original size recorded for the padded edge patches
    row = idx[idx.source.str.endswith("8863_idx5_x1001_y1001_class0.png")].iloc[0]
    assert (row.x, row.y, row.magnification) == (1001, 1001, -1)
    small = idx[(idx.orig_h < 50) | (idx.orig_w < 50)]
    assert len(small) == idc_store.meta["padded"] > 0
    r = small.iloc[0]
    img = idc_store.images[r.id]
    assert (img[r.orig_h :, :] == V.PAD_VALUE).all() and (img[:, r.orig_w :] == V.PAD_VALUE).all()


def test_idc_pixels_and_hash_match_source(idc_store: PatchStore, sample_data: Path) -> None:
    import hashlib

    for i in (0, 1234, 5696):
        row = idc_store.index.iloc[i]
        src = sample_data / "idc" / row.source
        assert hashlib.sha256(src.read_bytes()).hexdigest() == row.sha256
        arr = np.asarray(Image.open(src).convert("RGB"))
        np.testing.assert_array_equal(idc_store.images[i][: arr.shape[0], : arr.shape[1]], arr)


def test_rerun_is_noop_and_other_source_refused(
    idc_store: PatchStore, sample_data: Path, tmp_path: Path
) -> None:
    meta = ingest("idc", sample_data / "idc", idc_store.path, workers=2, progress=False)
    assert meta["noop"] and meta["store_hash"] == idc_store.store_hash
    with pytest.raises(RunFolderError, match="another source"):
        ingest("breakhis", sample_data / "breakhis", idc_store.path, workers=1, progress=False)


BREAKHIS = {  # file -> (subtype, magnification, label, patient)
    "SOB_M_DC-14-3909-200-018.png": ("DC", 200, 1, "14-3909"),
    "SOB_M_DC-14-2523-40-010.png": ("DC", 40, 1, "14-2523"),
    "SOB_M_PC-14-9146-40-001.png": ("PC", 40, 1, "14-9146"),
    "SOB_M_MC-14-10147-40-001.png": ("MC", 40, 1, "14-10147"),
    "SOB_M_LC-14-12204-40-001.png": ("LC", 40, 1, "14-12204"),
    "SOB_B_F-14-25197-400-033.png": ("F", 400, 0, "14-25197"),
    "SOB_B_F-14-25197-200-032.png": ("F", 200, 0, "14-25197"),
    "SOB_B_F-14-25197-40-023.png": ("F", 40, 0, "14-25197"),
    "SOB_B_F-14-25197-100-001.png": ("F", 100, 0, "14-25197"),
    "SOB_B_F-14-9133-40-001.png": ("F", 40, 0, "14-9133"),
    "SOB_B_A-14-22549AB-40-001.png": ("A", 40, 0, "14-22549AB"),
    "SOB_B_A-14-29960CD-200-007.png": ("A", 200, 0, "14-29960CD"),
    "SOB_B_TA-14-3411F-40-001.png": ("TA", 40, 0, "14-3411F"),
    "SOB_B_PT-14-21998AB-40-001.png": ("PT", 40, 0, "14-21998AB"),
}


def test_breakhis_sample_parses(sample_data: Path, tmp_path: Path) -> None:
    meta = ingest("breakhis", sample_data / "breakhis", tmp_path / "bh", workers=1, progress=False)
    store = PatchStore.open(tmp_path / "bh")
    assert len(store) == 14 and meta["n_rejected"] == 0 and store.image_size == (460, 700)
    got = {
        Path(r.source).name: (r.subtype, int(r.magnification), int(r.label), r.patient)
        for r in store.index.itertuples()
    }
    assert got == BREAKHIS
    assert set(store.index.label_name) == {"benign", "malignant"}
    y, names = store.targets("subtype")
    assert names == ["A", "F", "PT", "TA", "DC", "LC", "MC", "PC"]
    assert [names[i] for i in y] == store.index.subtype.tolist()


def _png(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path) if mode else Image.fromarray(arr).save(path)
    return path


def _rgb(rng: np.random.Generator, h: int = 50, w: int = 50) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def build_bad_corpus(root: Path) -> dict[str, str | None]:
    """IDC layout with one file per failure kind plus valid ones; returns relpath -> reason."""
    rng = np.random.default_rng(0)
    p = root / "100" / "0"
    q = root / "100" / "1"
    exp: dict[str, str | None] = {}

    def name(i: int, c: int = 0) -> str:
        return f"100_idx5_x{i}_y{i}_class{c}.png"

    for i in range(3):
        _png(p / name(i), _rgb(rng))
        exp[f"100/0/{name(i)}"] = None
    rgba = np.dstack([_rgb(rng), np.full((50, 50), 255, np.uint8)])
    _png(p / name(10), rgba)  # fully opaque RGBA: accepted, alpha dropped
    exp[f"100/0/{name(10)}"] = None
    _png(p / name(11), _rgb(rng, 50, 40))  # edge patch: padded
    exp[f"100/0/{name(11)}"] = None
    _png(q / name(12, 1), _rgb(rng))
    exp[f"100/1/{name(12, 1)}"] = None

    (p / name(20)).write_bytes(b"")
    exp[f"100/0/{name(20)}"] = V.ZERO_BYTES
    (p / name(21)).write_bytes(b"this is not a png at all")
    exp[f"100/0/{name(21)}"] = V.NOT_IMAGE
    good = _png(root / "tmp.png", _rgb(rng))
    data = good.read_bytes()
    good.unlink()
    (p / name(22)).write_bytes(data[: len(data) // 2])
    exp[f"100/0/{name(22)}"] = V.TRUNCATED
    _png(p / name(23), rng.integers(0, 256, (50, 50), dtype=np.uint8))
    exp[f"100/0/{name(23)}"] = V.GRAYSCALE
    alpha = np.full((50, 50), 255, np.uint8)
    alpha[0, 0] = 10
    _png(p / name(24), np.dstack([_rgb(rng), alpha]))
    exp[f"100/0/{name(24)}"] = V.TRANSPARENT
    Image.fromarray(rng.integers(0, 65535, (50, 50), dtype=np.uint16)).save(p / name(25))  # 16-bit PNG
    exp[f"100/0/{name(25)}"] = V.BIT16
    _png(p / name(26), _rgb(rng, 60, 60))
    exp[f"100/0/{name(26)}"] = V.BAD_SIZE
    _png(p / "slide_100_patch.png", _rgb(rng))
    exp["100/0/slide_100_patch.png"] = V.BAD_NAME
    _png(p / name(27, 1), _rgb(rng))  # class1 in folder 0
    exp[f"100/0/{name(27, 1)}"] = V.LABEL_MISMATCH
    return exp


def test_bad_input_corpus(tmp_path: Path) -> None:
    src = tmp_path / "src"
    exp = build_bad_corpus(src)
    meta = ingest("idc", src, tmp_path / "store", workers=1, progress=False)
    rej = (tmp_path / "store" / "rejected.csv").read_text().splitlines()[1:]
    got = {line.split(",")[0]: line.split(",")[1] for line in rej}
    assert got == {k: v for k, v in exp.items() if v is not None}
    store = PatchStore.open(tmp_path / "store")
    assert sorted(store.index.source) == sorted(k for k, v in exp.items() if v is None)
    assert meta["alpha_dropped"] == 1 and meta["padded"] == 1
    # --strict: the same corpus exits 3 through the CLI
    rc = main(
        [
            "ingest",
            "idc",
            str(src),
            "--out",
            str(tmp_path / "strict"),
            "--strict",
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    assert rc == InputDataError.exit_code


def test_all_rejected_exits_3(tmp_path: Path) -> None:
    src = tmp_path / "src" / "1" / "0"
    src.mkdir(parents=True)
    (src / "1_idx5_x1_y1_class0.png").write_bytes(b"")
    rc = main(
        [
            "ingest",
            "idc",
            str(tmp_path / "src"),
            "--out",
            str(tmp_path / "s"),
            "--workers",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 3
    with pytest.raises(InputDataError, match="all 1 files rejected"):
        ingest("idc", tmp_path / "src", tmp_path / "s2", workers=1, progress=False)


def test_resume_after_interruption(
    synthetic_idc_root: Path, synthetic_store: PatchStore, tmp_path: Path, monkeypatch
) -> None:
    real = ingest_mod._decode_chunk
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the second chunk never finishes
        return real(*a, **k)

    monkeypatch.setattr(ingest_mod, "_decode_chunk", flaky)
    with pytest.raises(KeyboardInterrupt):
        ingest("idc", synthetic_idc_root, tmp_path / "s", workers=1, progress=False)
    assert not (tmp_path / "s" / "meta.json").exists()
    with pytest.raises(RunFolderError, match=r"meta\.json missing"):
        PatchStore.open(tmp_path / "s")
    monkeypatch.setattr(ingest_mod, "_decode_chunk", real)
    meta = ingest("idc", synthetic_idc_root, tmp_path / "s", workers=1, progress=False)
    assert meta["decoded_files"] == len(synthetic_store) - ingest_mod.CHUNK  # first chunk reused
    resumed = PatchStore.open(tmp_path / "s")
    assert resumed.store_hash == synthetic_store.store_hash
    np.testing.assert_array_equal(np.asarray(resumed.images), np.asarray(synthetic_store.images))
    assert synthetic_store.meta["synthetic"] is True


def test_store_errors(synthetic_store: PatchStore, tmp_path: Path) -> None:
    with pytest.raises(RunFolderError, match="not found"):
        PatchStore.open(tmp_path / "nope")
    bad = tmp_path / "copy"
    shutil.copytree(synthetic_store.path, bad)
    text = (bad / "index.csv").read_text().replace(",0,non-IDC,", ",1,non-IDC,", 1)
    (bad / "index.csv").write_text(text)
    with pytest.raises(RunFolderError, match="hash mismatch"):
        PatchStore.open(bad)
    (bad / "images.npy").write_bytes(b"garbage")
    with pytest.raises(RunFolderError, match="corrupt"):
        PatchStore.open(bad)
    m = json.loads((synthetic_store.path / "meta.json").read_text())
    assert m["image_size"] == [50, 50] and m["classes"] == ["non-IDC", "IDC"]


def test_folder_layout_and_manifest(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for c in ("normal", "tumour"):
        for i in range(3):
            _png(tmp_path / "f" / c / f"{c}{i}.png", _rgb(rng, 32, 32))
    _png(tmp_path / "f" / "tumour" / "odd.png", _rgb(rng, 40, 32))
    _png(tmp_path / "f" / "tumour" / "PX" / "nested.png", _rgb(rng, 32, 32))  # <class>/<patient>/<image>
    ingest("folder", tmp_path / "f", tmp_path / "s1", workers=1, progress=False)
    s1 = PatchStore.open(tmp_path / "s1")
    assert s1.classes == ["normal", "tumour"] and len(s1) == 7 and s1.image_size == (32, 32)
    assert s1.index.set_index("source").loc["tumour/PX/nested.png", "patient"] == "PX"
    assert (tmp_path / "s1" / "rejected.csv").read_text().count(V.BAD_SIZE) == 1
    rows = ["path,label,patient"] + [
        f"f/{c}/{c}{i}.png,{c},P{i}" for c in ("normal", "tumour") for i in range(3)
    ]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    ingest("folder", tmp_path / "m.csv", tmp_path / "s2", workers=1, progress=False, size=(24, 24))
    s2 = PatchStore.open(tmp_path / "s2")
    assert s2.image_size == (24, 24) and sorted(set(s2.index.patient)) == ["P0", "P1", "P2"]
    assert s2.index.label.tolist() == [0, 0, 0, 1, 1, 1]


def test_breakhis_456_rows_padded_and_size_option(sample_data: Path, tmp_path: Path) -> None:
    src = next((sample_data / "breakhis").rglob("SOB_B_F-14-9133-40-001.png"))
    rel = src.relative_to(sample_data / "breakhis")
    arr = np.asarray(Image.open(src))
    _png(tmp_path / "bh" / rel, arr[:456])  # the 700x456 variant
    other = rel.parent / "SOB_B_F-14-9133-40-002.png"
    _png(tmp_path / "bh" / other, arr)
    meta = ingest("breakhis", tmp_path / "bh", tmp_path / "s", workers=1, progress=False)
    store = PatchStore.open(tmp_path / "s")
    assert meta["padded"] == 1 and store.image_size == (460, 700)
    row = store.index[store.index.orig_h == 456].iloc[0]
    assert (store.images[row.id][456:] == V.PAD_VALUE).all()
    np.testing.assert_array_equal(store.images[row.id][:456], arr[:456])
    meta = ingest("breakhis", tmp_path / "bh", tmp_path / "small", workers=1, progress=False, size=(115, 175))
    assert PatchStore.open(tmp_path / "small").image_size == (115, 175) and meta["resized"] == 2
