"""Each table expands to exactly the paper's rows (x seeds); shards are disjoint and covering."""

from __future__ import annotations

import pytest

from cmafnet.config import dump_config, load_config
from cmafnet.errors import ConfigError
from cmafnet.evaluation.paper import paper_table
from cmafnet.experiments import TABLES, expand, parse_shard, select_shard
from cmafnet.experiments.paper_tables import IMBALANCE_RATIOS


def _paper_rows(name: str, field: str) -> list[str]:
    return [r[field] for r in paper_table(name)["rows"] if not r.get("derived")]


def _our_rows(name: str) -> list[str]:
    return [r.paper_label or r.name for r in TABLES[name].rows]


@pytest.mark.parametrize(
    ("name", "field"),
    [("table1", "method"), ("table2", "method"), ("table3", "method"), ("table6", "configuration"),
     ("table7", "initialization"), ("table8", "method")],
)  # fmt: skip
def test_rows_are_the_papers(name: str, field: str) -> None:
    assert _our_rows(name) == _paper_rows(name, field)


def test_table4_and_5_rows_are_the_papers() -> None:
    methods4 = list(dict.fromkeys(_paper_rows("table4", "method")))
    assert _our_rows("table4") == methods4
    assert _our_rows("table5") == paper_table("table5")["columns"]


@pytest.mark.parametrize("seeds", [1, 5])
def test_run_counts(seeds: int) -> None:
    n_rows = {"table1": 15, "table2": 6, "table3": 4, "table4": 5, "table5": 3, "table6": 19, "table7": 7}
    for name, rows in n_rows.items():
        specs = expand(name, seeds)
        cols = len(IMBALANCE_RATIOS) if name == "table2" else 1
        assert len(specs) == rows * cols * seeds, name
        assert len({s.run_id for s in specs}) == len(specs), f"{name}: duplicate run ids"
        assert sorted({s.seed for s in specs}) == list(range(seeds))
    assert len(expand("table8", seeds)) == 4  # profiling: no seeds


def test_table2_columns_and_shared_runs() -> None:
    t1 = {s.run_id for s in expand("table1", 2)}
    t2 = expand("table2", 2)
    assert sorted({s.column for s in t2}, key=str) == sorted(IMBALANCE_RATIOS, key=str)
    # the 70:30 (original) column is the same training as Table 1 -> same run folder
    assert {s.run_id for s in t2 if s.column is None} <= t1
    for s in t2:
        if s.column:
            assert f"data.imbalance={s.column}" in s.overrides


def test_every_ablation_row_is_a_distinct_valid_config() -> None:
    dumps = {}
    for s in expand("table6", 1, "smoke") + expand("table7", 1, "smoke"):
        cfg = load_config(s.base, list(s.overrides))
        dumps.setdefault(dump_config(cfg), []).append(s.run_id)
    # Table 6 "Full" and Table 7 "LogNormal(0, 0.1)" are the paper default: the only allowed collision
    shared = [ids for ids in dumps.values() if len(set(ids)) > 1]
    assert shared == []
    assert len(dumps) == 19 + 7 - 1


def test_ablation_overrides_reach_the_config() -> None:
    by_row = {s.row: load_config(s.base, list(s.overrides)) for s in expand("table6", 1, "paper")}
    assert by_row["cmafnet__no_contextual"].model.contextual.enabled is False
    assert by_row["cmafnet__concat"].model.fusion.kind == "concat"
    assert by_row["cmafnet__no_temp"].model.fusion.learn_temperature is False
    assert by_row["cmafnet__no_temp"].model.fusion.tau_init.a == 1.0
    assert len(by_row["cmafnet__one_stage"].train.stages) == 1
    assert by_row["cmafnet__one_stage"].train.stages[0].epochs == 100
    assert by_row["cmafnet__no_aug"].data.augment.enabled is False
    assert len(by_row["cmafnet"].train.stages) == 3


def test_baseline_rows_use_their_model_and_loss() -> None:
    cfgs = {s.row: load_config(s.base, list(s.overrides)) for s in expand("table1", 1, "paper")}
    assert cfgs["resnet50-focal"].model.name == "resnet50" and cfgs["resnet50-focal"].loss.name == "focal"
    ldam = cfgs["efficientnet_b3-ldam"]
    assert ldam.loss.name == "ldam" and ldam.model.head.normalized is True
    assert cfgs["transfuse-bsm"].loss.name == "balanced_softmax"
    assert cfgs["swin_t"].train.sam.enabled is False and len(cfgs["swin_t"].train.stages) == 1
    assert cfgs["cmafnet"].model.name == "cmafnet"
    from cmafnet.models import list_models

    names = list_models()
    for c in cfgs.values():
        assert c.model.name in names


def test_breakhis_tables_are_8_class() -> None:
    for s in expand("table4", 1) + expand("table5", 1):
        assert load_config(s.base, list(s.overrides)).model.num_classes == 8
        assert s.dataset == "breakhis"


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_shards_are_disjoint_and_cover(n: int) -> None:
    specs = expand("table1", 5)
    parts = [select_shard(specs, (i, n)) for i in range(n)]
    ids = [s.run_id for p in parts for s in p]
    assert len(ids) == len(set(ids)) == len(specs)
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1  # round-robin balance
    assert select_shard(specs, (0, n)) == parts[0]  # deterministic


def test_two_shards_cover_all_runs_once() -> None:
    specs = expand("table2", 5)
    a, b = (select_shard(specs, (i, 2)) for i in range(2))
    assert {s.run_id for s in a}.isdisjoint({s.run_id for s in b})
    assert {s.run_id for s in a} | {s.run_id for s in b} == {s.run_id for s in specs}


@pytest.mark.parametrize("bad", ["2/2", "a/b", "1", "-1/3", "0/0"])
def test_bad_shard_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_shard(bad)


def test_unknown_table_and_bad_seeds() -> None:
    with pytest.raises(ConfigError, match="table1"):
        expand("tabel1")
    with pytest.raises(ConfigError):
        expand("table1", 0)
