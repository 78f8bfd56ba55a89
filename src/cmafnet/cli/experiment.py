"""`cmafnet experiment`: reproduce one of the paper's tables (train, evaluate, aggregate), resumably."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cmafnet.cli._common import add_device_arg, positive_int
from cmafnet.cli._launch import add_launcher_args, check_launcher_args, print_status
from cmafnet.errors import ConfigError, RunFolderError
from cmafnet.registry import suggest

TABLE_NAMES = tuple(f"table{i}" for i in range(1, 9))


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "experiment",
        help="run a paper table (table1..table8): train, evaluate, aggregate beside the paper's numbers",
        description="Expand a paper table into independent runs, do this shard's runs (finished ones are "
        "skipped, unfinished ones resumed), then aggregate every finished run into the paper's layout "
        "(mean ± std over seeds, ours beside the paper's) with its figure. Rerun the same command after "
        "an interruption. See docs/experiments.md.",
    )
    p.add_argument("name", nargs="?", help=f"one of {', '.join(TABLE_NAMES)}")
    p.add_argument("--list", action="store_true", help="list the tables, their runs and GPU cost, then exit")
    p.add_argument(
        "--calibrate", type=Path, action="append", default=[], metavar="RUN_DIR",
        help="with --list: cost the run's model at the training throughput that run measured, per stage "
        "(repeatable, one run per model)",
    )  # fmt: skip
    p.add_argument("--store", type=Path, help="IDC store (from 'cmafnet ingest')")
    p.add_argument("--split", type=Path, help="IDC split file (default: made once under --out, seed 0)")
    p.add_argument("--breakhis-store", type=Path, help="BreakHis store (Tables 3-5)")
    p.add_argument("--breakhis-split", type=Path, help="BreakHis split file (default: made once, by subtype)")
    p.add_argument("--seeds", type=positive_int, default=5, help="seeds per row (default 5, as the paper)")
    p.add_argument("--shard", help="i/n: do only runs with index = i mod n (0-based) of the sorted run list")
    p.add_argument(
        "--scale", choices=("smoke", "paper"), default="paper", help="paper (default) or smoke (tiny)"
    )
    p.add_argument(
        "--only", nargs="+", metavar="GLOB", help="only runs whose id or row matches (e.g. 'resnet50*')"
    )
    p.add_argument(
        "--out", type=Path, help="experiment folder (runs are shared between tables in one folder)"
    )
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="config override for every run of the table (recorded in each run's fingerprint; repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--match-compute", action="store_true",
        help="table1, table2: also train every baseline row at the training MACs its CMAF-Net run recorded "
        "(same seed and column; CMAF-Net is trained first) and print both rows with their MACs; with --list: "
        "cost those extra runs",
    )  # fmt: skip
    p.add_argument(
        "--foundation", nargs="+", default=[], metavar="NAME",
        help="table1, table3: add linear-probe rows for these foundation models (cmafnet info --foundation), "
        "at the store's scale and resampled to theirs, with training and extraction MACs (docs/foundation.md)",
    )  # fmt: skip
    add_device_arg(p)
    p.add_argument("--dry-run", action="store_true", help="print what would be trained/resumed/evaluated")
    p.add_argument("--no-aggregate", action="store_true", help="do the runs only (e.g. in array jobs)")
    p.add_argument("--aggregate-only", action="store_true", help="only rebuild the table from finished runs")
    add_launcher_args(p, "run")
    p.set_defaults(func=run)


def _list(seeds: int, calibrate: list[Path], match_compute: bool = False) -> int:
    from cmafnet.experiments.cost import anchor_rates, load_calibration, table_cost
    from cmafnet.experiments.paper_tables import TABLES, expand

    rates, source = anchor_rates()
    calib = {}
    for run_dir in calibrate:
        c = load_calibration(run_dir)
        if c.model in calib:
            raise ConfigError(
                f"--calibrate: two runs of model '{c.model}' ({calib[c.model].source}, {run_dir})"
            )
        calib[c.model] = c
    print(f"{'table':<8} {'runs':>5}  {'x seeds':>8}  {'GPU-h (1 GPU)':>13}  title")
    total = 0.0
    every = []
    for name, t in TABLES.items():
        specs = expand(name, seeds, "paper", match_compute and t.compute_reference is not None)
        every += specs
        n_rows = len({s.config_key for s in specs})
        hours = table_cost(specs, rates, calib)
        total += hours
        seeds_txt = f"x{seeds}" if t.seeded else "x1"
        print(f"{name:<8} {n_rows:>5}  {seeds_txt + ' = ' + str(len(specs)):>8}  {hours:>13.1f}  {t.title}")
    print(
        f"sum of tables: {total:.1f} GPU-h; all eight in one --out (shared runs trained once): "
        f"{table_cost(every, rates, calib):.1f} GPU-h ({len({s.run_id for s in every})} distinct runs)"
    )
    for c in calib.values():
        note = (
            "" if c.img_size == 224 else f" (measured at {c.img_size} px, not the paper's 224: not to scale)"
        )
        print(f"Calibrated training throughput, per stage: {c.describe()}{note}")
    cmaf = (
        "" if "cmafnet" in calib else "CMAF-Net at half the naive dual-branch proxy speed (SAM: two passes); "
    )
    matched = (
        "; with --match-compute, Tables 1 and 2 also train each baseline at CMAF-Net's training MACs (its "
        "epochs x 2 SAM passes x its forward MACs over the baseline's forward MACs at 224 px)"
        if match_compute
        else ""
    )
    print(
        f"Assumptions: throughputs from {source} (except the calibrated models above); 100 epochs per run (no "
        "early stopping), one validation pass per epoch; IDC 194k train / 28k val / 56k test images; "
        f"{cmaf}TransFuse/MMTM/HRFNet estimated from their parts{matched}. --scale smoke runs take seconds to "
        "minutes on a CPU."
    )
    return 0


def run(args: argparse.Namespace) -> int:
    from cmafnet.experiments.paper_tables import check_match_compute, get_table
    from cmafnet.experiments.spec import parse_shard

    if args.list:
        return _list(args.seeds, args.calibrate, args.match_compute)
    if args.calibrate:
        raise ConfigError("--calibrate goes with --list (it changes the cost estimate, not the runs)")
    if args.status:
        return print_status(args.out, lambda work: _work_lines(args.out, work))
    check_launcher_args(args)
    if not args.name:
        raise ConfigError("name a table (table1..table8) or pass --list")
    if args.name not in TABLE_NAMES:
        raise ConfigError(f"unknown table '{args.name}'.{suggest(args.name, list(TABLE_NAMES))}")
    if args.out is None:
        raise ConfigError("--out is required (the experiment folder)")
    shard = parse_shard(args.shard)
    foundation = tuple(args.foundation)
    if foundation:
        get_table(args.name, foundation)  # a known model, and a table probe rows go into
    if args.match_compute:
        check_match_compute(args.name)

    from cmafnet.experiments.aggregate import write_table
    from cmafnet.experiments.runner import Context, run_table

    ctx = Context(
        out=args.out,
        store=args.store,
        split=args.split,
        breakhis_store=args.breakhis_store,
        breakhis_split=args.breakhis_split,
        device=args.device,
        scale=args.scale,
        overrides=tuple(args.overrides),
    )
    failed: list[str] = []  # local jobs that failed
    if args.launcher:
        if args.aggregate_only:
            raise ConfigError("--aggregate-only builds the table here from finished runs: drop --launcher")
        done = _launch(args, ctx)
        if done is None:  # submitted to Slurm, or a dry run: nothing to aggregate yet
            return 0
        failed = done
    elif not args.aggregate_only:
        s = run_table(
            args.name, ctx, seeds=args.seeds, shard=shard, only=args.only, dry_run=args.dry_run,
            match_compute=args.match_compute, foundation=foundation,
        )  # fmt: skip
        waiting = f", {len(s.waiting)} waiting for their CMAF-Net run" if s.waiting else ""
        waiting += f", {len(s.busy)} in use by another process" if s.busy else ""
        print(
            f"{args.name}: {s.total} runs in the table, {s.selected} in shard {shard[0]}/{shard[1]}: "
            f"{len(s.trained)} trained, {len(s.resumed)} resumed, {len(s.skipped)} already finished, "
            f"{len(s.evaluated)} evaluated{waiting}"
        )
        for line in s.planned:
            print(f"  would {line}")
        for line in s.waiting:
            print(f"  waiting: {line}")
        for line in s.busy:
            print(f"  left to another process: {line}")
        if s.waiting:
            print(
                "  A run at CMAF-Net's compute starts once that CMAF-Net run has finished (another shard may "
                "be training it): rerun this command then."
            )
        if args.dry_run:
            return 0
    if args.no_aggregate:
        return 1 if failed else 0
    table, paths = write_table(
        args.name, args.out, seeds=args.seeds, scale=args.scale, overrides=tuple(args.overrides),
        match_compute=args.match_compute, foundation=foundation,
    )  # fmt: skip
    print(table.markdown())
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    for line in table.invalid:  # the table marks their rows
        print(f"cmafnet experiment: error: {line}; its row reads 'invalid' (remove the file and rerun to "
              "evaluate the run again)", file=sys.stderr)  # fmt: skip
    if table.invalid:
        return RunFolderError.exit_code
    return 1 if failed else 0


def _launch(args: argparse.Namespace, ctx: Any) -> list[str] | None:
    """Submit this table's shards with work left; the failed local jobs, or None when not to aggregate."""
    from cmafnet.cli._launch import launch
    from cmafnet.experiments.execute import check_inputs, ensure_split
    from cmafnet.experiments.runner import run_done, run_table, table_specs
    from cmafnet.experiments.spec import select_shard

    # Every config is validated here, before any job starts.
    foundation = tuple(args.foundation)
    run_table(
        args.name, ctx, seeds=args.seeds, only=args.only, dry_run=True, match_compute=args.match_compute,
        foundation=foundation,
    )  # fmt: skip
    specs = table_specs(
        args.name, args.seeds, args.scale, args.only, ctx.overrides, args.match_compute, foundation
    )
    n = args.jobs or len({s.run_id for s in specs})
    todo = [s for s in specs if not run_done(args.out, s)]
    shards = [(i, n) for i in range(n) if any(not run_done(args.out, s) for s in select_shard(specs, (i, n)))]
    training = [s for s in todo if s.evaluation != "profile"]
    if training and not args.dry_run:
        check_inputs(args.name, ctx, need_training=True)
        for dataset in sorted({s.dataset for s in training}):  # made once here, not raced by the jobs
            ensure_split(ctx, dataset)
    work = {"command": "experiment", "table": args.name, "seeds": args.seeds, "scale": args.scale,
            "only": args.only, "overrides": list(args.overrides), "match_compute": args.match_compute,
            "foundation": list(foundation)}  # fmt: skip
    note = (f"when they have finished: cmafnet experiment {args.name} --out {args.out} --aggregate-only (same --scale, "
            "--seeds, --only, --set) builds the table; resubmitting the command reruns only unfinished runs")  # fmt: skip
    return launch(
        args, out=args.out, label=args.name, shards=shards, work=work, slurm_note=note, no_aggregate=True
    )


def _work_lines(out: Path, work: dict[str, Any]) -> list[str]:
    """What ``out`` holds of the table a submission was for (nothing for other commands' submissions)."""
    if work.get("command") != "experiment":
        return []
    from cmafnet.experiments.runner import run_states, table_specs

    specs = table_specs(work["table"], work["seeds"], work["scale"], work["only"], tuple(work["overrides"]),
                        work["match_compute"], tuple(work.get("foundation", ())))  # fmt: skip
    c = run_states(out, specs)
    return [
        f"{work['table']} ({work['scale']}): {sum(c.values())} runs: "
        + ", ".join(f"{v} {k}" for k, v in c.items())
    ]
