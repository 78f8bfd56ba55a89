"""Zero-shot IDC -> BreakHis, raw and with each adaptation, for docs/experiments.md ("Zero-shot transfer").

    PYTHONPATH=src python scripts/zero_shot_breakhis.py --idc $CMAFNET_SAMPLE_DATA/idc/IDC_regular_ps50_idx5 \
        --breakhis $CMAFNET_SAMPLE_DATA/breakhis_100x --out zs

Trains the configs of ``cmafnet demo`` on the IDC folder (60/20/20 patient split, seed 0, as the demo
makes it): CMAF-Net (``demo``), ResNet-18 (``demo_resnet18``) and CMAF-Net with strong HED stain
augmentation (Tellez et al. 2019's HED-strong range: scale and bias in +-0.2); each run ends by
fitting its temperature and threshold on its validation patients. Then ``evaluate --zero-shot`` on
the BreakHis images, raw and with each adaptation (Macenko / Reinhard stain normalisation, TTA,
AdaBN, AdaBN on a class-balanced sample, site calibration on 4 labelled patients), with
1000 patient-level bootstrap resamples. Prints the markdown tables and writes ``summary.json``.
Finished runs and evaluations are reused, so the script can be rerun.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cmafnet.config import load_config
from cmafnet.data.ingest import ingest
from cmafnet.data.splits import save_split, split_store
from cmafnet.data.store import PatchStore
from cmafnet.evaluation.evaluate import evaluate_run
from cmafnet.inference.adapt import Adaptation
from cmafnet.inference.predict import PredictOptions
from cmafnet.run import META_FILE, read_meta
from cmafnet.training import fit

RUNS = {  # name: (config, overrides)
    "cmafnet": ("demo", []),
    "resnet18": ("demo_resnet18", []),
    "cmafnet_hed_strong": ("demo", ["data.augment.hed_sigma=0.2", "data.augment.hed_bias=0.2"]),
}
ADAPTATIONS = [
    Adaptation(),
    Adaptation(stain="macenko"),
    Adaptation(stain="reinhard"),
    Adaptation(tta="d4"),
    Adaptation(adabn="on"),
    Adaptation(adabn="balanced"),
    Adaptation(site_patients=4),
]
KEYS = ("sensitivity", "specificity", "balanced_accuracy", "auroc", "auprc")


def train(name: str, store: Path, split: Path, out: Path) -> Path:
    run_dir = out / "runs" / name
    if not (run_dir / META_FILE).exists() or read_meta(run_dir).get("status") != "finished":
        config, overrides = RUNS[name]
        cfg = load_config(config, [*overrides, "train.seed=0", "train.device=cpu"])
        fit(cfg, store, split, run_dir, resume=(run_dir / "checkpoints" / "last.pt").exists(), progress=False)
    return run_dir


def _cell(m: dict) -> str:
    v, ci = m["value"], m["ci"]
    if v is None:
        return "n/a"
    return f"{100 * v:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--idc", type=Path, required=True, help="an IDC folder (Kaggle layout)")
    ap.add_argument("--breakhis", type=Path, required=True, help="a BreakHis folder (original layout)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    idc, bh = args.out / "idc_store", args.out / "breakhis_store"
    ingest("idc", args.idc, idc, workers=None, progress=False)
    ingest("breakhis", args.breakhis, bh, workers=None, progress=False)
    split = args.out / "split.json"
    if not split.exists():
        save_split(split_store(PatchStore.open(idc), ratios=(0.6, 0.2, 0.2), seed=0), split)
    results: dict[str, dict] = {}
    for name in RUNS:
        run_dir = train(name, idc, split, args.out)
        results[name] = {}
        for adapt in ADAPTATIONS:
            doc = evaluate_run(
                run_dir,
                bh,
                zero_shot=True,
                bootstrap=args.bootstrap,
                scale_match=False,
                options=PredictOptions(device="cpu", adapt=adapt),
            )
            d = doc["diagnosis"]
            results[name][adapt.label()] = {
                "n": d["n"], "n_patients": d["n_patients"], "prevalence": d["prevalence"], "verdict": d["verdict"],
                "threshold": d["threshold"], "metrics": d["metrics"], "trivial": d["trivial"],
                "by_subtype": d["by_subtype"], "field_of_view": d["field_of_view"], "figure": d["figure"],
                "calibration": doc["calibration"]["source"],
            }  # fmt: skip
    (args.out / "summary.json").write_text(json.dumps(results, indent=2))

    print("| model | adaptation | n (patients) | " + " | ".join(KEYS) + " | verdict |")
    print("|---" * (len(KEYS) + 4) + "|")
    for name, rows in results.items():
        for label, r in rows.items():
            cells = " | ".join(_cell(r["metrics"][k]) for k in KEYS)
            print(f"| {name} | {label} | {r['n']} ({r['n_patients']}) | {cells} | {r['verdict']} |")
    any_row = next(iter(next(iter(results.values())).values()))
    for trivial, t in any_row["trivial"].items():
        print(
            f"| {trivial.replace('_', ' ')} | - | - | "
            + " | ".join(f"{100 * t[k]:.1f}" for k in KEYS)
            + " | - |"
        )
    print("\nMean p(malignant) per subtype (raw), highest first:")
    for name, rows in results.items():
        ranked = ", ".join(
            f"{s['group']} ({s['label'][0].upper()}) {s['mean']:.2f}" for s in rows["raw"]["by_subtype"]
        )
        print(f"- {name}: {ranked}")
    print("\nField of view (raw):", json.dumps(any_row["field_of_view"]))


if __name__ == "__main__":
    main()
