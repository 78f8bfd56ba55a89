"""`cmafnet evaluate`: predictions and metrics of a run on a store split (or zero-shot)."""

from __future__ import annotations

import argparse

from cmafnet.cli._common import add_device_arg, non_negative_int, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="evaluate a trained run on a store split (predictions CSV + metrics JSON)",
        description="Predict a split of a packed store with a run's best model and write "
        "predictions_<split>.csv and metrics_<split>.json (metrics at 0.5 and at the operating "
        "threshold chosen on validation for eval.target_sensitivity, which is stored in run.json).",
    )
    p.add_argument("run_dir", help="run folder (from cmafnet train)")
    p.add_argument("--store", required=True, help="packed store (from cmafnet ingest)")
    p.add_argument("--split-file", default=None, help="split file (default: the run's split.json)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--split", default="test", choices=["test", "val", "train"], help="split to evaluate")
    which.add_argument("--all", action="store_true", help="evaluate every image of the store")
    p.add_argument(
        "--zero-shot", action="store_true",
        help="apply a binary run to another dataset's benign/malignant label (e.g. IDC -> BreakHis), "
        "per magnification and overall; evaluates every image unless --split-file is given",
    )  # fmt: skip
    p.add_argument("--out", default=None, help="output folder (default: the run folder)")
    p.add_argument("--batch-size", type=positive_int, default=256, help="inference batch size (default 256)")
    p.add_argument(
        "--bootstrap",
        type=non_negative_int,
        default=None,
        help="bootstrap resamples for CIs (default eval.bootstrap)",
    )
    p.add_argument("--no-threshold", action="store_true", help="do not (re)choose the operating threshold")
    add_device_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cmafnet.data.safety import check_output_dir
    from cmafnet.evaluation.evaluate import evaluate_run
    from cmafnet.evaluation.metrics import format_metric_for

    if args.out is not None:
        check_output_dir(args.out, "--out")  # before the model runs
    doc = evaluate_run(
        args.run_dir,
        args.store,
        split_path=args.split_file,
        split="all" if args.all else args.split,
        zero_shot=args.zero_shot,
        device=args.device,
        out_dir=args.out,
        batch_size=args.batch_size,
        bootstrap=args.bootstrap,
        choose_threshold=not args.no_threshold,
    )
    print(summary_lines(doc, format_metric_for))
    return 0


def summary_lines(doc: dict, fmt) -> str:
    """A few readable lines: n, headline metrics at 0.5 and at the operating threshold, files."""
    keys = ("sensitivity", "specificity", "balanced_accuracy", "auprc", "auroc", "mcc", "f1", "ece")
    if len(doc["classes"]) != 2:
        keys = ("macro_f1", "weighted_f1", "balanced_accuracy", "mcc", "accuracy")
    lines = [f"{doc['name']}: {doc['n']} images, classes {doc['classes']}"]

    def row(label: str, m: dict) -> str:
        return f"  {label:<22}" + "  ".join(f"{k}={fmt(k, m.get(k))}" for k in keys)

    lines.append(row("threshold 0.5", doc["metrics"]))
    if "operating_point" in doc:
        op = doc["operating_point"]
        lines.append(row(f"threshold {op['value']:.4f}", op["metrics"]))
    for mag, e in doc.get("by_magnification", {}).items():
        lines.append(row(f"{mag} @ 0.5", e["metrics"]))
    lines.append(f"  wrote {doc['paths']['predictions']} and {doc['paths']['metrics']}")
    return "\n".join(lines)
