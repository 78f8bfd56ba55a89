"""Runs of a table: what one run is (``RunSpec``), table definitions, expansion and sharding.

A table is data: rows (a method or an ablation = a base config plus ``--set`` overrides), optional
imbalance ratios, how to evaluate (own test split, zero-shot on BreakHis, profile), and its columns.
``expand`` turns it into a sorted list of ``RunSpec``; ``select_shard`` picks a deterministic,
disjoint slice of it (index ``i mod n``), so any scheduler can spread a table over machines.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Literal

from cmafnet.errors import ConfigError
from cmafnet.evaluation.table import Column

Scale = Literal["smoke", "paper"]
Dataset = Literal["idc", "breakhis"]
EvalKind = Literal["test", "zeroshot", "subtype", "profile"]


@dataclass(frozen=True)
class Recipe:
    """How to train one method: a base config family plus overrides (scale-independent)."""

    key: str  # stable id, part of the run folder name
    label: str  # how the paper's tables call it
    # cmafnet -> paper/smoke.yaml; baseline -> baseline_<scale>.yaml; probe -> probe_<scale>.yaml
    base: Literal["cmafnet", "baseline", "probe"]
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Row:
    """One row of a table: a method and, optionally, extra overrides (ablations, tau init)."""

    recipe: Recipe
    label: str | None = None  # row label in our table (default: the recipe's label)
    paper_label: str | None = None  # row label in paper_numbers.json (default: label)
    key_suffix: str = ""  # distinguishes rows that add overrides to the same recipe
    overrides: tuple[str, ...] = ()
    group: str | None = None

    @property
    def name(self) -> str:
        return self.label or self.recipe.label

    @property
    def key(self) -> str:
        return self.recipe.key + (f"__{self.key_suffix}" if self.key_suffix else "")


@dataclass(frozen=True)
class FigureDef:
    """A table's figure: bars (one group per row) or lines (one per row over the columns), ours beside the
    paper's; ``keys`` are the columns drawn."""

    kind: Literal["bars", "lines"]
    keys: tuple[str, ...]
    ylabel: str
    xlabel: str = ""


@dataclass(frozen=True)
class TableDef:
    """A paper table as data: its runs (rows x ratios x seeds), its columns and its figure."""

    name: str  # table1 ... table8
    title: str
    rows: tuple[Row, ...]
    columns: tuple[Column, ...]
    figure: FigureDef
    row_header: str = "Method"
    paper_key: str = "method"  # the paper rows' field that names a row
    # printed rows: one per row, per row and magnification (Table 4) or per BreakHis subtype (Table 5)
    lines: Literal["rows", "magnification", "class", "adaptation"] = "rows"
    retention_of: str | None = None  # Table 2: add this row's retention (% of its first column)
    dataset: Dataset = "idc"  # which store the runs train on
    evaluation: EvalKind = "test"
    ratios: tuple[str | None, ...] = (None,)  # table2: imbalance ratios (None = original)
    seeded: bool = True  # table8 (profiling) has one run per row, no seeds
    notes: tuple[str, ...] = ()  # Table 8's may name {device}, {img_size}, {batch}, {amp}
    # the row whose measured training compute ``--match-compute`` gives every baseline row (table1, table2)
    compute_reference: str | None = None


@dataclass(frozen=True)
class RunSpec:
    """One independent run: a resolved config recipe, a seed and the data it trains on."""

    table: str
    row: str  # row key
    label: str
    column: str | None  # imbalance ratio for table2, else None
    seed: int
    dataset: Dataset
    evaluation: EvalKind
    base: str  # config name (paper, smoke, baseline_paper, baseline_smoke)
    overrides: tuple[str, ...] = field(default_factory=tuple)
    # run id of the run whose recorded training MACs this run spends (``train.budget.match``), or None
    match: str | None = None

    @property
    def config_key(self) -> str:
        """Run folder name without the seed: runs sharing it are the same run (shared across tables)."""
        col = f"__imb{self.column.replace(':', '-')}" if self.column else ""
        data = "" if self.dataset == "idc" else f"__{self.dataset}"
        return f"{self.row}{col}{data}"

    @property
    def run_id(self) -> str:
        """``<config_key>/seed<k>`` (profiling runs: ``<config_key>/profile``)."""
        return f"{self.config_key}/{'profile' if self.evaluation == 'profile' else f'seed{self.seed}'}"

    @property
    def fingerprint(self) -> str:
        """Hash of what defines the training (base, overrides, seed, dataset; the matched run if any)."""
        parts: list = [self.base, list(self.overrides), self.seed, self.dataset]
        if self.match is not None:  # appended only when set: runs without a budget keep their fingerprint
            parts.append({"budget_match": self.match})
        doc = json.dumps(parts, sort_keys=True)
        return hashlib.sha256(doc.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        d = asdict(self) | {"overrides": list(self.overrides)}
        return d | {"run_id": self.run_id, "fingerprint": self.fingerprint}


def parse_shard(text: str | None) -> tuple[int, int]:
    """Parse ``i/n`` (0-based ``i`` < ``n``); ``None`` is ``0/1`` (everything)."""
    if text is None:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard must look like i/n (e.g. 0/4), got '{text}'") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {text}: need n >= 1 and 0 <= i < n")
    return i, n


def select_shard(specs: list[RunSpec], shard: tuple[int, int]) -> list[RunSpec]:
    """Round-robin slice of the sorted run list: deterministic, disjoint, covering over ``i``.

    Shards are taken over *distinct* run ids, so a run shared by two rows is done by one shard.
    """
    i, n = shard
    mine = set(sorted({s.run_id for s in specs})[i::n])
    out: dict[str, RunSpec] = {}
    for s in specs:
        if s.run_id in mine:
            out.setdefault(s.run_id, s)
    return list(out.values())


def base_config_name(recipe_base: str, scale: Scale) -> str:
    return scale if recipe_base == "cmafnet" else f"{recipe_base}_{scale}"
