"""Trainer speed where users run it: ``cmafnet train`` itself, a few steps of every stage, beside the naive
reference measured in the same process tree, and the paper protocol projected from what was measured.

``python -m cmafnet.bench.acceptance --out DIR`` (``scripts/gpu_check.sh`` runs it on a GPU):

1. generates an IDC-like store (50 px patches, trained at the config's 224 px as IDC is) and a split;
2. times the naive reference's training step with ``cmafnet bench --models naive``;
3. trains each variant with ``cmafnet train`` (its own subprocess and time limit): the config's stages,
   each ``--epochs`` epochs of ``--steps`` optimiser steps; the last epoch of a stage is its steady
   state (the first one pays for warm-up, autotuning, compilation and graph capture);
4. writes ``trainer_speed.json``: per variant and stage the trainer's img/s and ms/step (validation
   excluded, the data path included), the ratios to the naive reference, the targets, and the paper
   protocol per seed (IDC: 194,267 training and 27,752 validation images; 30/40/30 epochs) projected
   from the fastest variant of each stage.

A variant stopped by its time limit keeps the epochs it finished (``metrics.csv`` is written per epoch).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from cmafnet.bench.targets import check_targets
from cmafnet.data.datasets import IDC
from cmafnet.run import META_FILE, read_meta

# 70 % / 10 % of IDC's 277,524 patches (patient split): 194,267 / 27,752
IDC_TRAIN, IDC_VAL = (round(f * IDC.PUBLISHED["images"]) for f in (0.7, 0.1))

# name -> config overrides; the stage-3-only variants skip stages 1-2 (epochs 0)
VARIANTS: dict[str, list[str]] = {
    "graph": ["train.amp=bf16", "train.cuda_graph=true"],
    "compile_graph_stage3": [
        "train.amp=bf16", "train.cuda_graph=true", "train.compile=true", "train.stages.0.epochs=0",
        "train.stages.1.epochs=0",
    ],
    "compile_graph_stage3_nosam": [
        "train.amp=bf16", "train.cuda_graph=true", "train.compile=true", "train.stages.0.epochs=0",
        "train.stages.1.epochs=0", "train.sam.enabled=false",
    ],
    "eager": [],
}  # fmt: skip

# (name, description, what it is computed from, op, threshold): one H100/H200, 224 px
TARGETS = (
    ("stage3_vs_naive_nosam", "trainer stage-3 step, SAM off / naive reference step", ">=", 1.4),
    ("stage3_vs_naive_sam", "trainer stage-3 step, SAM on / naive reference step", ">=", 0.75),
    ("stage2_vs_naive", "trainer stage-2 step (frozen extractors) / naive reference step", ">=", 4.0),
    (
        "paper_hours_per_seed",
        "paper protocol per seed, projected from measured stage throughput, h",
        "<=",
        2.5,
    ),
)


def _cmafnet(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from cmafnet.cli import main; sys.exit(main())", *args]


def make_data(out: Path, *, patients: int, patches: int, seed: int = 0) -> tuple[Path, Path]:
    """A generated IDC-like store (``patients`` x ``patches``, 28 % positive) and its patient split."""
    from cmafnet.data.ingest import ingest
    from cmafnet.data.splits import save_split, split_store
    from cmafnet.data.store import PatchStore
    from cmafnet.data.synthetic import write_idc_like

    raw, store, split = out / "raw", out / "store", out / "split.json"
    if not store.exists():
        write_idc_like(raw, n_patients=patients, patches_per_patient=patches, minority_frac=0.284, seed=seed)
        ingest("idc", raw, store, workers=None, progress=False)
    if not split.exists():
        save_split(split_store(PatchStore.open(store), ratios=(0.7, 0.1, 0.2), seed=seed), split)
    return store, split


def run_variant(
    name: str,
    overrides: list[str],
    *,
    config: str,
    store: Path,
    split: Path,
    out: Path,
    device: str,
    steps: int,
    epochs: int,
    n_stages: int,
    batch: int | None,
    timeout_s: float,
) -> dict[str, Any]:
    """Train one variant through ``cmafnet train``; returns its per-stage figures from the run folder."""
    run_dir = out / "runs" / name
    sets = [
        f"train.max_steps_per_epoch={steps}",
        *(f"train.stages.{i}.epochs={epochs}" for i in range(n_stages)),
    ]
    sets += [f"train.batch_size={batch}"] if batch else []
    sets += overrides  # the variant's own settings win (stage-3-only variants set epochs to 0)
    cmd = _cmafnet("train", "--config", config, "--store", str(store), "--split", str(split), "--out", str(run_dir),
                   "--device", device, "--no-progress", *(a for s in sets for a in ("--set", s)))  # fmt: skip
    rec: dict[str, Any] = {"overrides": overrides, "command": " ".join(cmd[3:])}
    t0 = time.perf_counter()
    with open(out / f"train_{name}.log", "w") as log:
        try:
            rec["exit"] = subprocess.run(
                cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s
            ).returncode
        except subprocess.TimeoutExpired:
            rec["exit"] = "timeout"
    rec["wall_s"] = round(time.perf_counter() - t0, 1)
    rec["stages"] = stage_figures(run_dir)
    return rec


def stage_figures(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Per stage, from ``metrics.csv``: the last (steady-state) epoch's img/s, ms/step and validation
    img/s, and every epoch's img/s."""
    import pandas as pd

    path = run_dir / "metrics.csv"
    if not path.exists():
        return {}
    meta = read_meta(run_dir) if (run_dir / META_FILE).exists() else {}
    n_val = meta.get("n_val")
    res = {}
    for stage, rows in pd.read_csv(path).groupby("stage_name", sort=False):
        last = rows.iloc[-1]
        res[str(stage)] = {
            "img_s": float(last["train_img_s"]), "step_ms": float(last["step_ms"]),
            "epochs": rows["train_img_s"].round(1).tolist(),
            "val_img_s": float(n_val / last["val_s"]) if n_val and last["val_s"] > 0 else None,
        }  # fmt: skip
    return res


