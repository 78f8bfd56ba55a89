"""Skip finished / resume unfinished runs, aggregation into the paper's layout, with fake run functions."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from cmafnet.errors import InputDataError, RunFolderError
from cmafnet.experiments.aggregate import write_table
from cmafnet.experiments.execute import convergence, convergence_from_curve
from cmafnet.experiments.runner import Context, run_table
from cmafnet.experiments.spec import RunSpec
from cmafnet.run import LAST_CHECKPOINT, METRICS_FILE, write_meta


class Killed(Exception):
    pass


class FakeWork:
    """Records calls; "trains" by writing run.json; can be told to die in the middle of the k-th run."""

    def __init__(self, die_at: int | None = None) -> None:
        self.calls: list[tuple[str, bool]] = []
        self.evals: list[str] = []
        self.die_at = die_at

    def train(self, spec: RunSpec, run_dir: Path, ctx: Context, resume: bool) -> None:
        self.calls.append((spec.run_id, resume))
        write_meta(run_dir, {"status": "running"})
        (run_dir / LAST_CHECKPOINT).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / LAST_CHECKPOINT).write_bytes(b"ckpt")
        if self.die_at is not None and len(self.calls) == self.die_at:
            raise Killed(spec.run_id)
        write_meta(run_dir, {"status": "finished"})

    def evaluate(self, spec: RunSpec, run_dir: Path, ctx: Context) -> dict:
        self.evals.append(spec.run_id)
        return {"metrics": fake_metrics(spec), "params_m": 1.0, "convergence": {"epoch": 3, "stability": 0.5}}


def fake_metrics(spec: RunSpec) -> dict:
    h = zlib.crc32(spec.run_id.encode()) % 1000 / 1000  # deterministic, differs per run
    return {
        k: 0.5 + 0.4 * h for k in ("sensitivity", "specificity", "balanced_accuracy", "auprc", "mcc", "f1")
    }


def _ctx(tmp_path: Path) -> Context:
    store = tmp_path / "store"
    store.mkdir(exist_ok=True)
    return Context(out=tmp_path / "exp", store=store, scale="smoke")


def test_killed_sweep_reruns_only_what_is_missing(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    first = FakeWork(die_at=4)
    with pytest.raises(Killed):
        run_table("table6", ctx, seeds=2, train_fn=first.train, eval_fn=first.evaluate)
    done_before = [rid for rid, _ in first.calls[:3]]
    killed = first.calls[3][0]
    assert all(not r for _, r in first.calls)  # nothing to resume on a fresh folder

    second = FakeWork()
    s = run_table("table6", ctx, seeds=2, train_fn=second.train, eval_fn=second.evaluate)
    called = [rid for rid, _ in second.calls]
    assert set(called).isdisjoint(done_before)  # finished runs are not retrained
    assert (killed, True) in second.calls  # the interrupted run resumes from its checkpoint
    assert sum(resume for _, resume in second.calls) == 1
    assert len(called) == 19 * 2 - 3
    assert sorted(s.skipped) == sorted(done_before)
    assert s.resumed == [killed]

    third = FakeWork()
    s3 = run_table("table6", ctx, seeds=2, train_fn=third.train, eval_fn=third.evaluate)
    assert third.calls == [] and third.evals == [] and len(s3.skipped) == 38


def test_finished_training_without_result_is_only_evaluated(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    work = FakeWork()
    run_table("table1", ctx, seeds=1, only=["resnet50"], train_fn=work.train, eval_fn=work.evaluate)
    (ctx.out / "runs" / "resnet50" / "seed0" / "result_test.json").unlink()
    again = FakeWork()
    run_table("table1", ctx, seeds=1, only=["resnet50"], train_fn=again.train, eval_fn=again.evaluate)
    assert again.calls == [] and again.evals == ["resnet50/seed0"]


def test_shards_run_disjoint_parts(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    a, b = FakeWork(), FakeWork()
    run_table("table7", ctx, seeds=2, shard=(0, 2), train_fn=a.train, eval_fn=a.evaluate)
    run_table("table7", ctx, seeds=2, shard=(1, 2), train_fn=b.train, eval_fn=b.evaluate)
    ids_a, ids_b = {r for r, _ in a.calls}, {r for r, _ in b.calls}
    assert ids_a.isdisjoint(ids_b) and len(ids_a | ids_b) == 14


def test_dry_run_touches_nothing(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    work = FakeWork()
    s = run_table("table2", ctx, seeds=1, dry_run=True, train_fn=work.train, eval_fn=work.evaluate)
    assert work.calls == [] and len(s.planned) == 30 and not (ctx.out / "runs").exists()


def test_folder_of_another_run_is_refused(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    work = FakeWork()
    run_table("table1", ctx, seeds=1, only=["resnet50"], train_fn=work.train, eval_fn=work.evaluate)
    exp = ctx.out / "runs" / "resnet50" / "seed0" / "experiment.json"
    doc = json.loads(exp.read_text())
    doc["fingerprint"] = "0" * 16
    exp.write_text(json.dumps(doc))
    (exp.parent / "result_test.json").unlink()
    with pytest.raises(RunFolderError, match="different run"):
        run_table("table1", ctx, seeds=1, only=["resnet50"], train_fn=work.train, eval_fn=work.evaluate)


def test_missing_store_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputDataError, match="--store"):
        run_table("table1", Context(out=tmp_path), seeds=1)
    with pytest.raises(InputDataError, match="--breakhis-store"):
        run_table("table3", Context(out=tmp_path, store=tmp_path), seeds=1)


def test_aggregate_table1_mean_std_beside_paper(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    work = FakeWork()
    run_table("table1", ctx, seeds=3, train_fn=work.train, eval_fn=work.evaluate)
    table, paths = write_table("table1", ctx.out, seeds=3, scale="smoke")
    vals = [100 * fake_metrics(s)["sensitivity"] for s in _specs("table1", 3) if s.row == "resnet50"]
    expected = f"{np.mean(vals):.2f} ± {np.std(vals, ddof=1):.2f}"
    md = paths["markdown"].read_text()
    row = next(line for line in md.splitlines() if line.startswith("| ResNet-50 |"))
    assert expected in row and "72.34 ± 2.1" in row  # ours beside the paper's
    assert paths["figure"].stat().st_size > 1000
    assert len(table.rows) == 15


def test_aggregate_partial_results_are_marked(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    work = FakeWork()
    run_table(
        "table2",
        ctx,
        seeds=2,
        only=["resnet50/seed0", "cmafnet*"],
        train_fn=work.train,
        eval_fn=work.evaluate,
    )
    _table, paths = write_table("table2", ctx.out, seeds=2, scale="smoke")
    md = paths["markdown"].read_text()
    assert "(n=1/2)" in md and "…" in md
    assert "Relative retention" in md
    assert paths["figure"].exists()


def _specs(name: str, seeds: int) -> list[RunSpec]:
    from cmafnet.experiments import expand

    return expand(name, seeds, "smoke")


def test_convergence_epoch() -> None:
    curve = [0.5, 0.6, 0.82, 0.85, 0.9, 0.88, 0.9]
    res = convergence_from_curve(curve)
    # 90% of the final 0.9 is 0.81: first reached at epoch 3
    assert res["epoch"] == 3 and res["epochs"] == 7
    assert res["stability"] == pytest.approx(np.std(curve, ddof=1) * 100)
    assert convergence_from_curve([0.7])["epoch"] == 1


def test_convergence_from_metrics_csv(tmp_path: Path) -> None:
    (tmp_path / METRICS_FILE).write_text("epoch,stage,val_balanced_accuracy\n1,a,0.4\n2,a,0.95\n3,b,1.0\n")
    assert convergence(tmp_path)["epoch"] == 2
    assert convergence(tmp_path / "none")["epoch"] is None
