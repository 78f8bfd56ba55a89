from pathlib import Path

from cmafnet.evaluation.report_tables import RunInfo, paper_comparison, seed_aggregate


def _run(name: str, model: str, seed: int, bacc: float, synthetic: bool = False) -> RunInfo:
    ev = {
        "classes": ["benign", "malignant"],
        "n": 10,
        "metrics": {"balanced_accuracy": bacc, "sensitivity": bacc},
    }
    cfg = {"model": {"name": model}, "train": {"seed": seed}}
    meta = {"dataset": "idc", "synthetic": synthetic, "model": model}
    return RunInfo(path=Path(name), name=name, meta=meta, config=cfg, evaluations={"test": ev})


def test_seeds_of_one_recipe_are_pooled_but_different_models_are_not():
    runs = [_run("a0", "cmafnet", 0, 0.9), _run("a1", "cmafnet", 1, 0.8), _run("b0", "resnet18", 0, 0.5)]
    _, data = seed_aggregate(runs)
    assert list(data) == ["cmafnet / test"]
    assert abs(data["cmafnet / test"]["balanced_accuracy"]["mean"] - 0.85) < 1e-9


def test_no_paper_comparison_for_synthetic_data():
    assert paper_comparison([_run("s", "cmafnet", 0, 0.9, synthetic=True)])[0] == []
    assert paper_comparison([_run("r", "cmafnet", 0, 0.9)])[0] != []
