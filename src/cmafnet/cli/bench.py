"""`cmafnet bench`: CMAF-Net's speed against timm baselines and a naive dual-branch model, in one process.

Measures, after warm-up and with device synchronisation (see ``cmafnet.bench``): the
stage-3 training throughput of CMAF-Net through the trainer's own step, with every regulariser,
AutoClip and the non-finite skip (SAM off and on), inference
throughput (plain and with the auxiliary outputs), batch-1 latency (eager, CUDA graph, compiled),
peak memory; the same for timm ``resnet18``, timm ``mobilevit_s`` and the naive reference
(``cmafnet.bench.naive``); the fast-path switches one at a time; optionally the
end-to-end epoch through the real data path. Prints a table, writes JSON, checks the targets of
docs/performance.md. The bench reports; it never fails because a target is missed (exit 1 only
when a measurement could not run).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

from cmafnet.cli._common import add_config_args
from cmafnet.errors import ConfigError
from cmafnet.registry import suggest

log = logging.getLogger("cmafnet.bench")

MODEL_KEYS = ("cmafnet", "naive", "resnet18", "mobilevit_s")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="measure training/inference speed of CMAF-Net vs baselines and a naive dual-branch model",
        description=__doc__.split("\n\n")[0],
    )
    add_config_args(p)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: cuda if available)")
    p.add_argument("--size", type=int, default=None, help="image size in px (default: the config's img_size)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default: the config's, 128)")
    p.add_argument("--infer-batch", type=int, default=256, help="inference batch (default 256)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on CUDA, 2 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps (default 5 / 1)")
    p.add_argument("--latency-steps", type=int, default=None, help="batch-1 calls timed (default 100 / 3)")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="auto",
                   help="autocast precision (auto: bf16 on CUDA, none on CPU)")  # fmt: skip
    p.add_argument("--models", nargs="+", default=list(MODEL_KEYS), metavar="MODEL",
                   help=f"models to time, among {', '.join(MODEL_KEYS)} (comma or space separated)")  # fmt: skip
    p.add_argument(
        "--compile", action="store_true", help="also time torch.compile'd CMAF-Net and naive model"
    )
    p.add_argument("--no-graph", dest="graph", action="store_false",
                   help="on CUDA, skip CMAF-Net with its whole training step captured in a CUDA graph")  # fmt: skip
    p.add_argument("--runs", nargs="+", default=None, metavar="KEY",
                   help="time only these of the measurements the other options select, e.g. "
                        "'naive cmafnet+compile', timed in the order given "
                        "(keys: a model, or a model +graph / +compile / +compile+graph)")  # fmt: skip
    p.add_argument("--no-switches", dest="switches", action="store_false",
                   help="skip the one-at-a-time fast-path switch measurements")  # fmt: skip
    p.add_argument("--switch", dest="only_switches", nargs="+", default=None, metavar="NAME",
                   help="measure only these switches (default: all)")  # fmt: skip
    p.add_argument("--data-path", action="store_true", help="time the real data path on a generated store")
    p.add_argument(
        "--store-size", type=int, default=None, help="generated patches (default 277,524, IDC's size)"
    )
    p.add_argument("--epoch-fraction", type=float, default=1.0,
                   help="fraction of an epoch of the generated store to time (0 < f <= 1)")  # fmt: skip
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)"
    )
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="write torch.profiler op tables of CMAF-Net and naive training steps to DIR")  # fmt: skip
    p.add_argument("--json", type=Path, default=None, help="write all numbers to this JSON file")
    p.set_defaults(func=run, config="paper")


def _names(items: list[str], known: Any, refusal: str) -> list[str]:
    """``items`` split at commas, in the order given, once each; one not in ``known`` raises ``refusal``
    (a template of the name) with the nearest known name."""
    names = list(dict.fromkeys(n for item in items for n in item.split(",") if n))
    for n in names:
        if n not in known:
            raise ConfigError(refusal.format(n) + suggest(n, list(known)))
    return names


def _check_args(args: argparse.Namespace) -> None:
    checks = [
        (args.size is None or args.size >= 32, "--size must be >= 32"),
        (args.batch is None or args.batch >= 1, "--batch must be >= 1"),
        (args.infer_batch >= 1, "--infer-batch must be >= 1"),
        (args.steps is None or args.steps >= 1, "--steps must be >= 1"),
        (args.warmup is None or args.warmup >= 0, "--warmup must be >= 0"),
        (args.latency_steps is None or args.latency_steps >= 1, "--latency-steps must be >= 1"),
        (0 < args.epoch_fraction <= 1, "--epoch-fraction must be in (0, 1]"),
        (args.store_size is None or args.store_size >= 1, "--store-size must be >= 1"),
        (args.threads is None or args.threads >= 1, "--threads must be >= 1"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def _environment(dev: Any, args: argparse.Namespace, timing: Any, size: int, batch: int) -> dict[str, Any]:
    import kornia
    import timm
    import torch

    from cmafnet import __version__
    from cmafnet.devices import device_name

    return {
        "cmafnet": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "device": str(dev),
        "device_name": device_name(dev),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if dev.type == "cuda" else None,
        "cpu_threads": torch.get_num_threads(),
        "config": args.config,
        "overrides": args.overrides,
        "size": size,
        "batch": batch,
        "infer_batch": args.infer_batch,
        "steps": timing.steps,
        "warmup": timing.warmup,
        "latency_steps": timing.latency_steps,
        "amp": timing.amp,
        "compile": args.compile,
        "cuda_graph": args.graph and dev.type == "cuda",
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kornia": kornia.__version__,
    }


def run(args: argparse.Namespace) -> int:
    import torch

    from cmafnet.bench.data_path import IDC_SIZE
    from cmafnet.bench.models import bench_model
    from cmafnet.bench.suite import build_specs, measure_cmaf_data_path
    from cmafnet.bench.switches import SWITCHES, run_switches
    from cmafnet.bench.targets import (
        TARGETS,
        check_targets,
        compute_ratios,
        count_errors,
        format_report,
    )
    from cmafnet.bench.timing import Timing
    from cmafnet.config import load_config
    from cmafnet.devices import resolve_device
    from cmafnet.run import write_json

    _check_args(args)
    # bad names fail before any measurement
    only = (
        set(_names(args.only_switches, SWITCHES, "--switch: unknown switch '{}'."))
        if args.only_switches
        else None
    )
    if args.store_size is None:
        args.store_size = IDC_SIZE
    names = _names(args.models, MODEL_KEYS, "--models: unknown model '{}'.")
    cfg = load_config(args.config, args.overrides)
    dev = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = dev.type == "cuda"
    size = args.size or cfg.model.img_size
    batch = args.batch or cfg.train.batch_size
    amp = args.amp if args.amp != "auto" else ("bf16" if cuda else "none")
    if args.data_path and args.store_size < batch:
        raise ConfigError(f"--store-size ({args.store_size}) must hold at least one batch ({batch})")
    timing = Timing(
        dev,
        steps=args.steps or (20 if cuda else 2),
        warmup=args.warmup if args.warmup is not None else (5 if cuda else 1),
        amp=amp,
        latency_steps=args.latency_steps or (100 if cuda else 3),
    )
    if cuda:  # the anchor's settings: autotuned convolutions, TF32 for any fp32 matmul
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "schema": "cmafnet.bench/1",
        "environment": _environment(dev, args, timing, size, batch),
        "targets_definition": [
            {"name": n, "description": d, "op": o, "threshold": t} for n, d, o, t in TARGETS
        ],
    }
    specs = build_specs(cfg, dev, size, names, args.compile, args.profile, args.graph, amp)
    if args.runs:
        selected = f"(selected: {', '.join(specs)})."
        keep = _names(args.runs, specs, "--runs: '{}' is not selected by the other options " + selected)
        # in the order given: under a time limit the first ones are the ones sure to be measured
        specs = {k: specs[k] for k in keep}

    def bench(spec: Any, t: Any = timing) -> dict:
        return bench_model(spec, t, size=size, batch=batch, infer_batch=args.infer_batch,
                           num_classes=cfg.model.num_classes)  # fmt: skip

    def save(complete: bool) -> None:
        """Ratios and targets of what is measured so far; the JSON is rewritten after every part, so
        a run stopped by a time limit still leaves its numbers."""
        result["ratios"] = compute_ratios(result["models"], result.get("data_path"))
        result["targets"] = check_targets(result["ratios"])
        result["wall_s"] = time.perf_counter() - t_start
        result["errors"] = count_errors(result)
        result["complete"] = complete
        if args.json:
            write_json(args.json, result)

    models: dict[str, dict] = {}
    result["models"] = models
    for key, spec in specs.items():
        t0 = time.perf_counter()
        log.info("timing %s", key)
        models[key] = bench(spec)
        models[key]["wall_s"] = time.perf_counter() - t0
        log.info(
            "%s: %s", key, json.dumps({k: v for k, v in models[key].items() if k != "errors"}, default=str)
        )
        save(False)
    if args.data_path:
        log.info("timing the data path on a generated store of %d patches", args.store_size)
        try:
            result["data_path"] = measure_cmaf_data_path(cfg, args, timing, size, batch)
        except Exception as err:  # reported, not fatal: the model numbers stand on their own
            result["data_path"] = {"errors": {"data_path": f"{type(err).__name__}: {err}"}}
        save(False)
    if args.switches:
        log.info("timing fast-path switches")
        result["switches"] = run_switches(specs, models, bench, timing, only)
    save(True)
    print(format_report(result))
    if args.json:
        print(f"\nwrote {args.json}")
    sys.stdout.flush()
    return 1 if result["errors"] else 0
