"""`cmafnet wsi`: tile whole-slide images, classify their tissue and write heatmaps and GeoJSON; over a
cohort, one folder per slide and a cohort summary."""

from __future__ import annotations

import argparse
from pathlib import Path

from cmafnet.cli._common import (
    add_inference_args,
    int_range,
    microns_per_pixel,
    positive_int,
    predict_options,
    probability,
)
from cmafnet.cli._launch import add_launcher_args, check_launcher_args, print_status
from cmafnet.errors import ConfigError

EPILOG = """\
scale: by default tiles are cut at the run's training scale in microns per pixel (run.json patch_mpp,
recorded by 'cmafnet evaluate' from the training store; else 4.0 um/px = the IDC patches' ~2.5x) with
--tile pixels (run.json patch_px, else 50); the same scale logic as 'predict --input-mpp'. This needs
the slide to state its mpp. --level L instead reads --tile-pixel tiles at pyramid level L as they are.

outputs in DIR: tiles.csv (col, row, x, y, size0 = level-0 footprint, level, read_px, tile_px,
thumb_tissue, tissue_fraction, pen_fraction, status, prob_<class>, decision, category, flags),
heatmap.png (thumbnail | probability overlay with colour bar, threshold and legend),
heatmap_overlay.png, thumbnail.png, mask.png (tissue), positive.geojson (QuPath annotations: tiles
at/above the threshold merged into regions), tiles.geojson (a QuPath detection per classified tile,
probabilities as measurements) and summary.json. GeoJSON coordinates are level-0 pixels; import
both in QuPath with File > Import objects from file (docs/qupath.md).

cohort: several SLIDEs, a folder (searched recursively for slide extensions) or a CSV list (a 'path'
column, relative to the CSV; optional 'slide_id' and 'label': 0/1 or the run's class names) make a
cohort. DIR then holds slides/<slide_id>/ (the outputs above), failed/<slide_id>.json (the reason a
slide failed), cohort.csv (per slide: tissue_area_mm2, positive_area_mm2 and positive_fraction at the
operating threshold, prob_mean, prob_top_k, n_not_assessable, seconds, status, reason) and
report.html (the table; with labels, slide-level AUROC of each score with a bootstrap CI). Finished
slides are skipped on a rerun, an interrupted one starts again, a bad one is recorded and the cohort
goes on (exit 3 at the end). --shard i/n and --launcher split the slides like 'experiment' splits runs.

exit codes: 0 done; 2 bad arguments (e.g. --level out of range, both --level and --target-mpp, --target-mpp
outside 0.01-100, a tile plan past the pixel cap per read or 1,000,000 tiles);
3 slide not found, unsupported slide format, no mpp stated without --level, slide smaller than a
tile, a slide path that is not a regular file (a cohort: any slide failed); 4 run folder without config/run.json/model.safetensors,
or one of them corrupt; 1 runtime failure; 130 interrupted.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "wsi", help="whole-slide heatmap, per-tile CSV and GeoJSON of positive regions; over a cohort, a summary",
        description="Tile a whole-slide image (OpenSlide), classify the tissue tiles with a run, "
        "and write a heatmap overlay, per-tile CSV and GeoJSON. Several slides, a folder or a CSV list "
        "make a cohort: one folder per slide and a cohort summary (cohort.csv, report.html).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("run_dir", metavar="RUN_DIR", nargs="?")
    p.add_argument(
        "slides", metavar="SLIDE", nargs="*",
        help="a slide OpenSlide can read (.svs, .ndpi, .mrxs, tiled .tif, ...), a folder of slides or a CSV list",
    )  # fmt: skip
    p.add_argument("--out", metavar="DIR", help="output folder (required)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--level", type=int_range(0), default=None, metavar="L", help="pyramid level to tile")
    g.add_argument(
        "--target-mpp",
        type=microns_per_pixel,
        default=None,
        metavar="M",
        help="target microns per pixel (default 4.0)",
    )
    p.add_argument("--tile", type=int, default=None, metavar="PX", help="tile edge in pixels (default 50)")
    p.add_argument("--batch", type=positive_int, default=64, metavar="N")
    p.add_argument("--threshold", type=probability, default=None, metavar="X",
                   help="positive-class threshold (default: run.json 'threshold', else 0.5)")  # fmt: skip
    add_inference_args(p)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--top-k", type=positive_int, default=10, metavar="K",
                   help="slide score: mean probability of the K most positive tiles (default 10)")  # fmt: skip
    p.add_argument(
        "--shard", help="cohort: do only slides with index = i mod n (0-based) of the id-sorted list"
    )
    p.add_argument("--no-summary", action="store_true",
                   help="cohort: process the slides only, no cohort.csv / report (e.g. in array jobs)")  # fmt: skip
    add_launcher_args(p, "slide")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cmafnet.cli._cohort import run_cohort_command
    from cmafnet.data.safety import check_output_dir
    from cmafnet.inference.cohort import is_cohort
    from cmafnet.inference.wsi import predict_slide
    from cmafnet.inference.wsi_figures import partition_line

    if args.status:
        return print_status(
            args.out, lambda work: _cohort_state(Path(args.out)) if work.get("command") == "wsi" else []
        )
    if args.run_dir is None or not args.slides:
        raise ConfigError("give RUN_DIR and at least one SLIDE (a slide file, a folder or a CSV list)")
    if args.out is None:
        raise ConfigError("--out is required")
    check_output_dir(args.out, "--out")  # before the model is loaded
    check_launcher_args(args)
    if is_cohort(args.slides):
        return run_cohort_command(args)
    cohort_only = [f for f in ("shard", "launcher", "no_summary") if getattr(args, f)]
    if cohort_only:
        raise ConfigError(
            f"--{cohort_only[0].replace('_', '-')} goes with a cohort (several slides, a folder or a CSV list)"
        )
    s = predict_slide(
        args.run_dir, args.slides[0], args.out, predict_options(args), level=args.level, mpp=args.target_mpp,
        tile=args.tile, progress=not args.no_progress, top_k=args.top_k,
    )  # fmt: skip
    plan = s.plan
    print(
        f"{s.slide}: {s.dimensions[0]}x{s.dimensions[1]} px, {plan['cols']}x{plan['rows']} tiles of "
        f"{plan['tile_px']} px (level {plan['level']}, {plan['size0']} level-0 px"
        + (f", {plan['mpp']:.3g} um/px" if plan["mpp"] else "")
        + ")"
    )
    print(f"  {partition_line(s.partition)}")
    print(
        f"  {s.n_positive} positive tiles in {s.n_regions} regions at threshold {s.threshold:.4g} "
        f"({s.threshold_source}); probabilities: {s.calibration}"
    )
    print(
        f"outputs: {s.out_dir}/heatmap.png heatmap_overlay.png tiles.csv positive.geojson tiles.geojson "
        "thumbnail.png mask.png summary.json"
    )
    return 0


def _cohort_state(out: Path) -> list[str]:
    from cmafnet.inference.cohort import cohort_items, cohort_rows, state_counts

    c = state_counts(cohort_rows(out, cohort_items(out)))
    return [
        f"cohort {out}: {sum(c.values())} slides: {c['done']} done, {c['failed']} failed, {c['pending']} pending"
    ]
