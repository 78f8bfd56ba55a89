"""Run a command's shards as scheduler jobs through submitit: a Slurm array, or local processes.

Each job runs one shard ``i/n`` by calling the command's own code with ``--shard i/n`` (the parsed
arguments, shard set), so it skips finished work and resumes unfinished work exactly as a shard run by
hand; resubmitting the same command submits only the shards that still have work. Layout under the
command's ``--out``::

    jobs/<label>-<UTC time>/submission.json      launcher, options, every shard, job ids and log paths
    jobs/<label>-<UTC time>/logs/                submitit's folder: <job id>_0_log.out / .err
    jobs/<label>-<UTC time>/state/<i>-of-<n>.json   written by the job: running, then finished / failed

``--status`` reads these files only (it queries no scheduler): a job is waiting (no state file yet),
running, finished (exit 0) or failed (an error or another exit code). A job the scheduler killed (time
limit, preemption, node failure) cannot record its end and stays "running"; its log says why.

Options come from a YAML file (``--launcher-config``: the keys of :class:`LaunchOptions`, ``time`` as
Slurm writes it, ``sbatch`` a mapping of extra ``#SBATCH`` options, ``setup`` shell lines run first)
with flags taking precedence. The local launcher runs ``array_parallelism`` jobs at once (default 1,
or one per GPU group), giving each its own GPUs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cmafnet.errors import CmafnetError, ConfigError
from cmafnet.files import write_json

log = logging.getLogger(__name__)

LAUNCHERS = ("local", "slurm")
JOBS_DIR = "jobs"
INSTALL_HINT = "pip install 'cmafnet[slurm]' (or pip install submitit)"
SLURM_TIME_MIN = 24 * 60  # default per job; a job cut short resumes when the command is resubmitted
LOCAL_TIME_MIN = 365 * 24 * 60  # local jobs: no practical limit
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


@dataclass(frozen=True)
class LaunchOptions:
    """Where and how the jobs run (None: the launcher's default)."""

    launcher: str
    time_min: int | None = None
    partition: str | None = None
    account: str | None = None
    gpus_per_job: int | None = None  # Slurm default 1; local default 1 when CUDA is there, else 0
    cpus_per_job: int | None = None
    mem_gb: int | None = None
    array_parallelism: int | None = None  # jobs running at once
    sbatch: dict[str, Any] = field(default_factory=dict)  # extra #SBATCH options, name -> value (True: flag)
    setup: tuple[str, ...] = ()  # shell lines before the job (module load ..., source venv)


def require_submitit() -> Any:
    """The submitit module, or :class:`ConfigError` saying how to install it."""
    try:
        import submitit
    except ImportError:
        raise ConfigError(f"--launcher needs submitit: {INSTALL_HINT}") from None
    return submitit


def parse_time(text: str | int, where: str = "--time") -> int:
    """Minutes from a Slurm time: ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M`` or ``D-H:M:S``."""
    m = _TIME.match(str(text).strip())
    if m is None:
        raise ConfigError(f"{where} '{text}': expected minutes or [D-]HH:MM[:SS] as Slurm writes it")
    d, a, b, c = (int(x) if x else None for x in m.groups())
    if d is not None:  # D-H[:M[:S]]
        seconds = ((d * 24 + a) * 60 + (b or 0)) * 60 + (c or 0)
    else:  # M, M:S, H:M:S
        seconds = a * 60 + (b or 0) if c is None else (a * 60 + b) * 60 + c
    if seconds <= 0:
        raise ConfigError(f"{where} '{text}': must be more than zero")
    return math.ceil(seconds / 60)


def _sbatch_option(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` (``--constraint=a100``) or a bare flag ``KEY`` (``exclusive``)."""
    key, eq, value = text.removeprefix("#SBATCH").strip().removeprefix("--").partition("=")
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", key.strip()):
        raise ConfigError(
            f"--sbatch '{text}': expected an sbatch option as KEY=VALUE or KEY (e.g. constraint=a100)"
        )
    return key.strip(), value.strip() if eq else True


_FILE_KEYS = {
    "partition": str, "account": str, "time": (str, int), "gpus_per_job": int, "cpus_per_job": int,
    "mem_gb": int, "array_parallelism": int, "sbatch": dict, "setup": list,
}  # fmt: skip


def _read_file(path: Path) -> dict[str, Any]:
    import yaml

    from cmafnet.config import yaml_load
    from cmafnet.data.safety import read_text
    from cmafnet.registry import suggest

    try:
        doc = yaml_load(read_text(path, "launcher config")) or {}
    except CmafnetError as err:  # missing, not a regular file, not UTF-8: a bad option value
        raise ConfigError(f"--launcher-config {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: expected a mapping of launcher options")
    for key, value in doc.items():
        if key not in _FILE_KEYS:
            raise ConfigError(f"{path}: {key}: unknown key.{suggest(str(key), list(_FILE_KEYS))}")
        if not isinstance(value, _FILE_KEYS[key]) or isinstance(value, bool):
            raise ConfigError(
                f"{path}: {key}: expected {getattr(_FILE_KEYS[key], '__name__', 'a time')}, got {value!r}"
            )
    if not all(isinstance(x, str) for x in doc.get("setup", [])):
        raise ConfigError(f"{path}: setup: expected a list of shell lines")
    return doc


def load_options(launcher: str, config: Path | None, flags: dict[str, Any]) -> LaunchOptions:
    """Options from the YAML file ``config`` (if any) overridden by the flags that were given.

    ``flags`` holds the flag values by :class:`LaunchOptions` field (``time`` as text, ``sbatch`` as a
    list of ``KEY=VALUE``); None means not given.

    Raises:
        ConfigError: an unknown key or a wrong type in the file, a bad time, sbatch option or count.
    """
    doc = _read_file(config) if config is not None else {}
    sbatch = {str(k): v for k, v in (doc.pop("sbatch", None) or {}).items()}
    sbatch.update(_sbatch_option(s) for s in flags.pop("sbatch", None) or [])
    merged = {**doc, **{k: v for k, v in flags.items() if v is not None}}
    t = merged.pop("time", None)
    for key in ("gpus_per_job", "cpus_per_job", "mem_gb", "array_parallelism"):
        low = 0 if key == "gpus_per_job" else 1
        if merged.get(key) is not None and merged[key] < low:
            raise ConfigError(f"{key.replace('_', '-')} must be >= {low}, got {merged[key]}")
    return LaunchOptions(
        launcher, time_min=None if t is None else parse_time(t), sbatch=sbatch,
        setup=tuple(merged.pop("setup", ())), **merged,
    )  # fmt: skip


def _executor(logs: Path, opts: LaunchOptions, label: str) -> Any:
    submitit = require_submitit()
    if opts.launcher == "local":
        ex = submitit.LocalExecutor(folder=logs)
        ex.update_parameters(
            timeout_min=opts.time_min or LOCAL_TIME_MIN, **({"setup": list(opts.setup)} if opts.setup else {})
        )
        return ex
    try:
        ex = submitit.SlurmExecutor(folder=logs)
    except RuntimeError:  # submitit looks for srun
        raise ConfigError(
            "--launcher slurm: no Slurm here (srun not found); submit from the cluster's login node"
        ) from None
    params = {
        "job_name": f"cmafnet-{label}", "time": opts.time_min or SLURM_TIME_MIN, "partition": opts.partition,
        "account": opts.account, "gpus_per_node": 1 if opts.gpus_per_job is None else opts.gpus_per_job,
        "cpus_per_task": opts.cpus_per_job, "mem": f"{opts.mem_gb}GB" if opts.mem_gb else None,
        "array_parallelism": opts.array_parallelism, "additional_parameters": opts.sbatch or None,
        "setup": list(opts.setup) or None,
    }  # fmt: skip
    ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return ex


def state_path(folder: Path, shard: tuple[int, int]) -> Path:
    return folder / "state" / f"{shard[0]}-of-{shard[1]}.json"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def submit(
    out: Path,
    label: str,
    shards: Sequence[tuple[int, int]],
    make_args: Callable[[tuple[int, int]], argparse.Namespace],
    opts: LaunchOptions,
    work: dict[str, Any],
    echo: Callable[[str], None] = print,
) -> Path:
    """Submit one job per shard; the local launcher also waits for them. Returns the submission folder.

    ``work`` describes what the jobs do (recorded for ``--status``).
    """
    folder = Path(out) / JOBS_DIR / f"{label}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S-%f}"
    executor = _executor(folder / "logs", opts, label)
    record: dict[str, Any] = {
        "label": label, "launcher": opts.launcher, "created": _now(), "options": asdict(opts), "work": work,
        "shards": [list(s) for s in shards], "jobs": [],
    }  # fmt: skip
    write_json(folder / "submission.json", record)

    def add(job: Any, shard: tuple[int, int]) -> None:
        record["jobs"].append({"shard": list(shard), "job_id": str(job.job_id), "stdout": str(job.paths.stdout),
                               "stderr": str(job.paths.stderr)})  # fmt: skip
        write_json(folder / "submission.json", record)

    if opts.launcher == "slurm":
        with executor.batch():  # one array job
            jobs = [executor.submit(run_shard, make_args(s), str(state_path(folder, s))) for s in shards]
        for job, s in zip(jobs, shards):
            add(job, s)
        echo(f"submitted {len(jobs)} Slurm jobs: {' '.join(str(j.job_id) for j in jobs)}")
    else:
        _run_local(
            executor,
            folder,
            shards,
            make_args,
            opts,
            lambda j, s: (add(j, s), echo(f"job {j.job_id}: shard {s[0]}/{s[1]}")),
        )
    echo(f"logs: {folder / 'logs'} (<job id>_0_log.out, <job id>_0_log.err); job states: {folder / 'state'}")
    return folder


def _run_local(
    executor: Any,
    folder: Path,
    shards: Sequence[tuple[int, int]],
    make_args: Callable[[tuple[int, int]], argparse.Namespace],
    opts: LaunchOptions,
    started: Callable[[Any, tuple[int, int]], Any],
) -> None:
    """Run the jobs as local processes, ``array_parallelism`` at a time, each on its own GPUs."""
    import torch

    n_gpus = torch.cuda.device_count()
    per_job = opts.gpus_per_job if opts.gpus_per_job is not None else min(1, n_gpus)
    slots = opts.array_parallelism or (max(1, n_gpus // per_job) if per_job else 1)
    if per_job * slots > n_gpus and per_job:
        raise ConfigError(
            f"{slots} local jobs x --gpus-per-job {per_job} needs {per_job * slots} GPUs; {n_gpus} visible"
        )
    pending, running = list(shards), {}
    try:
        while pending or running:
            for slot in range(slots):
                if slot in running or not pending:
                    continue
                shard = pending.pop(0)
                gpus = tuple(range(slot * per_job, (slot + 1) * per_job))
                executor.update_parameters(gpus_per_node=per_job, visible_gpus=gpus)
                running[slot] = executor.submit(run_shard, make_args(shard), str(state_path(folder, shard)))
                started(running[slot], shard)
            time.sleep(0.2)
            running = {k: j for k, j in running.items() if not j.done()}
    except KeyboardInterrupt:
        for job in running.values():
            job.cancel()  # SIGINT: training saves a checkpoint, a cohort stops between tiles
        raise


def run_shard(args: argparse.Namespace, state_file: str) -> int:
    """One job: the command with ``--shard i/n`` (``args.func(args)``), its state kept in ``state_file``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    path = Path(state_file)
    try:  # the scheduler's id (Slurm: <array>_<task>; local: the process id)
        job_id = str(require_submitit().JobEnvironment().job_id)
    except Exception:  # called outside a submitit job (tests, a debugger)
        job_id = ""
    info = {"shard": args.shard, "job_id": job_id, "host": socket.gethostname(), "started": _now()}
    write_json(path, {**info, "state": "running"})
    error = None
    try:
        code = int(args.func(args) or 0)
    except CmafnetError as err:
        code, error = err.exit_code, str(err)
        print(f"cmafnet {args.command}: error: {err}", file=sys.stderr)
    except BaseException as err:  # a crash or an interrupt: recorded, then re-raised for the log
        write_json(path, {**info, "state": "failed", "exit_code": None, "ended": _now(),
                          "error": f"{type(err).__name__}: {str(err).strip()[:200]}"})  # fmt: skip
        raise
    state = "finished" if code == 0 else "failed"
    write_json(path, {**info, "state": state, "exit_code": code, "error": error, "ended": _now()})
    return code


def job_states(folder: Path) -> list[dict[str, Any]]:
    """Every shard of a submission with its state: waiting, running, finished or failed."""
    doc = json.loads((folder / "submission.json").read_text())
    jobs = {tuple(j["shard"]): j for j in doc["jobs"]}
    out = []
    for s in doc["shards"]:
        p = state_path(folder, tuple(s))
        st = json.loads(p.read_text()) if p.exists() else {"state": "waiting"}
        out.append({**jobs.get(tuple(s), {}), **st, "shard": f"{s[0]}/{s[1]}"})
    return out


def status_lines(out: Path, work: Callable[[dict[str, Any]], list[str]] | None = None) -> list[str]:
    """A summary of every submission under ``out/jobs`` (oldest first) and, for the latest submission of
    each label, ``work(record)``: what the output folder holds."""
    subs = sorted((Path(out) / JOBS_DIR).glob("*/submission.json"), key=lambda p: p.parent.name)
    if not subs:
        return [f"{out}: no submitted jobs ({JOBS_DIR}/*/submission.json)"]
    lines, latest = [], {}
    for path in subs:
        doc = json.loads(path.read_text())
        states = job_states(path.parent)
        c = Counter(s["state"] for s in states)
        lines.append(
            f"{path.parent.name} ({doc['launcher']}, {len(states)} jobs, logs {path.parent / 'logs'}): "
            + ", ".join(f"{c.get(k, 0)} {k}" for k in ("finished", "running", "failed", "waiting"))
        )
        for s in states:
            if s["state"] == "failed":
                why = s.get("error") or f"exit {s.get('exit_code')}"
                lines.append(
                    f"  failed: shard {s['shard']} (job {s.get('job_id')}): {why}; log {s.get('stderr')}"
                )
        latest[doc["label"]] = doc
    if work is not None:
        for doc in latest.values():
            lines += work(doc["work"])
    return lines