def project_hours(
    stage_img_s: dict[str, float], val_img_s: float | None, stage_epochs: dict[str, int]
) -> float | None:
    """Hours per seed of the paper protocol at the given per-stage training and validation speeds."""
    if any(stage_img_s.get(s) is None for s in stage_epochs) or not val_img_s:
        return None
    seconds = sum(e * (IDC_TRAIN / stage_img_s[s] + IDC_VAL / val_img_s) for s, e in stage_epochs.items())
    return seconds / 3600.0


def summarize(
    variants: dict[str, dict], naive_img_s: float | None, stage_epochs: dict[str, int]
) -> dict[str, Any]:
    """The fastest variant per stage, the ratios to the naive reference and the projected paper protocol."""
    best: dict[str, tuple[str, dict]] = {}
    for name, v in variants.items():
        for stage, fig in v.get("stages", {}).items():
            if "nosam" in name:
                continue  # the paper trains with SAM: the protocol projection uses SAM steps
            if stage not in best or fig["img_s"] > best[stage][1]["img_s"]:
                best[stage] = (name, fig)
    vals = [
        f["val_img_s"] for v in variants.values() for f in v.get("stages", {}).values() if f.get("val_img_s")
    ]

    def ratio(variant: str, stage: str) -> float | None:
        fig = variants.get(variant, {}).get("stages", {}).get(stage)
        return fig["img_s"] / naive_img_s if fig and naive_img_s else None

    stages = list(stage_epochs)
    s2, s3 = (stages[1], stages[2]) if len(stages) == 3 else (None, stages[-1])
    fastest = {s: f["img_s"] for s, (_, f) in best.items()}
    values = {
        "stage3_vs_naive_nosam": ratio("compile_graph_stage3_nosam", s3),
        "stage3_vs_naive_sam": max((r for r in (ratio(n, s3) for n in variants if "nosam" not in n) if r), default=None),
        "stage2_vs_naive": (fastest.get(s2) / naive_img_s) if s2 in fastest and naive_img_s else None,
        "paper_hours_per_seed": project_hours(fastest, max(vals) if vals else None, stage_epochs),
    }  # fmt: skip
    return {
        "fastest_per_stage": {s: {"variant": n, **f} for s, (n, f) in best.items()},
        "targets": check_targets(values, TARGETS),
    }


def naive_speed(
    out: Path, *, config: str, device: str, batch: int | None, timeout_s: float, extra: list[str]
) -> dict:
    """The naive reference's training step through ``cmafnet bench`` (eager, as the anchors)."""
    path = out / "bench_naive.json"
    cmd = _cmafnet("bench", "--config", config, "--device", device, "--models", "naive", "--no-switches",
                   "--no-graph", "--json", str(path), *(["--batch", str(batch)] if batch else []), *extra)  # fmt: skip
    with open(out / "bench_naive.log", "w") as log, contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
    if not path.exists():
        return {}
    doc = json.loads(path.read_text())
    return {"naive": doc.get("models", {}).get("naive", {}), "environment": doc.get("environment", {})}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m cmafnet.bench.acceptance", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--config", default="paper")
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=32, help="optimiser steps per epoch (default 32)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per stage (default 2: the last is timed)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default: the config's)")
    p.add_argument("--patients", type=int, default=30)
    p.add_argument("--patches", type=int, default=200)
    p.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, among {', '.join(VARIANTS)}"
    )
    p.add_argument("--budget-s", type=float, default=420.0, help="time for everything (default 420 s)")
    p.add_argument("--bench-args", default="", help="extra arguments for the naive reference's bench")
    args = p.parse_args(argv)
    from cmafnet.config import load_config

    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    store, split = make_data(args.out, patients=args.patients, patches=args.patches)
    cfg = load_config(args.config)
    stage_epochs = {s.name: s.epochs for s in cfg.train.stages}
    result: dict[str, Any] = {"schema": "cmafnet.trainer_speed/1", "config": args.config, "steps": args.steps,
                              "epochs": args.epochs, "batch": args.batch or cfg.train.batch_size,
                              "data_s": round(time.perf_counter() - start, 1), "variants": {}}  # fmt: skip
    ref = naive_speed(args.out, config=args.config, device=args.device, batch=args.batch, timeout_s=120,
                      extra=args.bench_args.split())  # fmt: skip
    result.update(ref)
    naive_img_s = ref.get("naive", {}).get("train_img_s")
    for name in [n for n in args.variants.split(",") if n]:
        left = args.budget_s - (time.perf_counter() - start)
        if left < 30:
            result["variants"][name] = {"skipped": f"only {left:.0f} s left"}
            continue
        result["variants"][name] = run_variant(
            name, VARIANTS[name], config=args.config, store=store, split=split, out=args.out, device=args.device,
            steps=args.steps, epochs=args.epochs, n_stages=len(stage_epochs), batch=args.batch, timeout_s=left,
        )  # fmt: skip
        result.update(summarize(result["variants"], naive_img_s, stage_epochs))
        (args.out / "trainer_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    result.update(summarize(result["variants"], naive_img_s, stage_epochs))
    result["wall_s"] = round(time.perf_counter() - start, 1)
    (args.out / "trainer_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    for t in result["targets"]:
        print(f"{t['name']:<24} {t['value']!s:>24} {t['op']} {t['threshold']}  passed={t['passed']}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
