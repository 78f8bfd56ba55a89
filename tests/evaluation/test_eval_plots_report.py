"""Figures render headless; the report is self-contained; McNemar between runs is found."""

import base64
import json
import re

import matplotlib
import numpy as np
import pytest

from cmafnet.errors import RunFolderError
from cmafnet.evaluation import plots
from cmafnet.evaluation.paper import TABLES, paper_table
from cmafnet.evaluation.report import write_report

PNG = b"\x89PNG\r\n\x1a\n"


def test_backend_is_agg():
    assert matplotlib.get_backend().lower() == "agg"


def test_each_plot_renders_png():
    import pandas as pd

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    s = rng.random(50)
    hist = pd.DataFrame({"epoch": range(4), "train_loss": [1, 0.8, 0.6, 0.5], "val_auprc": [0.5, 0.6, 0.7, 0.7],
                         "lr": [1e-3, 5e-4, 2e-4, 1e-4], "stage_name": ["a", "a", "b", "b"], "attn_entropy_h0": [3, 2.9, 2.8, 2.8], "tau_h0": [1, 1, 1, 1.01]})  # fmt: skip
    figs = [
        plots.plot_curves({"a": (y, s), "one-class": (np.zeros(5), s[:5])}, "roc"),
        plots.plot_curves({"a": (y, s)}, "pr"),
        plots.plot_confusion([("all", [[5, 1], [2, 7]])], ["benign", "malignant"]),
        plots.plot_confusion([("subtypes", np.eye(8) * 3)], list("ABCDEFGH"), normalize=True),
        plots.plot_confusion([("all", [[5, 1], [2, 7]]), ("40X", [[0, 0], [0, 0]])], ["b", "m"]),
        plots.plot_training_curves(hist),
        plots.plot_attention_heads(hist),
    ]
    for fig in figs:
        png = plots.figure_png(fig)
        assert png.startswith(PNG) and len(png) > 1000


def test_plots_tolerate_missing_columns():
    import pandas as pd

    df = pd.DataFrame({"epoch": [0, 1], "something": [1, 2]})
    assert plots.plot_attention_heads(df) is None
    assert plots.plot_training_curves(pd.DataFrame()) is None


def test_report_is_self_contained(evaluated_run_factory, tmp_path, monkeypatch):
    a = evaluated_run_factory("run_a", seed=0)
    b = evaluated_run_factory("run_b", seed=1, quality=0.2)
    m = evaluated_run_factory("run_8class", seed=2, classes=("A", "F", "PT", "TA", "DC", "LC", "MC", "PC"))
    drawn = []  # the curves of every ROC / precision-recall figure

    def record(curves, kind, title=""):
        drawn.append((kind, sorted(curves)))
        return real(curves, kind, title)

    real = plots.plot_curves
    monkeypatch.setattr(plots, "plot_curves", record)
    out = write_report([a, b, m], tmp_path / "rep", title="t")
    text = out.read_text()
    # No external resource: no http(s) URL anywhere in src/href/url(), every <img> is a data: URI.
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, re.I)
    assert not re.search(r"url\(\s*['\"]?https?://", text, re.I)
    assert "<link" not in text and "<script" not in text
    imgs = re.findall(r"<img[^>]*>", text)
    assert len(imgs) >= 8
    assert all(re.search(r"src='data:image/png;base64,[A-Za-z0-9+/=]+'", i) for i in imgs)
    assert "http://" not in text and "https://" not in text
    for b64 in re.findall(r"base64,([A-Za-z0-9+/=]+)", text):  # every figure decodes to a PNG
        assert base64.b64decode(b64).startswith(PNG)
    for name in ("run_a", "run_b", "run_8class", "Exact McNemar", "recall (%) per class"):
        assert name in text
    rep = json.loads(
        (tmp_path / "rep" / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON")
    )
    # It leads with one ROC and one precision-recall figure, each with every binary run's curve.
    assert drawn == [("roc", ["run_a", "run_b"]), ("pr", ["run_a", "run_b"])]
    captions = [f["caption"] for f in rep["figures"]]
    assert captions[:2] == ["ROC curves on 'test': every run", "Precision-recall curves on 'test': every run"]
    assert sum("ROC" in c or "recision-recall" in c for c in captions) == 2
    assert text.index("ROC curves") < text.index("every run at its operating threshold")
    pairs = {(r["run_a"], r["run_b"]) for r in rep["mcnemar"]}
    assert pairs == {("run_a", "run_b")}  # the 8-class run has other classes: not paired
    # one row per run (not per run x threshold x metric): the operating point, 0.5 and argmax tables
    rows = {name: {c["row"] for c in t["cells"]} for name, t in rep["tables"].items()}
    assert rows["operating"] == rows["threshold_0.5"] == {"run_a", "run_b"} and rows["multiclass"] == {
        "run_8class"
    }
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| run |" in md and all((tmp_path / "rep" / f["file"]).exists() for f in rep["figures"])
    assert "nan" not in md.lower().replace("nans", "")


def test_report_compare_unknown_run_is_clear(evaluated_run_factory, tmp_path):
    a = evaluated_run_factory("run_a")
    with pytest.raises(RunFolderError, match="not one of the report's runs"):
        write_report([a], tmp_path / "rep", compare=[("run_a", "nope")])
    with pytest.raises(RunFolderError, match="not a run folder"):
        write_report([tmp_path], tmp_path / "rep2")


def test_paper_tables_complete():
    rows = {t: len(paper_table(t)["rows"]) for t in TABLES}
    assert rows == {
        "table1": 15,
        "table2": 7,
        "table3": 5,
        "table4": 20,
        "table5": 8,
        "table6": 19,
        "table7": 7,
        "table8": 5,
    }
    t1 = paper_table(1)
    cmaf = next(r for r in t1["rows"] if r["method"].startswith("CMAF"))
    assert cmaf["sensitivity"] == {"mean": 94.92, "std": 0.8} and cmaf["auprc"]["mean"] == 0.943
    assert paper_table("table5")["rows"][4] == {"subtype": "DC", "subtype_name": "Ductal Carcinoma", "samples": 864,
                                              "ResNet-50": 82.18, "TransFuse": 87.15, "CMAF-Net": 91.2}  # fmt: skip
