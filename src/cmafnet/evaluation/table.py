"""The one table type of experiments and reports: declared columns, cells, Markdown / HTML / records.

A :class:`Column` says where its value comes from (a dotted path into a result or metrics document),
its unit, and whether the paper prints it. :func:`read_cell` reads one column over the documents of a
row's runs: several runs (seeds) give ``mean ± std``, one run with a bootstrap interval gives
``93.3 [83.3, 100]``. ``cmafnet experiment`` (the paper's tables) and ``cmafnet report`` (one row per
run) both build :class:`TableResult` objects this way and render them here.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from cmafnet.evaluation.paper import format_paper_cell, paper_value
from cmafnet.evaluation.stats import mean_std

Unit = Literal["percent", "fraction", "number", "count", "sig3", "text"]
# stored value -> printed value, and the printed format: percent 2 d.p. of x100, fractions 3 d.p.,
# numbers (millions, epochs, FPS) 2 d.p., counts none, sig3 three significant digits (MACs, T, p)
UNITS: dict[str, tuple[float, str]] = {
    "percent": (100.0, ".2f"),
    "fraction": (1.0, ".3f"),
    "number": (1.0, ".2f"),
    "count": (1.0, ".0f"),
    "sig3": (1.0, ".3g"),
    "text": (1.0, ""),
}
NOT_RUN = "…"  # no finished run yet


@dataclass(frozen=True)
class Column:
    """One column, declared as data.

    ``source`` is a dotted path into the row's documents (``metrics.sensitivity``); ``{mag}`` / ``{cls}``
    are filled per row, and ``a|b`` takes the first path that has a value. ``ratio`` and ``row`` say
    whose runs the column reads when that is not the table row's own (Table 2: a training ratio;
    Table 5: one method per column). ``derive`` computes the cell from other columns' means in the same
    row: ``mean`` / ``std`` (ddof=1) over ``of``, or ``delta_first`` (minus the first row's ``of[0]``).
    """

    key: str  # our id, and the paper's column name in paper_numbers.json
    header: str
    source: str = ""
    unit: Unit = "percent"
    paper: bool = True  # the paper prints this column: its value goes beside ours
    ci: str | None = None  # dotted path of the value's bootstrap interval ({"low", "high"})
    fn: Callable[[float], float] | None = None  # applied to each value read (FPS = 1000 / latency)
    ratio: str | None = None
    row: str | None = None
    derive: Literal["mean", "std", "delta_first"] | None = None
    of: tuple[str, ...] = ()


@dataclass
class Cell:
    """Ours (values in the printed unit, one per finished run) and the paper's cell as stored."""

    values: list[float]
    unit: Unit = "fraction"
    docs: int = 0  # finished runs read (0: none yet)
    planned: int = 1
    paper: Any = None
    ci: tuple[float, float] | None = None
    text_value: str | None = None  # a text column's value
    invalid: str | None = None  # why a run's result could not be read

    @property
    def mean(self) -> float | None:
        return mean_std(self.values)[0]

    @property
    def std(self) -> float | None:
        return mean_std(self.values)[1]

    def text(self) -> str:
        if self.invalid is not None:
            return f"invalid: {self.invalid}"
        if self.text_value is not None:
            return self.text_value
        if not self.values:
            return NOT_RUN if self.docs == 0 else "n/a"
        fmt = UNITS[self.unit][1]
        if self.ci is not None and len(self.values) == 1:
            return f"{self.values[0]:.3g} [{self.ci[0]:.3g}, {self.ci[1]:.3g}]"
        s = f"{self.mean:{fmt}}"
        if self.std is not None:
            s += f" ± {self.std:{'.2g' if self.unit == 'sig3' else fmt}}"
        if len(self.values) < self.planned:
            s += f" (n={len(self.values)}/{self.planned})"
        return s


def get_path(doc: Any, path: str) -> Any:
    """``doc['a']['b']`` (or attributes of a typed document) for ``'a.b'``; None when a part is missing."""
    cur = doc
    for part in path.split("."):
        if isinstance(cur, Mapping):
            cur = cur.get(part)
        elif hasattr(type(cur), "model_fields"):  # a pydantic document
            cur = getattr(cur, part, None)
        else:
            return None
        if cur is None:
            return None
    return cur


def _number(v: Any) -> float | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else None


def read_cell(
    column: Column,
    docs: Sequence[Any],
    *,
    planned: int | None = None,
    paper: Any = None,
    fill: Mapping[str, str] | None = None,
    invalid: str | None = None,
) -> Cell:
    """The column's cell over the finished documents of one row (one per run); ``planned`` runs in all."""
    scale = UNITS[column.unit][0]
    paths = column.source.format_map(fill or {}).split("|")
    raw = [next((v for p in paths if (v := get_path(d, p)) is not None), None) for d in docs]
    cell = Cell([], column.unit, len(docs), len(docs) if planned is None else planned, paper, invalid=invalid)
    if column.unit == "text":
        cell.text_value = "n/a" if not docs or raw[0] is None else str(raw[0])
        return cell
    for v in map(_number, raw):
        if v is not None:
            cell.values.append(scale * (column.fn(v) if column.fn else v))
    if column.ci and len(docs) == 1:
        ci = get_path(docs[0], column.ci.format_map(fill or {})) or {}
        low, high = _number(ci.get("low")), _number(ci.get("high"))
        cell.ci = (scale * low, scale * high) if low is not None and high is not None else None
    return cell


def derive_cells(
    columns: Sequence[Column], cells: dict[str, Cell], first: dict[str, Cell] | None, paper: Mapping | None
) -> None:
    """Add the row's derived cells, computed from its read ones (``first``: the first row's cells, None
    in the first row itself; ``paper``: the paper's row)."""
    for col in columns:
        if col.derive is None:
            continue
        parts = [cells[k] for k in col.of]
        means = [c.mean for c in parts if c.mean is not None]
        if col.derive == "mean":
            vals = [sum(means) / len(means)] if means else []
        elif col.derive == "std":
            vals = [s] if (s := mean_std(means)[1]) is not None else []
        else:
            base = first[col.of[0]].mean if first is not None else None
            vals = [means[0] - base] if means and base is not None else []
        bad = next((c.invalid for c in parts if c.invalid), None)  # never a value from part of the runs
        cell = Cell(vals, col.unit, min(c.docs for c in parts), 1, (paper or {}).get(col.key), invalid=bad)
        if col.derive == "delta_first" and first is None:
            cell.text_value = "-"  # the reference row itself
        cells[col.key] = cell


@dataclass
class TableResult:
    """A table: labelled rows of cells under declared columns, and notes."""

    name: str
    title: str
    row_header: str
    columns: list[Column]
    rows: list[tuple[str, dict[str, Cell]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    invalid: list[str] = field(default_factory=list)  # one line per document that could not be read

    @classmethod
    def plain(
        cls, name: str, title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]
    ) -> TableResult:
        """A table of given values (first column the row label): numbers to 4 significant digits."""

        def text(v: Any) -> str:
            return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

        columns = [Column(h, h, unit="text", paper=False) for h in header[1:]]
        body = [
            (text(r[0]), {c.key: Cell([], unit="text", text_value=text(v)) for c, v in zip(columns, r[1:])})
            for r in rows
        ]
        return cls(name, title, header[0], columns, body)

    def header(self) -> list[str]:
        head = [self.row_header]
        for c in self.columns:
            head += [f"{c.header} (ours)", f"{c.header} (paper)"] if c.paper else [c.header]
        return head

    def lines(self) -> list[list[str]]:
        """Every row as printed: its label, then ours (and the paper's) per column."""
        out = []
        for label, cells in self.rows:
            line = [label]
            for c in self.columns:
                cell = cells.get(c.key)
                line.append(cell.text() if cell else "")
                if c.paper:
                    line.append(format_paper_cell(cell.paper) if cell else "")
            out.append(line)
        return out

    def markdown(self, level: int = 2) -> str:
        def row(cells: list[str]) -> str:
            return "| " + " | ".join(x.replace("|", "\\|") for x in cells) + " |"

        head = self.header()
        lines = [f"{'#' * level} {self.title}", "", row(head), "|" + "---|" * len(head)]
        lines += [row(x) for x in self.lines()]
        notes = [*self.notes, *(f"invalid: {x}" for x in self.invalid)]
        if notes:
            lines += ["", *[f"- {n}" for n in notes]]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        def row(tag: str, cells: list[str]) -> str:
            return "<tr>" + "".join(f"<{tag}>{html.escape(x)}</{tag}>" for x in cells) + "</tr>"

        body = "".join(row("td", x) for x in self.lines())
        notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in self.notes)
        return (
            f"<h3>{html.escape(self.title)}</h3><table><thead>{row('th', self.header())}</thead>"
            f"<tbody>{body}</tbody></table>{notes}"
        )

    def records(self) -> list[dict[str, Any]]:
        """One record per cell: ours (mean, std, n of planned, CI or text), the paper's mean, or why invalid."""
        recs = []
        for label, cells in self.rows:
            for c in self.columns:
                cell = cells.get(c.key)
                if cell is None:
                    continue
                recs.append({
                    "row": label, "column": c.key, "header": c.header, "ours_mean": cell.mean,
                    "ours_std": cell.std, "n": len(cell.values), "planned": cell.planned,
                    "paper": paper_value(cell.paper), "ci_low": cell.ci[0] if cell.ci else None,
                    "ci_high": cell.ci[1] if cell.ci else None, "text": cell.text_value, "invalid": cell.invalid,
                })  # fmt: skip
        return recs
