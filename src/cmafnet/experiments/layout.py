"""Cells and tables in the paper's layout (ours mean ± std beside the paper's cell), and result grouping."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cmafnet.evaluation.paper import format_paper_cell
from cmafnet.experiments.spec import RunSpec


@dataclass
class Cell:
    values: list[float]  # one per finished seed, in the column's display unit
    planned: int
    paper: Any = None  # the paper's cell as stored (number, {mean, std} or None)
    digits: int = 2
    scientific: bool = False  # large counts (training MACs): 3 significant digits, e.g. 1.23e+12

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.values)) if self.values else None

    @property
    def std(self) -> float | None:
        return float(np.std(self.values, ddof=1)) if len(self.values) > 1 else None

    def text(self) -> str:
        if not self.values:
            return "…"
        fmt = ".3g" if self.scientific else f".{self.digits}f"
        s = f"{self.mean:{fmt}}"
        if self.std is not None:
            s += f" ± {self.std:{'.2g' if self.scientific else fmt}}"
        if len(self.values) < self.planned:
            s += f" (n={len(self.values)}/{self.planned})"
        return s


@dataclass
class Table:
    name: str
    title: str
    row_header: str
    columns: list[tuple[str, str]]  # (key, header)
    rows: list[tuple[str, dict[str, Cell]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ours_only: tuple[str, ...] = ()  # column keys the paper has no counterpart for (one column, ours)

    def markdown(self) -> str:
        head = [self.row_header]
        for key, h in self.columns:
            head += [h] if key in self.ours_only else [f"{h} (ours)", f"{h} (paper)"]
        lines = [
            f"## {self.name}: {self.title}",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
        ]
        for label, cells in self.rows:
            out = [label]
            for key, _ in self.columns:
                c = cells.get(key)
                out.append(c.text() if c else "")
                if key not in self.ours_only:
                    out.append(format_paper_cell(c.paper) if c else "")
            lines.append("| " + " | ".join(out) + " |")
        if self.notes:
            lines += ["", *[f"- {n}" for n in self.notes]]
        return "\n".join(lines) + "\n"

    def records(self) -> list[dict]:
        recs = []
        for label, cells in self.rows:
            for key, header in self.columns:
                c = cells.get(key)
                if c is None:
                    continue
                paper = c.paper.get("mean") if isinstance(c.paper, dict) else c.paper
                recs.append(
                    {
                        "row": label,
                        "column": key,
                        "header": header,
                        "ours_mean": c.mean,
                        "ours_std": c.std,
                        "n": len(c.values),
                        "planned": c.planned,
                        "paper": paper if isinstance(paper, (int, float)) else None,
                    }
                )
        return recs


def unit_scale(unit: str) -> float:
    """Factor from our fractions to the paper's unit."""
    return 100.0 if unit == "percent" else 1.0


def digits_for(unit: str) -> int:
    """Decimals printed for a unit (percent 2, fractions 3)."""
    return 2 if unit in ("percent", "millions", "epochs") else 3


def group_results(results: list[tuple[RunSpec, dict | None]]) -> dict[tuple[str, str | None], list[dict]]:
    """(row key, column) -> finished result documents (one per seed); planned counts alongside."""
    out: dict[tuple[str, str | None], list[dict]] = defaultdict(list)
    for spec, res in results:
        docs = out[(spec.row, spec.column)]  # the key exists even while no seed is finished
        if res is not None:
            docs.append(res)
    return out


def planned_counts(results: list[tuple[RunSpec, dict | None]]) -> dict[tuple[str, str | None], int]:
    """(row key, column) -> number of planned runs (seeds)."""
    cnt: dict[tuple[str, str | None], int] = defaultdict(int)
    for spec, _ in results:
        cnt[(spec.row, spec.column)] += 1
    return cnt


def get_path(doc: dict, path: str) -> Any:
    """``doc['a']['b']`` for ``'a.b'``, or None when any part is missing."""
    cur: Any = doc
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur
