"""The paper's reported numbers (Tables 1-8), for display beside ours only.

The data file ``paper_numbers.json`` holds each table as printed (percent or fraction per column,
see ``units``); a cell is a number, ``{"mean", "std"}`` or ``None`` ("-" in the paper).
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from importlib import resources
from typing import Any

from cmafnet.errors import ConfigError

TABLES = tuple(f"table{i}" for i in range(1, 9))


@lru_cache(maxsize=1)
def _load() -> dict:
    text = resources.files("cmafnet.evaluation").joinpath("paper_numbers.json").read_text(encoding="utf-8")
    return json.loads(text)["tables"]


def paper_table(name: str | int) -> dict[str, Any]:
    """One table: ``caption``, ``header``, ``columns``, ``units``, ``rows`` (list of dicts).

    Args:
        name: ``"table1"`` ... ``"table8"``, ``"1"`` or ``1``.
    """
    key = f"table{name}" if str(name).isdigit() else str(name).lower()
    tables = _load()
    if key not in tables:
        raise ConfigError(f"unknown paper table '{name}'; known: {', '.join(TABLES)}")
    return tables[key]


def paper_value(cell: Any) -> float | None:
    """A cell's number (its mean) as printed, in the table's ``units``; None for "-"."""
    if isinstance(cell, dict):
        cell = cell.get("mean")
    ok = isinstance(cell, (int, float)) and not isinstance(cell, bool) and math.isfinite(cell)
    return float(cell) if ok else None


def format_paper_cell(cell: Any) -> str:
    """A cell as printed in the paper: ``"94.92 ± 0.8"``, ``"0.943"``, or ``"-"``."""
    if isinstance(cell, dict):
        return f"{cell['mean']:g} ± {cell['std']:g}"
    if cell is None:
        return "-"
    return f"{cell:g}" if isinstance(cell, float) else str(cell)


def find_row(table: str | int, **match: str) -> dict | None:
    """First row whose fields equal ``match`` (case-insensitive), e.g. ``find_row(1, method="DeiT-S")``."""
    for row in paper_table(table)["rows"]:
        if all(str(row.get(k, "")).lower() == str(v).lower() for k, v in match.items()):
            return row
    return None
