"""Every number names its threshold; CIs for every row carry a small-cohort warning; McNemar at operating points."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd

from cmafnet.cli.evaluate import summary_lines
from cmafnet.evaluation.evaluate import write_predictions
from cmafnet.evaluation.metrics import classification_metrics
from cmafnet.evaluation.report import write_report
from cmafnet.evaluation.report_tables import collect_run, comparison_tables
from cmafnet.evaluation.rows import MIN_CI_PATIENTS, ci_warning, metric_rows, threshold_rule
from cmafnet.evaluation.stats import mcnemar
from cmafnet.evaluation.tables_stats import mcnemar_tests
from cmafnet.run import write_json, write_meta

OP = {"value": 0.3, "target_sensitivity": 0.95, "chosen_on": "val", "n_val": 40, "temperature": 1.7}


def test_rule_names_threshold_and_how_it_was_chosen():
    assert threshold_rule(None) == "threshold 0.5 (default, not tuned)"
    assert threshold_rule(None, binary=False) == "argmax (multi-class)"
    assert threshold_rule(OP) == (
        "operating threshold 0.3000 (highest with validation sensitivity >= 0.95; chosen on val (n=40); "
        "calibrated probabilities, T=1.7)"
    )
    assert ci_warning(MIN_CI_PATIENTS) is None and "only 2 patient(s)" in ci_warning(2)


def test_every_row_has_patient_cis_with_a_warning_below_ten_patients():
    rng = np.random.default_rng(0)
    n = 120
    y = np.arange(n) % 2
    p1 = np.clip(0.5 * y + 0.5 * rng.random(n), 0, 1)
    probs = np.stack([1 - p1, p1], 1)
    patients = np.array([f"p{i % 4}" for i in range(n)])
    mags = {"40X": np.arange(0, n, 2), "100X": np.arange(1, n, 2)}
    doc = metric_rows(y, probs, ["a", "b"], op=OP, patients=patients, groups=mags, n_boot=30)
    assert doc["metrics_rule"].startswith("threshold 0.5") and doc["operating_point"][
        "rule"
    ] == threshold_rule(OP)
    cis = [doc["ci"], doc["operating_point"]["ci"]]
    cis += [e[k] for e in doc["by_magnification"].values() for k in ("ci", "operating_ci")]
    for block in cis:
        for ci in block.values():
            assert (
                ci["by"] == "patient" and ci["n_patients"] in (2, 4) and ci["warning"].startswith("WARNING")
            )
    # The operating row's CI is computed at the operating threshold, not at 0.5.
    assert (
        doc["operating_point"]["ci"]["specificity"]["point"]
        == classification_metrics(y, probs, 0.3)["specificity"]
    )
    assert doc["operating_point"]["ci"]["specificity"]["point"] < doc["ci"]["specificity"]["point"]
    # Console: the operating row first, every row naming its threshold, and the warning printed.
    text = summary_lines(
        {**doc, "name": "test", "n": n, "classes": ["a", "b"], "paths": {"predictions": "p", "metrics": "m"}}
    )
    lines = text.splitlines()
    assert "threshold op 0.3000 (val sens>=0.95)" in lines[1] and threshold_rule(OP) in lines[2]
    assert "threshold 0.5" in lines[3] and "WARNING: only 4 patient(s)" in text


def _run(path, y, p1, op_value, patients):
    path.mkdir()
    write_meta(path, {"classes": ["a", "b"], "model": path.name})
    (path / "config.yaml").write_text("model:\n  name: cmafnet\n")
    probs = np.stack([1 - p1, p1], 1)
    idx = pd.DataFrame({"id": [f"i{k}" for k in range(len(y))], "patient": patients})
    write_predictions(
        path / "predictions_test.csv", idx, np.arange(len(y)), y, probs, ["a", "b"], threshold=op_value
    )
    op = {**OP, "value": op_value}
    doc = {"name": "test", "n": len(y), "classes": ["a", "b"],
           **metric_rows(y, probs, ["a", "b"], op=op, patients=patients, groups={}, n_boot=20)}  # fmt: skip
    write_json(path / "metrics_test.json", doc)
    return path


def test_mcnemar_uses_each_runs_operating_threshold_and_says_so(tmp_path):
    y = np.array([1] * 10 + [0] * 30)
    patients = np.array([f"p{k % 3}" for k in range(40)])
    # At 0.5 both runs call everything negative (b = c = 0, p = 1); at their operating thresholds they differ.
    pa = np.r_[np.full(10, 0.40), np.full(30, 0.10)]  # A at 0.35: all right
    pb = np.r_[np.full(10, 0.20), np.full(25, 0.10), np.full(5, 0.30)]  # B at 0.25: misses 10, 5 false +
    ra = _run(tmp_path / "A", y, pa, 0.35, patients)
    rb = _run(tmp_path / "B", y, pb, 0.25, patients)
    tables, data = mcnemar_tests([collect_run(ra), collect_run(rb)])
    (r,) = data
    expected = mcnemar(y, (pa >= 0.35).astype(int), (pb >= 0.25).astype(int))
    assert (
        (r["b"], r["c"], r["pvalue"])
        == (expected["b"], expected["c"], expected["pvalue"])
        == (15, 0, r["pvalue"])
    )
    assert r["pvalue"] < 0.001 and mcnemar(y, (pa >= 0.5) * 1, (pb >= 0.5) * 1)["pvalue"] == 1.0
    assert "operating threshold 0.3500" in r["rule_a"] and "operating threshold 0.2500" in r["rule_b"]
    (_, cells), *_ = tables[0].rows
    assert (
        "operating threshold" in tables[0].title
        and cells["threshold A"].text() == "op 0.3500 (val sens>=0.95)"
    )
    # One row per run and threshold rule; every metric cell is "point [low, high]" from the document's own
    # interval, and the patient count carries the small-cohort warning (3 patients).
    op_table, at_05 = comparison_tables([collect_run(ra)])
    doc = json.loads((ra / "metrics_test.json").read_text())
    for table, block in ((op_table, doc["operating_point"]["ci"]), (at_05, doc["ci"])):
        ((_, cells),) = table.rows
        ci = block["sensitivity"]
        pct = [f"{100 * ci[k]:.3g}" for k in ("point", "low", "high")]
        assert cells["sensitivity"].text() == f"{pct[0]} [{pct[1]}, {pct[2]}]"
        assert re.fullmatch(r"-?[0-9.]+ \[-?[0-9.]+, -?[0-9.]+\]", cells["mcc"].text())
        assert any("fewer than 10" in n for n in table.notes)
    assert op_table.rows[0][1]["threshold"].text() == "0.3500" and "threshold" not in at_05.rows[0][1]
    assert at_05.rows[0][1]["n"].text() == "40 (3 ⚠)"  # images (patients, too few for the interval)
    assert f"A: the {threshold_rule({**OP, 'value': 0.35})}" in op_table.notes  # the rule, in a note
    # Markdown and HTML carry the same threshold column.
    html = write_report([ra, rb], tmp_path / "rep").read_text()
    md = (tmp_path / "rep" / "report.md").read_text()
    for text in (html, md):
        assert "op 0.3500 (val sens&gt;=0.95)" in text or "op 0.3500 (val sens>=0.95)" in text
        assert "40 (3 ⚠)" in text and "at each run&#x27;s operating threshold" in text.replace("'", "&#x27;")
    tables = json.loads((tmp_path / "rep" / "report.json").read_text())["tables"]
    assert list(tables)[:2] == ["operating", "threshold_0.5"]  # the operating point first
