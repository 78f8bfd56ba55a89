"""`cmafnet export`: ONNX / TorchScript export of a run's inference path, with a parity check."""

from __future__ import annotations

import argparse

from cmafnet.cli._common import float_range, int_range

EPILOG = """\
The exported model takes the preprocessed input (float (B, 3, S, S), stain-normalised, resized to
the run's img_size and mean/std-normalised) and returns softmax probabilities (B, C); the batch axis
is dynamic. A sidecar <out>.json records classes, img_size, mean/std, stain settings, the operating
threshold and the parity result. Parity: the file is reloaded (onnxruntime CPU for ONNX) and compared
with PyTorch on random inputs at batch sizes 1 and 3; max |p_export - p_torch| must be <= --tolerance.

exit codes: 0 exported and parity passed; 1 export failed (nothing written) or parity check failed
(file kept); 2 bad arguments (--opset outside 18 to the installed onnx's newest, --tolerance < 0);
4 run folder without config/run.json/model.safetensors, or one of them corrupt; 130 interrupted.
The exporters' own log lines are shown with 'cmafnet -v export ...'.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a run's model to ONNX or TorchScript (with a parity check)",
        description="Export the plain inference path (logits -> softmax) of a run to ONNX or TorchScript.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    p.add_argument("--out", metavar="FILE", default=None, help="default RUN_DIR/model.onnx or model.pt")
    p.add_argument(
        "--tolerance", type=float_range(0.0), default=1e-4, help="max abs probability difference (1e-4)"
    )
    # 18 = the first opset torch's exporter implements; the newest is the installed onnx's
    p.add_argument("--opset", type=int_range(18), default=18, help="ONNX opset (default 18)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cmafnet.inference.export import ParityError, export_run

    try:
        res = export_run(args.run_dir, args.format, args.out, tolerance=args.tolerance, opset=args.opset)
    except ParityError as err:
        print(f"parity check: FAILED ({err})")
        raise
    print(
        f"{res.path}: {res.format} export; parity vs PyTorch (CPU, batch {list(res.batch_sizes)}): "
        f"max abs diff {res.max_abs_diff:.3g} <= {res.tolerance:g} PASSED"
    )
    return 0
