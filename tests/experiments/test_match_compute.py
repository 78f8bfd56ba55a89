"""`--match-compute`: every baseline row of Tables 1 and 2 also trained at its CMAF-Net run's recorded
training MACs, references first, waiting (never another budget) when a shard's reference is not done,
and both views in the aggregated table with their MACs (fake run functions, no training)."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest

from cmafnet.cli import main
from cmafnet.errors import ConfigError
from cmafnet.experiments.aggregate import write_table
from cmafnet.experiments.cost import GMACS_224, _idc_sizes, anchor_rates, method_rate, run_seconds, table_cost
from cmafnet.experiments.paper_tables import expand
from cmafnet.experiments.runner import Context, Summary, run_dir_of, run_table, table_specs, training_config
from cmafnet.experiments.spec import RunSpec, select_shard
from cmafnet.run import LAST_CHECKPOINT, write_meta


def _macs(spec: RunSpec) -> float:
    return 1e12 * (2 + zlib.crc32(spec.run_id.encode()) % 100 / 100)  # deterministic, differs per run


class FakeWork:
    """Trains by writing run.json with a cost; a compute-matched run spends its reference's recorded MACs,
    read from the folder its config's train.budget.match names (as the trainer does)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def train(self, spec: RunSpec, run_dir: Path, ctx: Context, resume: bool) -> None:
        self.calls.append(spec.run_id)
        budget = training_config(spec, ctx.out).train.budget
        if spec.match is None:
            assert budget is None
            macs = _macs(spec)
        else:
            ref = json.loads((Path(budget.match) / "run.json").read_text())
            assert ref["status"] == "finished"  # never a reference still training
            macs = ref["cost"]["total"]["macs"]
        (run_dir / LAST_CHECKPOINT).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / LAST_CHECKPOINT).write_bytes(b"ckpt")
        total = {"steps": 1, "images": 1, "passes": 1, "macs": macs, "seconds": 1.0}
        cost = {"stages": {}, "total": total, "macs_per_image": 1.0, "device": "cpu", "convention": "-"}
        write_meta(run_dir, {"status": "finished", "cost": cost})

    def evaluate(self, spec: RunSpec, run_dir: Path, ctx: Context) -> dict:
        h = zlib.crc32(spec.run_id.encode()) % 1000 / 1000
        keys = ("sensitivity", "specificity", "balanced_accuracy", "auprc", "mcc", "f1")
        return {"metrics": dict.fromkeys(keys, 0.5 + 0.4 * h), "params_m": 1.0}


def _ctx(tmp_path: Path) -> Context:
    (tmp_path / "store").mkdir(exist_ok=True)
    return Context(out=tmp_path / "exp", store=tmp_path / "store", scale="smoke")


def test_expand_doubles_every_baseline_row_with_its_cmafnet_reference() -> None:
    plain = expand("table2", 2, "smoke")
    both = expand("table2", 2, "smoke", match_compute=True)
    assert both[: len(plain)] == plain  # the equal-epoch runs are unchanged (same folders, fingerprints)
    matched = both[len(plain) :]
    baselines = [s for s in plain if s.row != "cmafnet"]
    assert len(matched) == len(baselines) == 5 * 5 * 2
    ids = {s.run_id: s for s in plain}
    for m, b in zip(matched, baselines, strict=True):
        assert m.row == f"{b.row}__cmafnet_compute" and m.label == f"{b.label} (CMAF-Net's compute)"
        ref = ids[m.match]
        assert (ref.row, ref.column, ref.seed) == ("cmafnet", b.column, b.seed)
        assert m.overrides == b.overrides and m.fingerprint != b.fingerprint
    assert len({s.run_id for s in both}) == len(both)
    with pytest.raises(ConfigError, match="table1, table2"):
        expand("table6", 1, "smoke", match_compute=True)


