"""Run a table: expand, pick this shard, skip finished runs, resume unfinished ones, evaluate.

Layout under ``--out``::

    runs/<config_key>/seed<k>/      a cmafnet run folder (cmafnet.run) + experiment.json
                                    + result_<evaluation>.json (what the tables read)
    runs/<config_key>/profile/      Table 8: result_profile.json
    <table>/table.md|csv|json, <table>/figure.png   aggregated over whatever runs are finished

A run folder is shared by every table that needs the same training (same base config, overrides,
seed and dataset); ``experiment.json`` records its fingerprint and a mismatch is an error rather
than a silent reuse.

With ``match_compute`` a baseline run is also trained at the training MACs its CMAF-Net run recorded
(``runs/<row>__cmafnet_compute[__imb<ratio>]/seed<k>``, ``train.budget.match`` = that run's folder).
Such a run starts only once its reference has finished; until then it is reported as waiting (another
shard may still be training the reference), never trained on another budget.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from fnmatch import fnmatch
from pathlib import Path

from cmafnet.config import BudgetConfig, Config, load_config
from cmafnet.errors import ConfigError, RunFolderError
from cmafnet.experiments.paper_tables import expand
from cmafnet.experiments.results import Invalid, ResultDoc, read_result
from cmafnet.experiments.spec import RunSpec, Scale, select_shard
from cmafnet.files import FolderInUse, hold_folder
from cmafnet.run import (
    CONFIG_FILE,
    LAST_CHECKPOINT,
    META_FILE,
    METRICS_FILE,
    SPLIT_FILE,
    cost_total,
    read_meta,
    write_json,
)

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
    waiting: list[str] = field(default_factory=list)  # compute-matched runs whose reference is not finished
    busy: list[str] = field(default_factory=list)  # run folders another live process holds (left for it)


def run_dir_of(out: Path, spec: RunSpec | str) -> Path:
    """The run folder of a spec (or of a run id) under the experiment folder ``out``."""
    return Path(out) / "runs" / (spec if isinstance(spec, str) else spec.run_id)


def training_config(spec: RunSpec, out: Path, extra: tuple[str, ...] = ()) -> Config:
    """The config a run trains with: its base and overrides (+ ``extra``), and for a compute-matched run
    ``train.budget.match`` = its reference's run folder (set here, not as an override, so the run's
    fingerprint does not depend on where ``out`` lies).

    Raises:
        ConfigError: an invalid override, or a compute-matched run given a budget of its own by ``--set``.
    """
    cfg = load_config(spec.base, [*spec.overrides, *extra])
    if spec.match is not None:
        if cfg.train.budget is not None:
            raise ConfigError(
                f"{spec.run_id}: --match-compute sets train.budget itself; drop the --set train.budget..."
            )
        cfg.train.budget = BudgetConfig(match=str(run_dir_of(out, spec.match)))
    return cfg


def result_path(run_dir: Path, spec: RunSpec) -> Path:
    return run_dir / f"result_{spec.evaluation}.json"


def training_status(run_dir: Path) -> str:
    """``finished`` | ``partial`` (a checkpoint or run.json exists) | ``missing``."""
    if (run_dir / META_FILE).exists():
        try:
            status = read_meta(run_dir).get("status")
        except RunFolderError:  # damaged: the run is redone, and resuming it names the field
            status = None
        return "finished" if status == "finished" else "partial"
    return "partial" if (run_dir / LAST_CHECKPOINT).exists() else "missing"


def run_done(out: Path, spec: RunSpec) -> bool:
    """A run with nothing left to do: its result exists and (unless it is a profile) its training finished."""
    run_dir = run_dir_of(out, spec)
    if not result_path(run_dir, spec).exists():
        return False
    return spec.evaluation == "profile" or training_status(run_dir) == "finished"


def run_states(out: Path, specs: list[RunSpec]) -> dict[str, int]:
    """How many distinct runs are finished, started (a checkpoint, or trained but not evaluated) or not
    started: what ``--status`` reports."""
    counts = {"finished": 0, "started": 0, "not started": 0}
    for spec in {s.run_id: s for s in specs}.values():
        if run_done(out, spec):
            counts["finished"] += 1
        elif spec.evaluation != "profile" and training_status(run_dir_of(out, spec)) != "missing":
            counts["started"] += 1
        else:
            counts["not started"] += 1
    return counts


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
        try:
            old = json.loads(path.read_text())
        except ValueError as err:
            raise RunFolderError(
                f"{path}: not readable JSON ({err}); remove the run folder to redo it"
            ) from None
        fingerprint = old.get("fingerprint") if isinstance(old, dict) else None
        if fingerprint != spec.fingerprint:
            raise RunFolderError(
                f"{run_dir}: holds a different run (fingerprint {fingerprint} != {spec.fingerprint}); "
                "use another --out or remove the folder"
            )
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, spec.to_dict())


def table_specs(
    name: str,
    seeds: int,
    scale: Scale,
    only: list[str] | None = None,
    overrides: tuple[str, ...] = (),
    match_compute: bool = False,
    foundation: tuple[str, ...] = (),
) -> list[RunSpec]:
    """All runs of a table, optionally filtered by glob patterns on the run id (``resnet50*``).

    ``overrides`` (``--set``) are appended to every run's overrides, so they are validated with
    the run's config and change its fingerprint (a folder trained without them is not reused).
    ``match_compute`` adds the baseline runs at CMAF-Net's compute (:func:`~.tables.expand`).
    """
    specs = [
        replace(s, overrides=(*s.overrides, *overrides))
        for s in expand(name, seeds, scale, match_compute, foundation)
    ]
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
    match_compute: bool = False,
    foundation: tuple[str, ...] = (),
    train_fn: TrainFn | None = None,
    eval_fn: EvalFn | None = None,
    profile_fn: ProfileFn | None = None,
) -> Summary:
    """Do this shard's runs of table ``name`` (train/resume, evaluate), skipping finished work.

    Every run is independent: an interrupted call is simply repeated; finished runs are skipped
    (``run.json`` status ``finished`` and a result file), unfinished ones resume from their
    checkpoint. A compute-matched run (``match_compute``) whose reference has not finished is listed
    in ``Summary.waiting`` and left for a later call; a run whose folder another live process holds
    (another shard or table on the same ``--out``) is listed in ``Summary.busy`` and left to it.
    """
    from cmafnet.experiments import execute

    train_fn = train_fn or execute.train_run
    eval_fn = eval_fn or execute.evaluate_spec
    profile_fn = profile_fn or execute.profile_spec
    specs = table_specs(name, seeds, ctx.scale, only, ctx.overrides, match_compute, foundation)
    # references before the runs that match their compute (stable: table order otherwise)
    mine = sorted(select_shard(specs, shard), key=lambda s: s.match is not None)
    summary = Summary(name, len({s.run_id for s in specs}), len(mine))
    for spec in mine:  # every config must validate before any work starts
        training_config(spec, ctx.out)
    if not dry_run:
        execute.check_inputs(name, ctx, need_training=any(s.evaluation != "profile" for s in mine))
    planned = {s.run_id for s in mine} if dry_run else set()
    work = None if dry_run else (train_fn, eval_fn, profile_fn)
    for spec in mine:
        run_dir = run_dir_of(ctx.out, spec)
        with ExitStack() as held:  # each run folder, not --out: the shards of a table share --out
            if work is not None:
                try:
                    held.enter_context(hold_folder(run_dir, "cmafnet experiment"))
                except FolderInUse as err:
                    summary.busy.append(f"{spec.run_id} (in use by {err.holder})")
                    continue
            _one_run(spec, run_dir, ctx, summary, planned, work)
    return summary


def _one_run(
    spec: RunSpec, run_dir: Path, ctx: Context, summary: Summary, planned: set[str],
    work: tuple[TrainFn, EvalFn, ProfileFn] | None,
) -> None:  # fmt: skip
    """Skip, plan (``work`` None: ``--dry-run``), train/resume, evaluate or profile one run; the caller
    holds ``run_dir`` when there is work."""
    res = result_path(run_dir, spec)
    if spec.evaluation == "profile":
        if res.exists():
            summary.skipped.append(spec.run_id)
        elif work is None:
            summary.planned.append(f"profile {spec.run_id}")
        else:
            _claim(run_dir, spec)
            write_json(res, work[2](spec, run_dir, ctx))
            summary.evaluated.append(spec.run_id)
        return
    status = training_status(run_dir)
    if status == "finished" and res.exists():
        summary.skipped.append(spec.run_id)
        return
    wait = _reference_pending(spec, ctx.out, status, planned)
    if wait is not None:
        summary.waiting.append(f"{spec.run_id} waits for {spec.match} ({wait})")
        return
    if work is None:
        what = {"finished": "evaluate", "partial": "resume", "missing": "train"}[status]
        after = f" at the training MACs of {spec.match}" if spec.match and status != "finished" else ""
        summary.planned.append(f"{what} {spec.run_id}{after}")
        return
    train_fn, eval_fn, _ = work
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


def _reference_pending(spec: RunSpec, out: Path, status: str, planned: set[str]) -> str | None:
    """Why a compute-matched run cannot train yet (its reference is not finished), or None.

    A run already trained needs no reference; under ``--dry-run`` a reference planned in the same call
    (``planned``) will be finished by the time the run comes.
    """
    if spec.match is None or status == "finished" or spec.match in planned:
        return None
    ref = training_status(run_dir_of(out, spec.match))
    if ref == "finished":
        return None
    return {"partial": "started, not finished", "missing": "not started"}[ref]


def recorded_cost(run_dir: Path) -> dict | None:
    """``run.json``'s training cost totals (images, steps, passes, MACs, seconds; ``extraction_macs``: a
    probe's feature extraction, part of the MACs), or None."""
    try:
        meta = read_meta(run_dir)
    except RunFolderError:
        return None
    total = cost_total(meta)
    if total is None:
        return None
    return {**total, "extraction_macs": ((meta.get("cost") or {}).get("extraction") or {}).get("macs", 0)}


Result = ResultDoc | Invalid | None  # None: not done yet


def load_results(
    name: str,
    out: Path,
    seeds: int,
    scale: Scale,
    overrides: tuple[str, ...] = (),
    match_compute: bool = False,
    foundation: tuple[str, ...] = (),
) -> list[tuple[RunSpec, Result]]:
    """Every run of the table with its typed result (:func:`~.results.read_result`; None while not done).

    A result of another fingerprint (another ``--set``) counts as not done. Each document carries
    ``cost``: the training cost its run folder records (None for runs that predate cost records).
    """
    rows: list[tuple[RunSpec, Result]] = []
    for spec in table_specs(name, seeds, scale, None, overrides, match_compute, foundation):
        run_dir = run_dir_of(out, spec)
        p = result_path(run_dir, spec)
        res = read_result(p, recorded_cost(run_dir)) if p.exists() else None
        if isinstance(res, ResultDoc) and res.fingerprint not in (None, spec.fingerprint):
            res = None
        rows.append((spec, res))
    return rows
