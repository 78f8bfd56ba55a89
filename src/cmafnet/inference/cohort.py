"""Whole-slide inference over a cohort: one folder per slide, finished slides skipped, bad ones recorded.

The slide list comes from slide files, folders (searched recursively for slide extensions) and CSV
lists (a ``path`` column, relative to the CSV's folder; optional ``slide_id`` and ``label``). Layout
under ``out``::

    cohort.json              the run and the settings every slide folder was made with, and the slide
                             list of the last call (what ``--status`` counts)
    slides/<slide_id>/       one slide's outputs (:func:`cmafnet.inference.wsi.predict_slide`); its
                             ``summary.json`` is written last, so a folder with it is complete
    failed/<slide_id>.json   why a slide failed (removed once it succeeds)
    cohort.csv               one row per slide (:func:`write_cohort_csv`)

A slide whose folder lacks ``summary.json`` (an interrupted call) is removed and done again; a slide
that cannot be opened or fails while being processed is recorded with its reason and the cohort goes
on. The model is loaded once, and only when a slide needs work, so a rerun of a finished cohort does
nothing but read the folders.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import shutil
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cmafnet.data.safety import one_line
from cmafnet.errors import CmafnetError, InputDataError, RunFolderError
from cmafnet.inference.io import discover_inputs, read_csv_list
from cmafnet.inference.predict import Predictor
from cmafnet.inference.wsi import open_slide, predict_slide
from cmafnet.run import atomic_write_bytes, write_json

log = logging.getLogger(__name__)

# What OpenSlide reads as single files (DICOM is a folder of files: name one of them explicitly).
SLIDE_EXTENSIONS = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif")
COHORT_FILE, SUMMARY_CSV = "cohort.json", "cohort.csv"
SUMMARY_COLUMNS = (
    "slide_id", "path", "label", "status", "reason", "tissue_area_mm2", "positive_area_mm2",
    "positive_fraction", "prob_mean", "prob_top_k", "n_tiles", "n_classified", "n_not_assessable",
    "n_background", "seconds", "folder",
)  # fmt: skip
# The summary.json numbers a cohort row copies.
_FROM_SUMMARY = SUMMARY_COLUMNS[5:-1]
# A full or read-only disk fails every slide alike: stop instead of recording each one.
_FATAL_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT}


@dataclass(frozen=True)
class SlideItem:
    """One slide of the cohort: its folder name, its file and its label (1 positive, 0 negative)."""

    slide_id: str
    path: Path
    label: int | None = None


@dataclass(frozen=True)
class SlideOptions:
    """The settings that define a slide's outputs (recorded in ``cohort.json``; a mismatch is refused)."""

    level: int | None = None
    mpp: float | None = None
    tile: int | None = None
    threshold: float | None = None
    calibrate: str = "auto"
    top_k: int = 10
    adaptation: str = "raw"  # Adaptation.label() of the predictor (stain normalisation, TTA)


@dataclass
class CohortRun:
    """What one call did with its slides."""

    processed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # complete before this call
    failed: dict[str, str] = field(default_factory=dict)  # slide id -> reason


def is_cohort(inputs: Sequence[str | Path]) -> bool:
    """Several slides, a folder or a CSV list (one slide file keeps the single-slide layout)."""
    return len(inputs) != 1 or Path(inputs[0]).is_dir() or Path(inputs[0]).suffix.lower() == ".csv"


def _label(value: str, classes: Sequence[str], where: str) -> int | None:
    """A CSV label: empty (unlabelled), 0 / 1, or the run's class name (the second class is positive)."""
    v = value.strip()
    if not v:
        return None
    if v in ("0", "1"):
        return int(v)
    if len(classes) == 2 and v in classes:
        return list(classes).index(v)
    named = f" or one of the run's classes {list(classes)}" if len(classes) == 2 else ""
    raise InputDataError(f"{where}: label '{v}' is not 0, 1{named}")


def _read_csv(path: Path, classes: Sequence[str]) -> list[SlideItem]:
    items = []
    for k, row, q in read_csv_list(path, "CSV slide list"):
        if q is None:
            raise InputDataError(f"{path}: line {k}: empty path")
        sid = (row.get("slide_id") or "").strip() or q.stem
        items.append(SlideItem(sid, q, _label(row.get("label") or "", classes, f"{path}: line {k}")))
    return items


