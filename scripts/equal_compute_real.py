"""CMAF-Net against a ResNet-18 at equal epochs and at CMAF-Net's training compute, on a real IDC folder.

Used for docs/experiments.md ("Equal epochs or equal compute: what we measured"):

    PYTHONPATH=src python scripts/equal_compute_real.py \
        --data $CMAFNET_SAMPLE_DATA/idc/IDC_regular_ps50_idx5 --recipe demo --seeds 0 1 --out /tmp/eqc_demo

Recipes: ``demo`` trains the configs of ``cmafnet demo`` (``demo``: CMAF-Net, 2+1+2 epochs;
``demo_resnet18``), so seed 0 is what ``cmafnet demo --data <folder>`` trains; ``e2e`` trains the
``smoke`` config with the overrides of tests/test_end_to_end_real.py (16 steps per epoch, 1+1+1 epochs)
and ``baseline_smoke`` (ResNet-18) likewise. The patient split is made once (60/20/20, seed 0, as the
demo and the end-to-end test make it), so seeds change the training only. Per seed: CMAF-Net, then the
ResNet-18 at CMAF-Net's recorded training MACs (``train.budget.match``), then at CMAF-Net's epochs;
each evaluated on the held-out test patients. Prints one markdown row per run and the mean over seeds,
and writes ``summary.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cmafnet.config import BudgetConfig, load_config
from cmafnet.data.ingest import ingest
from cmafnet.data.splits import save_split, split_store
from cmafnet.data.store import PatchStore
from cmafnet.evaluation.evaluate import evaluate_run
from cmafnet.inference.predict import PredictOptions
from cmafnet.run import read_meta
from cmafnet.training import fit

RECIPES = {
    # name: (CMAF-Net config, baseline config, overrides of both)
    "demo": ("demo", "demo_resnet18", []),
    "e2e": ("smoke", "baseline_smoke", ["train.max_steps_per_epoch=16", "eval.bootstrap=0"]),
}
MODELS = ("cmafnet", "resnet18_equal_compute", "resnet18_equal_epochs")
KEYS = ("balanced_accuracy", "op_balanced_accuracy", "auroc", "auprc", "ece_raw", "ece", "train_macs", "steps",
        "seconds")  # fmt: skip


def train_seed(recipe: str, seed: int, store: Path, split: Path, out: Path) -> dict[str, dict]:
    """The three runs of one seed (CMAF-Net first: the matched baseline spends what it recorded)."""
    cmaf_name, base_name, extra = RECIPES[recipe]
    overrides = [*extra, f"train.seed={seed}", "train.device=cpu"]
    cmaf = load_config(cmaf_name, overrides)
    equal_epochs = sum(s.epochs for s in cmaf.train.stages)
    base = load_config(base_name, [*overrides, f"train.stages.0.epochs={equal_epochs}"])
    matched = base.model_copy(deep=True)
    runs = {name: out / f"seed{seed}" / name for name in MODELS}
    matched.train.budget = BudgetConfig(match=str(runs["cmafnet"]))
    res = {}
    for name, cfg in zip(MODELS, (cmaf, matched, base), strict=True):
        run_dir = runs[name]
        if not (run_dir / "run.json").exists() or read_meta(run_dir).get("status") != "finished":
            fit(
                cfg,
                store,
                split,
                run_dir,
                resume=(run_dir / "checkpoints" / "last.pt").exists(),
                progress=False,
            )
        doc = evaluate_run(
            run_dir, store, split_path=split, split="test", bootstrap=0, options=PredictOptions(device="cpu")
        )
        total = read_meta(run_dir)["cost"]["total"]
        m, op = doc["metrics"], (doc.get("operating_point") or {}).get("metrics", {})
        # metrics are on temperature-calibrated probabilities (argmax and ranking unchanged): ECE both ways
        res[name] = {
            "balanced_accuracy": m["balanced_accuracy"], "op_balanced_accuracy": op.get("balanced_accuracy"),
            "auroc": m["auroc"], "auprc": m["auprc"], "ece_raw": (doc.get("calibration") or {}).get("ece_before"),
            "ece": m["ece"], "train_macs": total["macs"], "steps": total["steps"], "seconds": total["seconds"],
        }  # fmt: skip
    return res


def _fmt(key: str, v: float | None) -> str:
    if v is None:
        return "n/a"
    if key in ("balanced_accuracy", "op_balanced_accuracy"):
        return f"{100 * v:.1f}"
    if key == "train_macs":
        return f"{v:.3g}"
    if key in ("steps", "seconds"):
        return f"{v:.0f}"
    return f"{v:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="an IDC folder (Kaggle layout)")
    ap.add_argument("--recipe", choices=sorted(RECIPES), default="demo")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    store = args.out / "store"
    ingest("idc", args.data, store, workers=None, progress=False)
    split = args.out / "split.json"
    if not split.exists():
        save_split(split_store(PatchStore.open(store), ratios=(0.6, 0.2, 0.2), seed=0), split)
    results = {seed: train_seed(args.recipe, seed, store, split, args.out) for seed in args.seeds}
    (args.out / "summary.json").write_text(json.dumps({"recipe": args.recipe, "results": results}, indent=2))
    print("| seed | model | bacc@0.5 (%) | bacc@op (%) | AUROC | AUPRC | ECE raw | ECE cal. | training MACs | steps "
          "| s |")  # fmt: skip
    print("|---" * 11 + "|")
    for seed, res in results.items():
        for name, r in res.items():
            print(f"| {seed} | {name} | " + " | ".join(_fmt(k, r[k]) for k in KEYS) + " |")
    for name in MODELS:
        vals = {k: [r[name][k] for r in results.values() if r[name][k] is not None] for k in KEYS}
        mean = {k: float(np.mean(v)) if v else None for k, v in vals.items()}
        print(f"| mean | {name} | " + " | ".join(_fmt(k, mean[k]) for k in KEYS) + " |")


if __name__ == "__main__":
    main()
