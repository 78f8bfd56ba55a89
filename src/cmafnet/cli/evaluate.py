"""`cmafnet evaluate`: predictions and metrics of a run on a store split (or zero-shot)."""

from __future__ import annotations

import argparse

from cmafnet.cli._common import (
    add_inference_args,
    non_negative_int,
    positive_int,
    predict_options,
)


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
    p.add_argument(
        "--batch", "--batch-size", type=positive_int, default=256, help="inference batch size (default 256)"
    )
    p.add_argument(
        "--bootstrap",
        type=non_negative_int,
        default=None,
        help="bootstrap resamples for CIs (default eval.bootstrap)",
    )
    p.add_argument("--no-threshold", action="store_true", help="do not (re)choose the operating threshold")
    p.add_argument(
        "--scale-match", action=argparse.BooleanOptionalAction, default=None,
        help="also evaluate at the training scale (resample to the run's microns per pixel, tile with the "
        "training patch size); default: on for --zero-shot, off otherwise",
    )  # fmt: skip
    p.add_argument(
        "--aggregate", choices=["mean", "max"], default="mean",
        help="scale-matched: tile probabilities per image by mean (default) or max of the positive class",
    )  # fmt: skip
    add_inference_args(p, evaluate=True)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from contextlib import ExitStack
    from pathlib import Path

    from cmafnet.data.safety import check_output_dir
    from cmafnet.errors import RunFolderError
    from cmafnet.evaluation.evaluate import evaluate_run
    from cmafnet.files import hold_folder

    if args.out is not None:
        check_output_dir(args.out, "--out")  # before the model runs
    if not Path(args.run_dir).is_dir():
        raise RunFolderError(f"{args.run_dir}: run folder not found")  # not created by the lock below
    with ExitStack() as held:  # the run folder (run.json gets the threshold, temperature, scale) and --out
        for folder in (args.run_dir, args.out or args.run_dir):  # one folder twice: held once
            held.enter_context(hold_folder(folder, "cmafnet evaluate"))
        doc = evaluate_run(
            args.run_dir,
            args.store,
            split_path=args.split_file,
            split="all" if args.all else args.split,
            zero_shot=args.zero_shot,
            out_dir=args.out,
            bootstrap=args.bootstrap,
            choose_threshold=not args.no_threshold,
            scale_match=args.scale_match,
            aggregate=args.aggregate,
            options=predict_options(args),
        )
    print(summary_lines(doc))
    if "scale_matched" in doc:
        print(summary_lines(doc["scale_matched"]))
    return 0


def diagnosis_lines(d: dict | None) -> list[str]:
    """The zero-shot diagnosis in a few lines: the verdict, the trivial baselines, the top subtypes."""
    from cmafnet.evaluation.metrics import format_metric_for as fmt

    if not d:
        return []
    lines = [f"  diagnosis: {d['verdict']}: {d['verdict_reason']}",
             f"    prevalence {fmt('sensitivity', d['prevalence'])} malignant: calling everything malignant "
             f"scores sensitivity 100%, specificity 0%, balanced accuracy 50%, AUPRC {d['prevalence']:.3f}"]  # fmt: skip
    if d.get("by_subtype"):
        ranked = ", ".join(
            f"{r['group']} ({(r['label'] or '?')[0].upper()}) {r['mean']:.2f}" for r in d["by_subtype"]
        )
        lines.append(f"    mean p(malignant) per subtype, highest first (B benign, M malignant): {ranked}")
    for r in d.get("field_of_view") or []:
        fov = "?" if r["patches_per_image"] is None else f"{r['patches_per_image']:.3g}"
        lines.append(f"    field of view {r['magnification']}: one image spans {fov} training patches; "
                     f"{r['excluded']} of {r['images']} too small for the scale-matched view")  # fmt: skip
    lines.append(f"    figure: {d['figure']}")
    return lines


def summary_lines(doc: dict) -> str:
    """Readable lines: n, each metric row with the threshold it belongs to (operating point first), files."""
    from cmafnet.evaluation.metrics import format_metric_for as fmt
    from cmafnet.evaluation.rows import short_rule

    binary = len(doc["classes"]) == 2
    keys = ("sensitivity", "specificity", "balanced_accuracy", "auprc", "auroc", "mcc", "f1", "ece")
    if not binary:
        keys = ("macro_f1", "weighted_f1", "balanced_accuracy", "mcc", "accuracy")
    scale = doc.get("scale") or {}
    lines = [f"{doc['name']}: {doc['n']} images, classes {doc['classes']}"]
    a = doc.get("adaptation") or {}
    if a.get("label", "raw") != "raw":
        bn = a.get("adabn")
        bn = f"; AdaBN: {bn['layers']} BatchNorm layers re-estimated on {bn['on']}" if bn else ""
        site = a.get("site_calibration")
        site = f"; site calibration on patients {', '.join(site['patients'])} (not scored)" if site else ""
        lines.append(f"  adaptation: {a['label']} (input: {a['preprocess']}){bn}{site}")
    if scale.get("mode") == "match":
        excluded = ", ".join(f"{k} {v}" for k, v in (scale.get("excluded") or {}).items()) or "none"
        lines.append(f"  scale-matched: {scale['description']}; excluded: {excluded}")
    cal = doc.get("calibration")
    if cal:
        lines.append(
            f"  calibration: T={cal['temperature']:.4g} ({cal.get('source', 'run.json')}); ECE {fmt('ece', cal['ece_before'])}"
            f" -> {fmt('ece', cal['ece_after'])}"
            + (f", Brier {fmt('brier', cal['brier_before'])} -> {fmt('brier', cal['brier_after'])}" if cal.get("brier_before") is not None else "")
        )  # fmt: skip
    if not doc.get("metrics"):
        lines.append(f"  {doc.get('note', 'no metrics')}")
        return "\n".join(lines)

    def row(label: str, m: dict) -> str:
        return f"  {label:<34}" + "  ".join(f"{k}={fmt(k, m.get(k))}" for k in keys)

    op = doc.get("operating_point")
    if op:
        lines.append(row(f"threshold {short_rule(op)}", op["metrics"]))
        lines.append(f"    ({op['rule']})")
    lines.append(row(f"threshold {short_rule(None, binary)}", doc["metrics"]))
    for mag, e in doc.get("by_magnification", {}).items():
        if op and e.get("operating_metrics"):
            lines.append(row(f"{mag} @ {short_rule(op)}", e["operating_metrics"]))
        lines.append(row(f"{mag} @ {short_rule(None, binary)}", e["metrics"]))
    lines.extend(diagnosis_lines(doc.get("diagnosis")))
    if doc.get("ci_warning"):
        lines.append(f"  {doc['ci_warning']} (every bootstrap CI in {doc['paths']['metrics']})")
    lines.append(f"  wrote {doc['paths']['predictions']} and {doc['paths']['metrics']}")
    return "\n".join(lines)