def read_cohort(inputs: Sequence[str | Path], classes: Sequence[str] = ()) -> list[SlideItem]:
    """The slide list from files, folders and CSV lists, in the order given.

    A named file that is missing or unreadable stays in the list (it fails with its reason when its
    turn comes). Slide ids are the CSV's ``slide_id`` or the file name without its extension.

    Raises:
        InputDataError: a CSV that is unreadable, lacks ``path`` or holds a bad label; a folder with no
            slide; two slides with one id; an id that cannot be a folder name; an empty list.
    """
    items: list[SlideItem] = []
    for raw in inputs:
        p = Path(raw)
        if p.suffix.lower() == ".csv" and not p.is_dir():
            items += _read_csv(p, classes)
            continue
        found = discover_inputs([p], extensions=SLIDE_EXTENSIONS)
        if p.is_dir() and not found:
            raise InputDataError(f"{p}: no slide in the folder (extensions {', '.join(SLIDE_EXTENSIONS)})")
        items += [SlideItem(q.stem, q) for q in found]
    if not items:
        raise InputDataError("no slide given")
    seen: dict[str, Path] = {}
    for it in items:
        if not it.slide_id or it.slide_id.startswith(".") or any(c in it.slide_id for c in "/\\\0"):
            raise InputDataError(f"{it.path}: slide id '{it.slide_id}' cannot be a folder name")
        if it.slide_id in seen:
            raise InputDataError(
                f"two slides with id '{it.slide_id}' ({seen[it.slide_id]}, {it.path}): "
                "give each a slide_id in a CSV list"
            )
        seen[it.slide_id] = it.path
    return items


def shard_items(items: Sequence[SlideItem], shard: tuple[int, int]) -> list[SlideItem]:
    """Slides ``k`` of the id-sorted list with ``k mod n == i`` (list order kept), like ``--shard``."""
    i, n = shard
    order = {sid: k for k, sid in enumerate(sorted(it.slide_id for it in items))}
    return [it for it in items if order[it.slide_id] % n == i]


def slide_dir(out: Path, slide_id: str) -> Path:
    return Path(out) / "slides" / slide_id


def failure_path(out: Path, slide_id: str) -> Path:
    return Path(out) / "failed" / f"{slide_id}.json"


def slide_state(out: Path, slide_id: str) -> str:
    """``done`` (its folder has ``summary.json``), ``failed`` or ``pending``."""
    if (slide_dir(out, slide_id) / "summary.json").exists():
        return "done"
    return "failed" if failure_path(out, slide_id).exists() else "pending"


def claim_cohort(out: Path, run_dir: str | Path, options: SlideOptions, items: Sequence[SlideItem]) -> None:
    """Write ``cohort.json``, or check that ``out`` was made with the same run and settings.

    Raises:
        RunFolderError: ``out`` holds slides made with another run or other settings.
    """
    path = Path(out) / COHORT_FILE
    settings = {"run": str(Path(run_dir).resolve()), **asdict(options)}
    if path.exists():
        try:
            old = json.loads(path.read_text()).get("settings", {})
        except (ValueError, AttributeError):
            raise RunFolderError(f"{path}: not a readable cohort record; use another --out") from None
        changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in settings.items() if old.get(k) != v]
        if changed:
            raise RunFolderError(
                f"{out}: holds a cohort made with other settings ({'; '.join(changed)}); use another --out"
            )
    slides = [{"slide_id": it.slide_id, "path": str(it.path), "label": it.label} for it in items]
    write_json(path, {"settings": settings, "slides": slides})


def cohort_items(out: Path) -> list[SlideItem]:
    """The slide list ``cohort.json`` recorded (the last call's)."""
    path = Path(out) / COHORT_FILE
    if not path.exists():
        raise RunFolderError(f"{out}: no {COHORT_FILE} (not a cohort folder)")
    try:
        doc = json.loads(path.read_text())
        return [SlideItem(s["slide_id"], Path(s["path"]), s.get("label")) for s in doc["slides"]]
    except (ValueError, KeyError, TypeError):
        raise RunFolderError(f"{path}: not a readable cohort record") from None


