"""`cmafnet wsi` over a cohort: the slide list, this shard's slides (or jobs for every shard), the summary."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cmafnet.errors import ConfigError


def run_cohort_command(args: argparse.Namespace) -> int:
    """Process the cohort's slides (this ``--shard``, or every shard as ``--launcher`` jobs), then write
    ``cohort.csv`` and ``report.html``; 3 when a slide failed."""
    from cmafnet.cli._common import predict_options
    from cmafnet.experiments.spec import parse_shard
    from cmafnet.inference.cohort import SlideOptions, claim_cohort, read_cohort, run_cohort, shard_items
    from cmafnet.inference.wsi import check_tiling_options
    from cmafnet.run import read_meta

    meta = read_meta(args.run_dir)  # a bad run folder stops here, before any slide
    items = read_cohort(args.slides, classes=meta.get("classes") or ())
    options = SlideOptions(level=args.level, mpp=args.target_mpp, tile=args.tile, threshold=args.threshold,
                           calibrate=args.calibration, top_k=args.top_k,
                           adaptation=predict_options(args).adapt.label())  # fmt: skip
    check_tiling_options(level=options.level, mpp=options.mpp, tile=options.tile, meta=meta)
    out = Path(args.out)
    claim_cohort(out, args.run_dir, options, items)
    if args.launcher:
        return _launch(args, out, items)
    shard = parse_shard(args.shard)
    mine = shard_items(items, shard)
    res = run_cohort(args.run_dir, mine, out, options=options, load_predictor=lambda: _load(args),
                     progress=not args.no_progress)  # fmt: skip
    print(
        f"cohort: {len(items)} slides, {len(mine)} in shard {shard[0]}/{shard[1]}: {len(res.processed)} processed, "
        f"{len(res.skipped)} already done, {len(res.failed)} failed"
    )
    if args.no_summary:
        for sid, why in res.failed.items():
            print(f"  failed: {sid}: {why}")
    else:
        _summary(out, items, args.run_dir)
    return 3 if res.failed else 0


def _load(args: argparse.Namespace) -> Any:
    from cmafnet.cli._common import predict_options
    from cmafnet.inference.predict import Predictor

    predictor = Predictor.from_run_dir(args.run_dir, predict_options(args))
    if len(predictor.classes) != 2:
        raise ConfigError("whole-slide heatmaps need a binary run (positive class = index 1)")
    return predictor


def _summary(out: Path, items: list, run_dir: str) -> list[dict[str, Any]]:
    """Write ``cohort.csv`` and the report; print the counts, the failures and the slide-level AUROC."""
    from cmafnet.evaluation.slide_level import SLIDE_SCORES, slide_auroc, write_cohort_report
    from cmafnet.inference.cohort import cohort_rows, state_counts, write_cohort_csv

    rows = cohort_rows(out, items)
    c = state_counts(rows)
    counts = f"{len(rows)} slides: {c['done']} done, {c['failed']} failed, {c['pending']} pending"
    auroc = slide_auroc(rows)
    notes = [f"Run {Path(run_dir).resolve()}; {counts}. Slide folders: {out / 'slides'}; per-slide numbers: "
             f"{out / 'cohort.csv'}."]  # fmt: skip
    csv_path = write_cohort_csv(out, rows)
    report = write_cohort_report(out, rows, auroc, notes=notes)
    print(f"summary: {counts}")
    for r in rows:
        if r["status"] == "failed":
            print(f"  failed: {r['slide_id']} ({r['path']}): {r['reason']}")
    for a in auroc:
        ci = f" [{a['low']:.3f}, {a['high']:.3f}]" if a["low"] is not None else ""
        value = f"{a['auroc']:.3f}{ci}" if a["auroc"] is not None else "n/a (one class)"
        print(
            f"  slide AUROC, {SLIDE_SCORES[a['score']]}: {value} ({a['n_pos']} positive, {a['n_neg']} negative)"
        )
    print(f"outputs: {csv_path} {report}")
    return rows


def _launch(args: argparse.Namespace, out: Path, items: list) -> int:
    """Submit the shards with slides left as jobs; after local jobs, the summary."""
    from cmafnet.cli._launch import launch
    from cmafnet.inference.cohort import shard_items, slide_state

    n = args.jobs or len(items)
    shards = [
        (i, n)
        for i in range(n)
        if any(slide_state(out, it.slide_id) != "done" for it in shard_items(items, (i, n)))
    ]
    note = ("when they have finished: rerun this command without --launcher: it skips the finished slides and "
            "writes cohort.csv and report.html")  # fmt: skip
    failed = launch(args, out=out, label="wsi", shards=shards, work={"command": "wsi"}, slurm_note=note,
                    no_summary=True, no_progress=True)  # fmt: skip
    if failed is None:  # submitted to Slurm
        return 0
    rows = _summary(out, items, args.run_dir)
    if any(r["status"] == "failed" for r in rows):
        return 3
    return 1 if failed else 0
