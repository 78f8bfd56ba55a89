"""`cmafnet predict`: classify image files, folders or CSV lists with a trained run."""

from __future__ import annotations

import argparse

from cmafnet.cli._common import (
    add_inference_args,
    microns_per_pixel,
    positive_int,
    predict_options,
    probability,
)

EPILOG = """\
inputs: image files, folders (searched recursively for .png/.jpg/.jpeg/.tif/.tiff/.bmp/.webp) or
CSV files with a 'path' column (relative paths are relative to the CSV).
output CSV, one row per input in input order: path, status (ok | not_assessable | error),
prob_<class> for each class, decision (at the operating threshold for binary runs), threshold,
threshold_source (argument | run.json:threshold | default = 0.5 | argmax for multi-class),
tissue_fraction, pen_fraction, flags (not_assessable:background|pen|low_tissue|smaller_than_patch),
scale (squeezed | matched), n_tiles, error (the reason a file was rejected: not found, not a regular
file, too large, corrupt, empty, grayscale, 16-bit, transparent...). A bad file, or a missing path,
never stops the job. Probabilities are calibrated with the run's temperature (run.json, fitted on
validation by 'cmafnet evaluate'); --calibration off gives the raw softmax.

exit codes: 0 at least one input was read (predicted or flagged not assessable);
3 no inputs found (empty folder), no input could be read, or a CSV list that is not text;
4 run folder without config/run.json/model.safetensors, or one of them corrupt; 2 bad arguments
(also --out naming a folder, checked before any work); 1 runtime failure; 130 interrupted.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="classify images, folders or CSV lists with a trained run",
        description="Classify image files, folders or CSV lists with a trained run folder.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument(
        "run_dir", metavar="RUN_DIR", help="a run folder (config.yaml, run.json, model.safetensors)"
    )
    p.add_argument("inputs", metavar="INPUT", nargs="+", help="image file, folder or CSV list")
    p.add_argument("--out", required=True, metavar="FILE.csv", help="output CSV")
    p.add_argument("--batch", type=positive_int, default=64, metavar="N", help="batch size (default 64)")
    p.add_argument("--threshold", type=probability, default=None, metavar="X",
                   help="positive-class probability threshold (default: run.json 'threshold', else 0.5)")  # fmt: skip
    p.add_argument("--no-tissue-check", action="store_true",
                   help="classify every readable image, even blank / pen-marked / low-tissue ones")  # fmt: skip
    p.add_argument("--explain", metavar="DIR", default=None,
                   help="write explanation overlays (CMAF attention + gate maps, Grad-CAM for baselines)")  # fmt: skip
    add_inference_args(p)
    p.add_argument("--input-mpp", type=microns_per_pixel, default=None, metavar="M",
                   help="microns per pixel of the inputs: resample every image to the run's training scale and "
                        "tile it with the training patch size instead of squeezing it into the model input")  # fmt: skip
    p.add_argument("--aggregate", choices=["mean", "max"], default="mean",
                   help="with --input-mpp: per-image probability = mean of the tiles (default) or max of the positive class")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cmafnet.inference.predict import predict_files

    s = predict_files(
        args.run_dir, args.inputs, args.out, predict_options(args), tissue_check=not args.no_tissue_check,
        explain_dir=args.explain, progress=not args.no_progress, mpp=args.input_mpp, aggregate=args.aggregate,
    )  # fmt: skip
    print(
        f"{s.out}: {s.n_predicted} predicted, {s.n_not_assessable} not assessable, {s.n_errors} errors "
        f"of {s.n_inputs} inputs (threshold {s.threshold:.4g} from {s.threshold_source}; "
        f"preprocessing: {s.preprocess})"
    )
    print(f"  calibration: {s.calibration}")
    print(f"  scale: {s.scale}")
    for path, reason in s.errors[:5]:
        print(f"  rejected {path}: {reason}")
    if s.explain_dir:
        print(f"explanations: {s.explain_dir}")
    return 0
