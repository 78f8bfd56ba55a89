"""The report's paired test: exact McNemar between runs evaluated on the same images, each at its
operating threshold."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from cmafnet.errors import RunFolderError
from cmafnet.evaluation.report_tables import RunInfo, runs_table
from cmafnet.evaluation.rows import short_rule, threshold_rule
from cmafnet.evaluation.stats import mcnemar
from cmafnet.evaluation.table import Column, TableResult

COLUMNS = (
    *(Column(k, k, k, "text", paper=False) for k in ("evaluation", "threshold A", "threshold B")),
    Column("n", "n", "n", "count", paper=False),
    Column("acc_a", "acc A (%)", "acc_a", paper=False),
    Column("acc_b", "acc B (%)", "acc_b", paper=False),
    Column("b", "b", "b", "count", paper=False),
    Column("c", "c", "c", "count", paper=False),
    Column("pvalue", "p-value", "pvalue", "sig3", paper=False),
)
NOTE = (
    "Each run's decisions at its own operating threshold (chosen on its validation split for the target "
    "sensitivity; 0.5 when it has none, argmax for multi-class), so each model is judged where it would be "
    "used. b = A right & B wrong, c = A wrong & B right; two-sided exact binomial test on b of b + c "
    "(scipy binomtest)."
)


def _pairs(runs: Sequence[RunInfo], pairs: Sequence[tuple[str, str]] | None) -> list[tuple[RunInfo, RunInfo]]:
    if not pairs:
        return list(itertools.combinations(runs, 2))
    by_name = {r.path.name: r for r in runs} | {r.name: r for r in runs}  # display or folder name
    for n in (n for pair in pairs for n in pair):
        if n not in by_name:
            raise RunFolderError(f"--compare: '{n}' is not one of the report's runs {sorted(by_name)}")
    return [(by_name[a], by_name[b]) for a, b in pairs]


def mcnemar_tests(
    runs: Sequence[RunInfo], pairs: Sequence[tuple[str, str]] | None = None
) -> tuple[list[TableResult], list[dict]]:
    """Exact McNemar between every pair of runs evaluated on the same images (same ids, same labels)."""
    items, data = [], []
    for ra, rb in _pairs(runs, pairs):
        for ev in sorted(set(ra.predictions) & set(rb.predictions)):
            (da, ca), (db, cb) = ra.predictions[ev], rb.predictions[ev]
            key = "id" if "id" in da.columns and da["id"].notna().all() else "row"
            if ca != cb or len(da) != len(db) or set(da[key]) != set(db[key]):
                continue  # not the same test set
            merged = da.merge(db, on=key, suffixes=("_a", "_b"))
            if not (merged["label_a"] == merged["label_b"]).all():
                continue
            binary = len(ca) == 2
            op_a, op_b = (
                r.evaluations.get(ev, {}).get("operating_point") if binary else None for r in (ra, rb)
            )
            pa = _decide(merged, ca, "_a", (op_a or {}).get("value", 0.5))
            pb = _decide(merged, cb, "_b", (op_b or {}).get("value", 0.5))
            r = mcnemar(merged["label_a"].to_numpy(), pa, pb)
            r["rule_a"], r["rule_b"] = threshold_rule(op_a, binary), threshold_rule(op_b, binary)
            items.append((f"{ra.name} vs {rb.name}", {**r, "evaluation": ev, "threshold A": short_rule(op_a, binary),
                                                        "threshold B": short_rule(op_b, binary)}))  # fmt: skip
            data.append({"run_a": ra.name, "run_b": rb.name, "evaluation": ev, **r})
    if not items:
        return [], []
    title = "Exact McNemar tests (paired predictions, at each run's operating threshold)"
    return [runs_table("mcnemar", title, COLUMNS, items, [NOTE])], data


def _decide(df: Any, classes: list[str], suffix: str, threshold: float = 0.5) -> np.ndarray:
    probs = np.stack([df[f"prob_{c}{suffix}"].to_numpy(dtype=float) for c in classes], axis=1)
    if len(classes) == 2:
        return (probs[:, 1] >= threshold).astype(int)
    return probs.argmax(1)
