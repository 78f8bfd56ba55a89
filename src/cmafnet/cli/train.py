"""`cmafnet train --config FILE [--set k=v ...] --store STORE --split SPLIT --out RUN_DIR [--resume]`.

Multi-GPU / multi-node: launch the same command under torchrun, e.g.
``torchrun --nproc_per_node 4 $(which cmafnet) train --config paper ...``; ``train.batch_size`` is the
global batch (split evenly over the ranks); only rank 0 writes and prints.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from cmafnet.cli._common import add_config_args, add_device_arg, positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model through the configured stages into a run folder",
        description="Run the config's stage list (CMAF-Net: branches -> fusion -> end-to-end) on a store and "
        "split, writing config.yaml, split.json, run.json, metrics.csv, model.safetensors (best by "
        "validation AUPRC) and checkpoints/last.pt. Ctrl-C / SIGTERM saves a checkpoint; --resume continues "
        "exactly. Under torchrun it trains with DDP (train.batch_size is the global batch).",
    )
    add_config_args(p)
    p.add_argument("--store", required=True, help="store folder made by 'cmafnet ingest'")
    p.add_argument("--split", required=True, help="split file made by 'cmafnet split'")
    p.add_argument("--out", required=True, help="run folder to create (or to continue with --resume)")
    p.add_argument(
        "--resume", action="store_true",
        help="continue from RUN_DIR/checkpoints/last.pt (config defaults to RUN_DIR/config.yaml)",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--stop-after-steps", type=positive_int, default=None, metavar="N",
                   help="save a checkpoint and stop after N optimiser steps (resume later)")  # fmt: skip
    add_device_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cmafnet.config import load_config
    from cmafnet.errors import ConfigError, RunFolderError
    from cmafnet.run import CONFIG_FILE
    from cmafnet.training import fit

    config = args.config
    if config is None:
        if not args.resume:
            raise ConfigError("--config is required (a YAML file or a shipped name: paper, smoke, ...)")
        config = Path(args.out) / CONFIG_FILE
        try:
            load_config(config)  # the run folder's own file: a fault there is the folder's (exit 4)
        except ConfigError as err:
            raise RunFolderError(str(err)) from None
    cfg = load_config(config, args.overrides)
    device = None if args.device == "auto" else args.device
    summary = fit(
        cfg, args.store, args.split, args.out, resume=args.resume, progress=not args.no_progress,
        stop_after_steps=args.stop_after_steps, device=device,
    )  # fmt: skip
    if os.environ.get("RANK", "0") != "0":
        return 130 if summary["status"] == "interrupted" else 0
    print(json.dumps(summary, indent=2, default=str))
    if summary["status"] == "interrupted":
        print(f"interrupted: checkpoint saved; continue with: cmafnet train --out {args.out} --resume ...")
        return 130
    return 0
