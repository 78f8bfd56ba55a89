"""Run a table: expand, pick this shard, skip finished runs, resume unfinished ones, evaluate.

Layout under ``--out``::

    runs/<config_key>/seed<k>/      a cmafnet run folder (cmafnet.run) + experiment.json
                                    + result_<evaluation>.json (what the tables read)
    runs/<config_key>/profile/      Table 8: result_profile.json
    <table>/table.md|csv|json, <table>/figure.png   aggregated over whatever runs are finished

A run folder is shared by every table that needs the same training (same base config, overrides,
seed and dataset); ``experiment.json`` records its fingerprint and a mismatch is an error rather
than a silent reuse.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from cmafnet.config import load_config
from cmafnet.errors import ConfigError, RunFolderError
from cmafnet.experiments.spec import RunSpec, Scale, select_shard
from cmafnet.experiments.tables import expand, get_table
from cmafnet.run import CONFIG_FILE, LAST_CHECKPOINT, META_FILE, METRICS_FILE, SPLIT_FILE, write_json

log = logging.getLogger(__name__)

EXPERIMENT_FILE = "experiment.json"


@dataclass
class Context:
    """Where the data is and where runs go."""

    out: Path
    store: Path | None = None  # IDC store (training of idc tables)
    split: Path | None = None
    breakhis_store: Path | None = None  # zero-shot target and 8-class training store
    breakhis_split: Path | None = None
    device: str = "auto"
    scale: Scale = "paper"
    overrides: tuple[str, ...] = ()  # --set for every run (part of each run's fingerprint)


TrainFn = Callable[[RunSpec, Path, Context, bool], None]  # (spec, run_dir, ctx, resume)
EvalFn = Callable[[RunSpec, Path, Context], dict]  # -> result document
ProfileFn = Callable[[RunSpec, Path, Context], dict]


@dataclass
class Summary:
    table: str
    total: int  # distinct runs of the table
    selected: int  # in this shard (after --only)
    trained: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # finished before this call
    evaluated: list[str] = field(default_factory=list)
    planned: list[str] = field(default_factory=list)  # --dry-run


def run_dir_of(out: Path, spec: RunSpec) -> Path:
    return Path(out) / "runs" / spec.run_id


def result_path(run_dir: Path, spec: RunSpec) -> Path:
    return run_dir / f"result_{spec.evaluation}.json"


def training_status(run_dir: Path) -> str:
    """``finished`` | ``partial`` (a checkpoint or run.json exists) | ``missing``."""
    meta = run_dir / META_FILE
    if meta.exists():
        try:
            status = json.loads(meta.read_text()).get("status")
        except json.JSONDecodeError:
            status = None
        if status == "finished":
            return "finished"
        return "partial"
    return "partial" if (run_dir / LAST_CHECKPOINT).exists() else "missing"


def _clear_unstarted(run_dir: Path) -> None:
    """A run killed before its first checkpoint: remove its start files so training starts afresh."""
    for name in (META_FILE, CONFIG_FILE, SPLIT_FILE, METRICS_FILE):
        if (run_dir / name).exists():
            log.warning("%s: no checkpoint to resume; starting the run again", run_dir)
            (run_dir / name).unlink()


def _claim(run_dir: Path, spec: RunSpec) -> None:
    """Write or check ``experiment.json`` so a folder is never reused for a different training."""
    path = run_dir / EXPERIMENT_FILE
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("fingerprint") != spec.fingerprint:
            raise RunFolderError(
                f"{run_dir}: holds a different run (fingerprint {old.get('fingerprint')} != {spec.fingerprint}); "
                "use another --out or remove the folder"
            )
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, spec.to_dict())


def table_specs(
    name: str, seeds: int, scale: Scale, only: list[str] | None = None, overrides: tuple[str, ...] = ()
) -> list[RunSpec]:
    """All runs of a table, optionally filtered by glob patterns on the run id (``resnet50*``).

    ``overrides`` (``--set``) are appended to every run's overrides, so they are validated with
    the run's config and change its fingerprint (a folder trained without them is not reused).
    """
    specs = [replace(s, overrides=(*s.overrides, *overrides)) for s in expand(name, seeds, scale)]
    if only:
        specs = [s for s in specs if any(fnmatch(s.run_id, p) or fnmatch(s.row, p) for p in only)]
        if not specs:
            raise ConfigError(f"--only {' '.join(only)} matches no run of {name}")
    return specs


def run_table(
    name: str,
    ctx: Context,
    *,
    seeds: int = 5,
    shard: tuple[int, int] = (0, 1),
    only: list[str] | None = None,
    dry_run: bool = False,
    train_fn: TrainFn | None = None,
    eval_fn: EvalFn | None = None,
    profile_fn: ProfileFn | None = None,
) -> Summary:
    """Do this shard's runs of table ``name`` (train/resume, evaluate), skipping finished work.

    Every run is independent: an interrupted call is simply repeated; finished runs are skipped
    (``run.json`` status ``finished`` and a result file), unfinished ones resume from their
    checkpoint.
    """
    from cmafnet.experiments import execute

    train_fn = train_fn or execute.train_run
    eval_fn = eval_fn or execute.evaluate_spec
    profile_fn = profile_fn or execute.profile_spec
    get_table(name)
    specs = table_specs(name, seeds, ctx.scale, only, ctx.overrides)
    mine = select_shard(specs, shard)
    summary = Summary(name, len({s.run_id for s in specs}), len(mine))
    for spec in mine:  # every config must validate before any work starts
        load_config(spec.base, list(spec.overrides))
    if not dry_run:
        execute.check_inputs(name, ctx, need_training=any(s.evaluation != "profile" for s in mine))
    for spec in mine:
        run_dir = run_dir_of(ctx.out, spec)
        res = result_path(run_dir, spec)
        if spec.evaluation == "profile":
            if res.exists():
                summary.skipped.append(spec.run_id)
                continue
            if dry_run:
                summary.planned.append(f"profile {spec.run_id}")
                continue
            _claim(run_dir, spec)
            write_json(res, profile_fn(spec, run_dir, ctx))
            summary.evaluated.append(spec.run_id)
            continue
        status = training_status(run_dir)
        if status == "finished" and res.exists():
            summary.skipped.append(spec.run_id)
            continue
        if dry_run:
            what = {"finished": "evaluate", "partial": "resume", "missing": "train"}[status]
            summary.planned.append(f"{what} {spec.run_id}")
            continue
        _claim(run_dir, spec)
        if status != "finished":
            resume = (run_dir / LAST_CHECKPOINT).exists()
            if not resume:
                _clear_unstarted(run_dir)
            log.info("%s %s", "resuming" if resume else "training", spec.run_id)
            train_fn(spec, run_dir, ctx, resume)
            (summary.resumed if resume else summary.trained).append(spec.run_id)
            if training_status(run_dir) != "finished":
                raise RunFolderError(f"{run_dir}: training returned but run.json status is not 'finished'")
        write_json(res, {"spec": spec.to_dict(), **eval_fn(spec, run_dir, ctx)})
        summary.evaluated.append(spec.run_id)
    return summary


def load_results(
    name: str, out: Path, seeds: int, scale: Scale, overrides: tuple[str, ...] = ()
) -> list[tuple[RunSpec, dict | None]]:
    """Every run of the table with its result document (``None`` while not done).

    A result whose fingerprint differs (another ``--set``) counts as not done.
    """
    rows: list[tuple[RunSpec, Any]] = []
    for spec in table_specs(name, seeds, scale, None, overrides):
        p = result_path(run_dir_of(out, spec), spec)
        doc = json.loads(p.read_text()) if p.exists() else None
        if doc is not None and doc.get("spec", {}).get("fingerprint") not in (None, spec.fingerprint):
            doc = None
        rows.append((spec, doc))
    return rows
