"""`cmafnet wsi`: tile a whole-slide image, classify its tissue and write a heatmap and GeoJSON."""

from __future__ import annotations

import argparse

from cmafnet.cli._common import add_device_arg, int_range, microns_per_pixel, positive_int, probability

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

exit codes: 0 done; 2 bad arguments (e.g. --level out of range, both --level and --target-mpp, --target-mpp
outside 0.01-100, a tile plan past the pixel cap per read or 1,000,000 tiles);
3 slide not found, unsupported slide format, no mpp stated without --level, slide smaller than a
tile, a slide path that is not a regular file; 4 run folder without config/run.json/model.safetensors,
or one of them corrupt; 1 runtime failure; 130 interrupted.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "wsi", help="whole-slide heatmap, per-tile CSV and GeoJSON of positive regions",
        description="Tile a whole-slide image (OpenSlide), classify the tissue tiles with a run, "
        "and write a heatmap overlay, per-tile CSV and GeoJSON.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument(
        "slide", metavar="SLIDE", help="a slide OpenSlide can read (.svs, .ndpi, .mrxs, tiled .tif, ...)"
    )
    p.add_argument("--out", required=True, metavar="DIR")
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
    p.add_argument("--no-calibration", action="store_true",
                   help="uncalibrated probabilities (T = 1); the stored threshold is mapped to keep its decisions")  # fmt: skip
    add_device_arg(p)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--fast", action="store_true",
                   help="CUDA: bf16 autocast, channels-last and torch.compile (the first batch waits for the "
                        "compilation; probabilities differ from fp32 by bf16 rounding)")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cmafnet.data.safety import check_output_dir
    from cmafnet.inference.wsi import predict_slide

    check_output_dir(args.out, "--out")  # before the model is loaded

    s = predict_slide(
        args.run_dir, args.slide, args.out, level=args.level, mpp=args.target_mpp, tile=args.tile,
        batch_size=args.batch, device=args.device, threshold=args.threshold, progress=not args.no_progress,
        fast=args.fast, calibrate=not args.no_calibration,
    )  # fmt: skip
    from cmafnet.inference.wsi_figures import partition_line

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
