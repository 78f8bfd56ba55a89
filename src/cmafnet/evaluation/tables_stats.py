"""Report tables of uncertainty and tests: bootstrap CIs of every row, McNemar at operating thresholds."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np

from cmafnet.errors import RunFolderError
from cmafnet.evaluation.metrics import FRACTION_METRICS, format_metric
from cmafnet.evaluation.report_tables import RunInfo, Table, ev_label
from cmafnet.evaluation.rows import MIN_CI_PATIENTS, short_rule, threshold_rule
from cmafnet.evaluation.stats import mcnemar


def ci_tables(runs: Sequence[RunInfo]) -> list[Table]:
    """Bootstrap confidence intervals written by ``cmafnet evaluate``: every row, with its threshold."""
    rows = []
    warned = False
    for run in runs:
        for name, ev in run.evaluations.items():
            binary = len(ev.get("classes") or []) == 2
            op = ev.get("operating_point")
            blocks = [
                (short_rule(op, binary), (op or {}).get("ci")),
                (short_rule(None, binary), ev.get("ci")),
            ]
            for mag, e in (ev.get("by_magnification") or {}).items():
                blocks.append((f"{short_rule(op, binary)}, {mag}", e.get("operating_ci")))
                blocks.append((f"{short_rule(None, binary)}, {mag}", e.get("ci")))
            for rule, cis in blocks:
                for metric, ci in (cis or {}).items():
                    pct = metric not in FRACTION_METRICS
                    f = lambda v, pct=pct: format_metric(v, 2 if pct else 3, percent=pct)  # noqa: E731
                    caveat = f"⚠ {ci['n_patients']} patients" if ci.get("warning") else ""
                    warned |= bool(caveat)
                    rows.append([run.name, ev_label(name, ev), rule, metric, f(ci.get("point")), f(ci.get("low")),
                                 f(ci.get("high")), ci.get("by"), f"{ci.get('n_valid')}/{ci.get('n_boot')}", caveat])  # fmt: skip
    if not rows:
        return []
    cols = ["run", "evaluation", "threshold", "metric", "point", "low", "high", "resampled by", "valid resamples",
            "warning"]  # fmt: skip
    note = "Percentile intervals; patients resampled with all their images."
    if warned:
        note += (
            f" ⚠ marks intervals from fewer than {MIN_CI_PATIENTS} patients: too few independent clusters for "
            "the interval to be trusted."
        )
    return [Table("Bootstrap 95% confidence intervals (percentile)", cols, rows, note)]


def mcnemar_tests(
    runs: Sequence[RunInfo], pairs: Sequence[tuple[str, str]] | None = None
) -> tuple[list[Table], list[dict]]:
    """Exact McNemar between every pair of runs evaluated on the same images (same ids, same labels).

    Predictions at 0.5 (binary) / argmax (multi-class), so every run is compared at the same rule.
    """
    from cmafnet.evaluation.evaluate import load_predictions

    by_name = {r.path.name: r for r in runs} | {r.name: r for r in runs}  # display or folder name
    if pairs:
        for a, b in pairs:
            for n in (a, b):
                if n not in by_name:
                    raise RunFolderError(
                        f"--compare: '{n}' is not one of the report's runs {sorted(by_name)}"
                    )
        todo = [(by_name[a], by_name[b]) for a, b in pairs]
    else:
        todo = list(itertools.combinations(runs, 2))
    rows, data = [], []
    for ra, rb in todo:
        for ev in sorted(set(ra.predictions) & set(rb.predictions)):
            da, ca = load_predictions(ra.predictions[ev])
            db, cb = load_predictions(rb.predictions[ev])
            key = "id" if "id" in da.columns and da["id"].notna().all() else "row"
            if ca != cb or len(da) != len(db) or set(da[key]) != set(db[key]):
                continue  # not the same test set
            merged = da.merge(db, on=key, suffixes=("_a", "_b"))
            if not (merged["label_a"] == merged["label_b"]).all():
                continue
            y = merged["label_a"].to_numpy()
            op_a, op_b = _operating(ra, ev, ca), _operating(rb, ev, cb)
            pa = _decide(merged, ca, "_a", (op_a or {}).get("value", 0.5))
            pb = _decide(merged, cb, "_b", (op_b or {}).get("value", 0.5))
            r = mcnemar(y, pa, pb)
            r["rule_a"], r["rule_b"] = threshold_rule(op_a, len(ca) == 2), threshold_rule(op_b, len(cb) == 2)
            rows.append(
                [
                    ra.name,
                    rb.name,
                    ev,
                    short_rule(op_a, len(ca) == 2),
                    short_rule(op_b, len(cb) == 2),
                    r["n"],
                    format_metric(r["acc_a"]),
                    format_metric(r["acc_b"]),
                    r["b"],
                    r["c"],
                    f"{r['pvalue']:.3g}",
                ]
            )
            data.append({"run_a": ra.name, "run_b": rb.name, "evaluation": ev, **r})
    if not rows:
        return [], []
    note = (
        "Each run's decisions at its own operating threshold (chosen on its validation split for the target "
        "sensitivity; 0.5 when it has none, argmax for multi-class), so each model is judged where it would be "
        "used. b = A right & B wrong, c = A wrong & B right; two-sided exact binomial test on b of b + c "
        "(scipy binomtest)."
    )
    return [
        Table(
            "Exact McNemar tests (paired predictions, at each run's operating threshold)",
            [
                "run A",
                "run B",
                "evaluation",
                "threshold A",
                "threshold B",
                "n",
                "acc A (%)",
                "acc B (%)",
                "b",
                "c",
                "p-value",
            ],
            rows,
            note,
        )
    ], data


def _operating(run: RunInfo, ev: str, classes: list[str]) -> dict | None:
    """The operating point of ``run``'s evaluation ``ev`` (binary only)."""
    if len(classes) != 2:
        return None
    return (run.evaluations.get(ev) or {}).get("operating_point")


def _decide(df: Any, classes: list[str], suffix: str, threshold: float = 0.5) -> np.ndarray:
    probs = np.stack([df[f"prob_{c}{suffix}"].to_numpy(dtype=float) for c in classes], axis=1)
    if len(classes) == 2:
        return (probs[:, 1] >= threshold).astype(int)
    return probs.argmax(1)
