"""``--launcher local|slurm`` and ``--status``, shared by ``experiment`` and cohort ``wsi``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cmafnet.cli._common import non_negative_int, positive_int
from cmafnet.errors import ConfigError

# flag dest -> LaunchOptions field (None: the field of the same name)
_OPTION_FLAGS = {"partition": None, "account": None, "time": None, "gpus_per_job": None, "cpus_per_job": None,
                 "mem_gb": None, "array_parallelism": None, "sbatch": None}  # fmt: skip


def add_launcher_args(p: argparse.ArgumentParser, unit: str) -> None:
    """The scheduler flags; ``unit`` names what a shard holds (``run``, ``slide``)."""
    g = p.add_argument_group(
        "scheduler (submitit: pip install 'cmafnet[slurm]'; see docs/cluster.md)",
        f"Each job runs one --shard i/N of the {unit}s with the same skip/resume logic; resubmitting the "
        "same command submits only shards with work left. Options come from --launcher-config YAML, "
        "flags override it.",
    )
    g.add_argument("--launcher", choices=("local", "slurm"),
                   help="submit the shards as jobs: 'slurm' (a job array) or 'local' (processes here, waited for)")  # fmt: skip
    g.add_argument(
        "--jobs", type=positive_int, metavar="N", help=f"number of shards / jobs (default one per {unit})"
    )
    g.add_argument("--launcher-config", type=Path, metavar="YAML", help="launcher options (keys as the flags, "
                   "with underscores; 'sbatch' a mapping, 'setup' a list of shell lines)")  # fmt: skip
    g.add_argument("--partition", help="Slurm partition")
    g.add_argument("--account", help="Slurm account")
    g.add_argument(
        "--time", metavar="T", help="time limit per job: minutes or [D-]HH:MM:SS (Slurm default 24:00:00)"
    )
    g.add_argument(
        "--gpus-per-job", type=non_negative_int, metavar="G", help="GPUs per job (Slurm default 1)"
    )
    g.add_argument("--cpus-per-job", type=positive_int, metavar="C")
    g.add_argument("--mem-gb", type=positive_int, metavar="GB", help="memory per job")
    g.add_argument("--array-parallelism", type=positive_int, metavar="P",
                   help="jobs running at once (Slurm array %%P; local default 1, or one per GPU group)")  # fmt: skip
    g.add_argument("--sbatch", action="append", metavar="KEY=VALUE",
                   help="extra sbatch option, e.g. constraint=a100 or qos=long (repeatable)")  # fmt: skip
    g.add_argument("--status", action="store_true",
                   help="summarise the jobs submitted to --out (finished, running, failed, waiting) and what is done")  # fmt: skip


def check_launcher_args(args: argparse.Namespace) -> None:
    """Refuse scheduler options without ``--launcher`` and a hand-picked ``--shard`` with it."""
    if args.launcher is None:
        given = [
            f"--{k.replace('_', '-')}"
            for k in ("jobs", "launcher_config", *_OPTION_FLAGS)
            if getattr(args, k)
        ]
        if given:
            raise ConfigError(f"{given[0]} goes with --launcher local|slurm")
    elif args.shard is not None:
        raise ConfigError(
            "--shard picks one shard by hand; --launcher submits every shard (--jobs N): give one"
        )


def print_status(out: Path | None, work: Callable[[dict[str, Any]], list[str]]) -> int:
    from cmafnet.experiments.launch import status_lines

    if out is None:
        raise ConfigError("--status needs --out (the folder the jobs were submitted for)")
    for line in status_lines(out, work):
        print(line)
    return 0


def launch(
    args: argparse.Namespace,
    *,
    out: Path,
    label: str,
    shards: list[tuple[int, int]],
    work: dict[str, Any],
    slurm_note: str,
    **job_changes: Any,
) -> list[str] | None:
    """Submit ``shards`` (those with work left) as jobs running ``args.func`` with ``--shard i/n``.

    ``job_changes`` are set on each job's arguments (e.g. no aggregation in the jobs). Returns None
    when nothing is to follow here (submitted to Slurm, ``slurm_note`` printed: what to do once the jobs
    have finished; or ``--dry-run``), else one line per failed local job, printed (none when no shard
    had work left).
    """
    from cmafnet.experiments.launch import job_states, load_options, require_submitit, submit

    require_submitit()
    flags = {k: getattr(args, k) for k in _OPTION_FLAGS}
    opts = load_options(args.launcher, args.launcher_config, flags)
    dry_run = getattr(args, "dry_run", False)
    if not shards:
        print("nothing to submit: every shard is finished")
        return None if dry_run else []
    n = shards[0][1]
    if dry_run:
        print(
            f"would submit {len(shards)} {args.launcher} jobs: shards {' '.join(f'{i}/{n}' for i, _ in shards)}"
        )
        return None

    def job_args(shard: tuple[int, int]) -> argparse.Namespace:
        # a job is the plain command with --shard i/n: no scheduler options left for it to refuse
        changes = {**dict.fromkeys(("jobs", "launcher_config", *_OPTION_FLAGS)), "launcher": None, "status": False,
                   "shard": f"{shard[0]}/{shard[1]}", **job_changes}  # fmt: skip
        return argparse.Namespace(**{**vars(args), **changes})

    folder = submit(out, label, shards, job_args, opts, work)
    print(f"status: add --status to this command (or run it with --out {out} --status)")
    if args.launcher == "slurm":
        print(slurm_note)
        return None
    failed = [
        f"job {s.get('job_id')} (shard {s['shard']}) failed: {s.get('error') or 'exit ' + str(s.get('exit_code'))}; "
        f"log {s.get('stderr')}"
        for s in job_states(folder)
        if s["state"] != "finished"
    ]
    for line in failed:
        print(line)
    return failed