def test_matched_run_is_trained_after_its_reference_and_the_table_shows_both_views(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    work = FakeWork()
    s = run_table("table1", ctx, seeds=2, match_compute=True, train_fn=work.train, eval_fn=work.evaluate)
    assert len(s.trained) == 15 * 2 + 14 * 2 and not s.waiting
    first_matched = min(i for i, rid in enumerate(work.calls) if "__cmafnet_compute" in rid)
    assert {"cmafnet/seed0", "cmafnet/seed1"} <= set(work.calls[:first_matched])
    meta = json.loads((ctx.out / "runs" / "resnet50__cmafnet_compute" / "seed1" / "run.json").read_text())
    ref = json.loads((ctx.out / "runs" / "cmafnet" / "seed1" / "run.json").read_text())
    assert meta["cost"] == ref["cost"]
    exp = json.loads(
        (ctx.out / "runs" / "resnet50__cmafnet_compute" / "seed1" / "experiment.json").read_text()
    )
    assert exp["match"] == "cmafnet/seed1"

    table, paths = write_table("table1", ctx.out, seeds=2, scale="smoke", match_compute=True)
    labels = [label for label, _ in table.rows]
    assert len(labels) == 14 * 2 + 1
    i = labels.index("ResNet-50 (equal epochs)")
    assert labels[i + 1] == "ResNet-50 (CMAF-Net's compute)"
    equal, matched = table.rows[i][1], table.rows[i + 1][1]
    assert equal["sensitivity"].paper is not None and matched["sensitivity"].paper is None
    ref_macs = [_macs(r) for r in expand("table1", 2, "smoke") if r.row == "cmafnet"]
    assert matched["train_macs"].values == ref_macs  # mean over seeds of the references' MACs
    assert equal["train_macs"].values == [
        _macs(r) for r in expand("table1", 2, "smoke") if r.row == "resnet50"
    ]
    md = paths["markdown"].read_text()
    assert "| Training MACs |" in md and "Training MACs (paper)" not in md
    line = next(x for x in md.splitlines() if x.startswith("| ResNet-50 (CMAF-Net's compute) |"))
    assert f"{sum(ref_macs) / 2:.3g}" in line
    assert paths["compute_figure"].stat().st_size > 1000
    points = json.loads(paths["compute_json"].read_text())["runs"]
    assert len(points) == 58 and all(p["train_macs"] for p in points)
    # without the flag: the paper's layout, no MACs column
    plain, _ = write_table("table1", ctx.out, seeds=2, scale="smoke")
    assert plain.rows[0][0] == "ResNet-50" and len(plain.rows) == 15


def test_a_shard_waits_for_a_reference_another_shard_has_not_finished(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    only = ["resnet50", "resnet50__cmafnet_compute", "cmafnet"]  # rows; seed 0 only
    matched = "resnet50__cmafnet_compute/seed0"
    specs = table_specs("table1", 1, "smoke", only, match_compute=True)
    shard_of = {s.run_id: i for i in range(3) for s in select_shard(specs, (i, 3))}
    assert len(shard_of) == 3 and shard_of["cmafnet/seed0"] != shard_of[matched]

    def shard(rid: str, work: FakeWork, **kw: bool) -> Summary:
        return run_table("table1", ctx, seeds=1, shard=(shard_of[rid], 3), only=only, match_compute=True,
                         train_fn=work.train, eval_fn=work.evaluate, **kw)  # fmt: skip

    a = FakeWork()
    s = shard(matched, a)
    assert a.calls == [] and s.waiting == [f"{matched} waits for cmafnet/seed0 (not started)"]
    assert not run_dir_of(ctx.out, matched).exists()
    assert shard(matched, a, dry_run=True).waiting == s.waiting
    # the other shard trains the reference; the first one, rerun, now trains the matched run
    b = FakeWork()
    shard("cmafnet/seed0", b)
    assert b.calls == ["cmafnet/seed0"]
    c = FakeWork()
    again = shard(matched, c)
    assert c.calls == [matched] and not again.waiting


def test_dry_run_plans_the_matched_runs_after_their_references(tmp_path: Path) -> None:
    ctx = _ctx(tmp_path)
    s = run_table("table2", ctx, seeds=1, dry_run=True, match_compute=True)
    assert len(s.planned) == 30 + 25 and not s.waiting
    assert s.planned[-1].endswith("at the training MACs of cmafnet__imb99-1/seed0")
    assert not (ctx.out / "runs").exists()


def test_cli_list_and_dry_run_count_the_extra_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["experiment", "--list", "--seeds", "1"]) == 0
    plain = {x.split()[0]: x for x in capsys.readouterr().out.splitlines() if x.startswith("table")}
    assert main(["experiment", "--list", "--seeds", "1", "--match-compute"]) == 0
    out = capsys.readouterr().out
    both = {x.split()[0]: x for x in out.splitlines() if x.startswith("table")}
    assert "= 29" in both["table1"] and "= 15" in plain["table1"] and "= 55" in both["table2"]
    assert float(both["table1"].split()[4]) > float(plain["table1"].split()[4])
    assert both["table6"] == plain["table6"] and "CMAF-Net's training MACs" in out
    (tmp_path / "store").mkdir()
    args = ["experiment", "table1", "--out", str(tmp_path / "o"), "--store", str(tmp_path / "store"),
            "--scale", "smoke", "--seeds", "1", "--dry-run"]  # fmt: skip
    assert main([*args, "--match-compute"]) == 0
    assert capsys.readouterr().out.count("would train") == 29
    assert main(["experiment", "table6", "--out", str(tmp_path / "o"), "--match-compute"]) == 2
    assert "--match-compute" in capsys.readouterr().err


def test_a_matched_run_refuses_a_budget_of_its_own(tmp_path: Path) -> None:
    ctx = Context(out=tmp_path / "exp", store=tmp_path, scale="smoke", overrides=("train.budget.macs=1e12",))
    with pytest.raises(ConfigError, match=r"--match-compute sets train\.budget"):
        run_table("table1", ctx, seeds=1, match_compute=True, dry_run=True)


def test_cost_of_a_matched_run_is_cmafnets_macs_at_the_baselines_speed() -> None:
    rates, _ = anchor_rates()
    specs = {s.run_id: s for s in expand("table1", 1, "paper", match_compute=True)}
    plain, matched, ref = (
        specs[k] for k in ("resnet50/seed0", "resnet50__cmafnet_compute/seed0", "cmafnet/seed0")
    )
    extra = run_seconds(matched, rates, reference=ref) - run_seconds(plain, rates)
    # 100 CMAF-Net epochs x 2 SAM passes at CMAF-Net's forward MACs = this many ResNet-50 epochs
    epochs = 100 * 2 * GMACS_224["cmafnet"] / GMACS_224["resnet50"]
    train, val, _ = _idc_sizes(None)
    tr, inf = method_rate("resnet50", rates)
    assert extra == pytest.approx((epochs - 100) * (train / tr + val / inf), rel=1e-9)
    with pytest.raises(ValueError, match="reference"):
        run_seconds(matched, rates)
    assert table_cost(list(specs.values()), rates) > table_cost(expand("table1", 1, "paper"), rates)


@pytest.mark.slow
def test_the_cost_estimates_forward_macs_are_the_models_own() -> None:
    """GMACS_224 (what --list derives a matched baseline's epochs from) is what the MAC counter gives."""
    import torch

    from cmafnet.config import load_config
    from cmafnet.models import create_model
    from cmafnet.models.complexity import forward_macs

    for name, gmacs in GMACS_224.items():
        cfg = (
            load_config("paper")
            if name == "cmafnet"
            else load_config("baseline_paper", [f"model.name={name}"])
        )
        with torch.no_grad():
            measured = forward_macs(create_model(cfg.model).eval(), cfg.model.img_size) / 1e9
        assert measured == pytest.approx(gmacs, rel=0.01), name