def run_cohort(
    run_dir: str | Path,
    items: Sequence[SlideItem],
    out: str | Path,
    *,
    options: SlideOptions,
    load_predictor: Callable[[], Predictor],
    progress: bool = True,
) -> CohortRun:
    """Process every slide of ``items`` that is not complete yet, each into ``out/slides/<slide_id>``.

    ``load_predictor`` is called once, when the first slide needs the model. A slide that fails is
    recorded under ``out/failed`` with a one-line reason and the next one starts; a full or read-only
    disk and an interrupt stop the cohort.
    """
    out = Path(out)
    result = CohortRun()
    predictor: Predictor | None = None
    from tqdm.auto import tqdm

    bar = tqdm(items, desc="slides", unit="slide", disable=not progress)
    for item in bar:
        folder = slide_dir(out, item.slide_id)
        if slide_state(out, item.slide_id) == "done":
            result.skipped.append(item.slide_id)
            continue
        if folder.exists():  # an interrupted attempt: start the slide afresh
            shutil.rmtree(folder)
        reason = None
        try:
            open_slide(item.path).close()  # before any model is loaded
        except InputDataError as err:
            reason = str(err)
        if reason is None:
            predictor = predictor or load_predictor()
            try:
                predict_slide(
                    run_dir, item.path, folder, predictor=predictor, level=options.level, mpp=options.mpp,
                    tile=options.tile, progress=progress, top_k=options.top_k,
                )  # fmt: skip
            except Exception as err:  # any slide-specific failure: record it, go on with the next slide
                if isinstance(err, OSError) and err.errno in _FATAL_ERRNOS:
                    raise
                log.debug("slide %s failed", item.slide_id, exc_info=True)
                reason = one_line(err)
                if not isinstance(err, CmafnetError):
                    reason = f"{type(err).__name__}: {reason}"
        if reason is not None:
            shutil.rmtree(folder, ignore_errors=True)
            write_json(
                failure_path(out, item.slide_id),
                {"slide_id": item.slide_id, "path": str(item.path), "reason": reason,
                 "time": datetime.now(timezone.utc).isoformat(timespec="seconds")},
            )  # fmt: skip
            result.failed[item.slide_id] = reason
            log.debug("%s: failed: %s", item.slide_id, reason)  # the caller reports failures
        else:
            failure_path(out, item.slide_id).unlink(missing_ok=True)
            result.processed.append(item.slide_id)
        bar.set_postfix(done=len(result.processed) + len(result.skipped), failed=len(result.failed))
    return result


def cohort_rows(out: str | Path, items: Sequence[SlideItem]) -> list[dict[str, Any]]:
    """One summary row per slide (in list order) from the folders: done, failed or pending.

    Raises:
        RunFolderError: a slide's ``summary.json`` or failure record that is not readable JSON.
    """
    out = Path(out)
    rows = []
    for it in items:
        row: dict[str, Any] = dict.fromkeys(SUMMARY_COLUMNS)
        row.update(
            slide_id=it.slide_id, path=str(it.path), label=it.label, status=slide_state(out, it.slide_id)
        )
        src = {"done": slide_dir(out, it.slide_id) / "summary.json", "failed": failure_path(out, it.slide_id)}
        if row["status"] in src:
            try:
                doc = json.loads(src[row["status"]].read_text())
            except ValueError:
                raise RunFolderError(
                    f"{src[row['status']]}: not readable JSON; remove it to redo the slide"
                ) from None
            if row["status"] == "done":
                row.update({k: doc.get(k) for k in _FROM_SUMMARY}, folder=str(slide_dir(out, it.slide_id)))
            else:
                row["reason"] = doc.get("reason")
        rows.append(row)
    return rows


def state_counts(rows: Sequence[dict[str, Any]]) -> Counter:
    """Slides per status (done, failed, pending)."""
    return Counter(r["status"] for r in rows)


def write_cohort_csv(out: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """``cohort.csv``: :data:`SUMMARY_COLUMNS`, one row per slide."""
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    path = Path(out) / SUMMARY_CSV
    atomic_write_bytes(path, buf.getvalue().encode())
    return path
