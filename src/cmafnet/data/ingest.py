"""Decode a dataset once, in parallel, into a packed store (see :mod:`cmafnet.data.store`).

Steps: list files -> parse names (main process) -> decode chunks in worker processes that write
straight into a memory-mapped array (no pixels cross a pipe) -> compact away rejected rows ->
write ``index.csv``, ``rejected.csv`` and finally ``meta.json``.

Resume: work in progress lives in ``STORE/.partial`` keyed by a fingerprint of the source (every
file's relative path, size and mtime, plus dataset and size options). A re-run with the same
fingerprint skips finished chunks; a finished store with the same fingerprint is a no-op.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cmafnet import __version__
from cmafnet.data import scale
from cmafnet.data.datasets import Dataset, get_dataset
from cmafnet.data.integrity import CONTENT_KEY, content_hash
from cmafnet.data.safety import check_output_dir, limits, one_line
from cmafnet.data.store import (
    IMAGES_FILE,
    INDEX_COLUMNS,
    INDEX_FILE,
    META_FILE,
    REJECTED_FILE,
    PatchStore,
    compute_store_hash,
)  # fmt: skip
from cmafnet.data.validation import SizePolicy, decode_image
from cmafnet.errors import ConfigError, InputDataError, RunFolderError
from cmafnet.files import atomic_write_bytes, hold_folder, write_json

log = logging.getLogger(__name__)
PARTIAL = ".partial"
CHUNK = 256  # files per worker task: large enough to amortise IPC, small enough for a smooth bar
SYNTHETIC_MARKER = "SYNTHETIC.txt"  # written by cmafnet.data.synthetic

_MM: np.ndarray | None = None  # the worker's memory map of the partial images array


def _init_worker(images_path: str) -> None:
    global _MM
    _MM = np.load(images_path, mmap_mode="r+")


def _decode_chunk(chunk_id: int, items: list[tuple[int, str]], policy: SizePolicy) -> tuple[int, list[list]]:
    """Decode ``items`` (row, path) into the memory map; return one result row per item."""
    assert _MM is not None
    out = []
    for row, path in items:
        d = decode_image(path, policy)
        if d.array is not None:
            _MM[row] = d.array
        out.append([row, d.reason or "", d.detail, d.sha256, d.orig_h, d.orig_w, int(d.dropped_alpha)])
    _MM.flush()
    return chunk_id, out


def parse_size(text: str | None) -> tuple[int, int] | None:
    """'460x700' -> (460, 700) as (H, W)."""
    if not text:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--size '{text}' must look like HxW, e.g. 50x50") from None
    if h < 8 or w < 8:
        raise ConfigError(f"--size '{text}' is too small (min 8x8)")
    return h, w


def _fingerprint(ds: Dataset, files: list[Path], policy: SizePolicy) -> str:
    options = ds.options_key()  # "" for the defaults, so older stores keep their fingerprint
    h = hashlib.sha256(
        f"{ds.name}|{policy}|{__version__}|{ds.root.resolve()}{'|' + options if options else ''}".encode()
    )
    for p in files:
        try:
            st = p.stat()
            h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:  # a manifest entry that does not exist: rejected by decode later
            h.update(f"{p}|missing\n".encode())
    return h.hexdigest()


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root if root.is_dir() else root.parent))
    except ValueError:
        return str(path)


def ingest(
    dataset: str,
    src: str | Path,
    out: str | Path,
    *,
    workers: int | None = None,
    strict: bool = False,
    size: tuple[int, int] | None = None,
    force: bool = False,
    progress: bool = True,
    mpp: float | None = None,
    patient_regex: str | None = None,
) -> dict[str, Any]:
    """Ingest ``src`` into the store folder ``out``; returns the store's meta dict.

    Args:
        dataset: ``idc``, ``breakhis`` or ``folder``.
        src: the dataset root (or a CSV manifest for ``folder``).
        workers: decoding processes (default: CPU count, at most 16; 1 = in-process).
        strict: raise :class:`InputDataError` if any file is rejected (no store is written).
        size: store (H, W); None keeps the dataset's native size.
        force: overwrite a store made from a different source.
        mpp: microns per pixel of the source images (folder data; overrides the documented IDC
            value and, as the 40X value, the BreakHis assumption).
        patient_regex: folder data: the patient from the file name (see ``Folder``).

    Raises:
        InputDataError: no files, every file rejected, or a rejection under ``strict``.
        RunFolderError: ``out`` holds a store from another source (without ``force``), or another live
            process holds it (:func:`cmafnet.files.hold_folder`).
    """
    t0 = time.perf_counter()
    out = check_output_dir(out, "--out")  # before any work: a file there is bad usage
    limits()  # a bad CMAFNET_MAX_* variable is a config error here, not in every worker
    ds = get_dataset(dataset, src, size, mpp=mpp, patient_regex=patient_regex)
    files = ds.files()
    if not files:
        raise InputDataError(f"{ds.root}: no image files found (extensions .png .jpg .tif .bmp)")
    policy = ds.size_policy()
    fp = _fingerprint(ds, files, policy)
    with hold_folder(out, "cmafnet ingest"):  # before the folder is read or written
        return _write_store(ds, files, policy, fp, out, t0, workers, strict, force, progress)


def _write_store(
    ds: Dataset, files: list[Path], policy: SizePolicy, fp: str, out: Path, t0: float, workers: int | None,
    strict: bool, force: bool, progress: bool,
) -> dict[str, Any]:  # fmt: skip
    """:func:`ingest` once ``out`` is held: no-op, resume or (re)build the store."""
    meta_path = out / META_FILE
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text())
        except ValueError as err:
            raise RunFolderError(
                f"{meta_path}: unreadable ({one_line(err)}); --force rebuilds the store"
            ) from None
        if old.get("source_fingerprint") == fp and (out / IMAGES_FILE).exists() and not force:
            try:
                PatchStore.open(out)  # an edited or damaged store is rebuilt
            except RunFolderError as problem:
                log.warning("%s; rebuilding the store from %s", problem, ds.root)
                force = True
            else:
                if strict and old.get("n_rejected"):
                    raise InputDataError(
                        f"--strict: {old['n_rejected']} of {old.get('n_files', '?')} files were rejected when "
                        f"{out} was ingested ({format_counts(old.get('rejected_by_reason') or {})}); "
                        f"see {out / REJECTED_FILE}"
                    )
                log.info("store %s is up to date with %s (no-op)", out, ds.root)
                old["noop"] = True
                return old
        if not force:
            raise RunFolderError(
                f"{out} holds a store from another source or options; use --force or a new folder"
            )
    if force and out.exists():
        for name in (META_FILE, INDEX_FILE, IMAGES_FILE, REJECTED_FILE):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    # 1. names: cheap, in the main process
    rejected: list[dict[str, str]] = []
    records: list[dict[str, Any]] = []
    paths: list[Path] = []
    for p in files:
        r = ds.parse(p)
        if isinstance(r, tuple):
            rejected.append({"path": _rel(p, ds.root), "reason": r[0], "detail": r[1]})
        else:
            records.append(r)
            paths.append(p)

    # 2. decode into a partial memory map, resuming finished chunks
    n = len(paths)
    part = out / PARTIAL
    state_path, chunks_path, part_images = part / "state.json", part / "chunks.jsonl", part / IMAGES_FILE
    h, w = policy.out_hw
    results: dict[int, list] = {}
    state = {"fingerprint": fp, "n": n, "shape": [n, h, w, 3]}
    if state_path.exists() and json.loads(state_path.read_text()) == state and part_images.exists():
        if chunks_path.exists():
            for line in chunks_path.read_text().splitlines():
                try:
                    cid, rows = json.loads(line)
                except json.JSONDecodeError:  # a torn last line from an interrupted run
                    continue
                results[cid] = rows
        log.info("resuming ingest: %d of %d chunks already decoded", len(results), -(-n // CHUNK))
    else:
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        if n:
            np.lib.format.open_memmap(part_images, mode="w+", dtype=np.uint8, shape=(n, h, w, 3)).flush()
        write_json(state_path, state)
    chunks = {
        i // CHUNK: [(j, str(paths[j])) for j in range(i, min(i + CHUNK, n))] for i in range(0, n, CHUNK)
    }
    todo = [c for c in chunks if c not in results]
    workers = max(1, min(workers or min(os.cpu_count() or 1, 16), max(1, len(todo))))
    t_dec = time.perf_counter()
    if todo:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=sum(len(chunks[c]) for c in todo),
            unit="img",
            desc=f"ingest {ds.name}",
            disable=not progress,
        )
        with open(chunks_path, "a") as log_f, ExitStack() as stack:
            if workers == 1:
                _init_worker(str(part_images))
                done = (_decode_chunk(c, chunks[c], policy) for c in todo)
            else:
                pool = stack.enter_context(
                    ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(str(part_images),))
                )
                futs = [pool.submit(_decode_chunk, c, chunks[c], policy) for c in todo]
                done = (fut.result() for fut in as_completed(futs))
            for cid, rows in done:
                results[cid] = rows
                log_f.write(json.dumps([cid, rows]) + "\n")
                log_f.flush()
                bar.update(len(rows))
        bar.close()
    decode_s = time.perf_counter() - t_dec

    # 3. collect
    extra: dict[int, dict[str, Any]] = {}  # accepted row -> the index columns decoding found
    dropped_alpha = 0
    for rows in results.values():
        for row, reason, detail, sha, oh, ow, dropped in rows:
            if reason:
                rejected.append({"path": _rel(paths[row], ds.root), "reason": reason, "detail": detail})
            else:
                extra[row] = {"orig_h": oh, "orig_w": ow, "source": _rel(paths[row], ds.root), "sha256": sha}
                dropped_alpha += dropped
    valid = sorted(extra)
    rej_df = pd.DataFrame(rejected, columns=["path", "reason", "detail"]).sort_values("path", kind="stable")
    atomic_write_bytes(out / REJECTED_FILE, rej_df.to_csv(index=False).encode())
    by_reason = dict(Counter(rej_df["reason"]))
    if not valid or (strict and len(rej_df)):
        shutil.rmtree(part, ignore_errors=True)  # a refusal, not an interruption: nothing to resume
        counts = format_counts(by_reason)
        if not valid:
            raise InputDataError(
                f"{ds.root}: all {len(files)} files rejected ({counts}); see {out / REJECTED_FILE}"
            )
        raise InputDataError(
            f"--strict: {len(rej_df)} of {len(files)} files rejected ({counts}); see {out / REJECTED_FILE}"
        )

    # 4. the final array: the partial one if nothing was rejected after parsing, else compacted
    src_mm = np.load(part_images, mmap_mode="r")
    if len(valid) == n:
        del src_mm
        os.replace(part_images, out / IMAGES_FILE)
    else:
        dst = np.lib.format.open_memmap(
            out / ".images.tmp.npy", mode="w+", dtype=np.uint8, shape=(len(valid), h, w, 3)
        )
        sel = np.asarray(valid)
        step = max(1, (256 << 20) // (h * w * 3))  # ~256 MiB at a time (700x460 images are ~1 MB)
        for i in range(0, len(sel), step):
            dst[i : i + step] = src_mm[sel[i : i + step]]
        dst.flush()
        del dst, src_mm
        os.replace(out / ".images.tmp.npy", out / IMAGES_FILE)

    index = pd.DataFrame([{"id": i, **records[r], **extra[r]} for i, r in enumerate(valid)])
    index = index[list(INDEX_COLUMNS)]
    mpp_info = _record_mpp(ds, index, [records[r] for r in valid], policy)
    index_bytes = index.to_csv(index=False).encode()
    atomic_write_bytes(out / INDEX_FILE, index_bytes)
    shape = (len(valid), h, w, 3)

    orig = list(zip(index["orig_h"], index["orig_w"]))
    if policy.resize_any:
        n_padded, n_resized = 0, sum(o != policy.out_hw for o in orig)
    else:
        n_padded = sum(o != policy.canvas_hw and o != policy.out_hw for o in orig)
        n_resized = sum(o != policy.out_hw for o in orig) if policy.out_hw != policy.canvas_hw else 0
    per_patient = {
        str(p): {str(k): int(v) for k, v in g["label_name"].value_counts().items()}
        for p, g in index.groupby("patient", sort=True)
    }
    total_s = time.perf_counter() - t0
    decoded = sum(len(chunks[c]) for c in todo)
    meta = {
        "dataset": ds.name,
        "synthetic": any((p / SYNTHETIC_MARKER).exists() for p in (ds.root, *list(ds.root.parents)[:3])),
        "classes": list(ds.CLASSES),
        "subtype_classes": list(ds.SUBTYPES),
        "image_size": [h, w],
        "n_images": len(valid),
        "n_patients": int(index["patient"].nunique()),
        "per_class": {c: int((index["label_name"] == c).sum()) for c in ds.CLASSES},
        "per_patient": per_patient,
        "per_subtype": {str(k): int(v) for k, v in index["subtype"].value_counts().items() if k},
        **mpp_info,
        "patient_source": ds.patient_source,
        "n_own_patient": int(getattr(ds, "n_own_patient", 0)),
        "per_magnification": {
            str(k): int(v) for k, v in index["magnification"].value_counts().items() if k > 0
        },
        "padded": n_padded,
        "resized": n_resized,
        "alpha_dropped": int(dropped_alpha),
        "duplicate_sha256": int(index["sha256"].duplicated().sum()),
        "n_files": len(files),
        "n_rejected": len(rej_df),
        "rejected_by_reason": by_reason,
        "published": json.loads(json.dumps(ds.PUBLISHED, default=str)),
        "differences_from_published": ds.validate(index),
        "store_hash": compute_store_hash(index_bytes, shape),
        "source": str(ds.root.resolve()),
        "source_fingerprint": fp,
        "cmafnet_version": __version__,
        "decode_seconds": round(decode_s, 3),
        "decoded_files": decoded,
        "throughput_img_per_s": round(decoded / decode_s, 1) if decoded and decode_s > 0 else None,
        "total_seconds": round(total_s, 3),
        "store_bytes": int((out / IMAGES_FILE).stat().st_size),
        "workers": workers,
    }
    meta[CONTENT_KEY] = content_hash(meta, np.load(out / IMAGES_FILE, mmap_mode="r"))
    write_json(meta_path, meta)
    shutil.rmtree(part, ignore_errors=True)
    meta["noop"] = False
    return meta


def _record_mpp(ds: Dataset, index: pd.DataFrame, records: list[dict], policy: SizePolicy) -> dict[str, Any]:
    """Add the per-image ``mpp`` column to ``index`` (in place); return the meta.json fields."""
    values, aniso = [], 0
    lo, hi = scale.MPP_RANGE
    for rec, oh, ow, source in zip(records, index["orig_h"], index["orig_w"], index["source"]):
        v, a = scale.stored_mpp(
            ds.source_mpp(rec, (int(oh), int(ow))), (int(oh), int(ow)), policy.out_hw, policy.canvas_hw,
            policy.resize_any,
        )  # fmt: skip
        if v is not None and not lo <= v <= hi:  # the source's value is in range: the resize took it out
            raise ConfigError(
                f"--size {policy.out_hw[0]}x{policy.out_hw[1]}: {source} ({oh}x{ow} px) would be stored at "
                f"{v:g} microns per pixel, outside {lo:g} to {hi:g}"
            )
        values.append(np.nan if v is None else round(v, 6))
        aniso += a
    index["mpp"] = values
    info = scale.store_mpp_summary(np.asarray(values), index["magnification"].to_numpy())
    return {**info, "mpp_source": ds.mpp_source, "mpp_anisotropic": aniso}


def format_counts(counts: dict[str, int]) -> str:
    """``{'not an image': 2, 'too large': 1}`` -> ``'2 not an image, 1 too large'``."""
    return ", ".join(
        f"{n:,} {reason}" for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    )


def summary_lines(meta: dict[str, Any]) -> list[str]:
    """Human-readable lines: counts found against the published ones."""
    lines = [
        f"{meta['dataset']}{' (SYNTHETIC)' if meta.get('synthetic') else ''}: {meta['n_images']:,} images, "
        f"{meta['n_patients']} patients, size {meta['image_size'][0]}x{meta['image_size'][1]}",
        "per class: " + ", ".join(f"{k} {v:,}" for k, v in meta["per_class"].items()),
    ]
    if meta.get("per_subtype"):
        lines.append(
            "per subtype: " + ", ".join(f"{k} {v:,}" for k, v in sorted(meta["per_subtype"].items()))
        )
    if meta.get("per_magnification"):
        lines.append(
            "per magnification: " + ", ".join(f"{k}X {v:,}" for k, v in meta["per_magnification"].items())
        )
    lines += _scale_and_patient_lines(meta)
    counts = format_counts(meta.get("rejected_by_reason") or {})
    lines.append(f"rejected: {meta['n_rejected']:,}" + (f" ({counts}; see rejected.csv)" if counts else ""))
    if meta.get("padded") or meta.get("resized") or meta.get("alpha_dropped"):
        lines.append(
            f"padded (white): {meta.get('padded', 0)}, resized: {meta.get('resized', 0)}, "
            f"opaque alpha dropped: {meta.get('alpha_dropped', 0)}"
        )
    diffs = meta.get("differences_from_published") or []
    if meta.get("published") and not meta.get("synthetic"):
        lines.append(
            "matches the published counts" if not diffs else "differences from the published dataset:"
        )
        lines += [f"  {d}" for d in diffs]
    if meta.get("throughput_img_per_s"):
        lines.append(
            f"decoded {meta['decoded_files']:,} files in {meta['decode_seconds']:.2f}s "
            f"({meta['throughput_img_per_s']:,.0f} img/s, {meta['workers']} workers); "
            f"store {meta['store_bytes'] / 2**20:,.1f} MiB"
        )
    return lines


def _scale_and_patient_lines(meta: dict[str, Any]) -> list[str]:
    """What the store says about its physical scale and where its patients come from."""
    lines = []
    if "mpp_source" in meta:
        if meta.get("mpp") is not None:
            value = f"{meta['mpp']:g}"
        elif meta.get("mpp_by_magnification"):
            value = ", ".join(f"{k} {v:g}" for k, v in meta["mpp_by_magnification"].items())
        elif meta.get("mpp_range"):
            value = "{:g} to {:g}".format(*meta["mpp_range"])
        else:
            value = "unknown"
        lines.append(f"microns per pixel: {value} ({meta['mpp_source']})")
    if meta.get("n_own_patient"):
        lines.append(
            f"WARNING patients: {meta['n_own_patient']:,} images have no patient (no patient folder, manifest "
            "'patient' column or --patient-regex): each is its own patient, so a 'patient-level' split is by image"
        )
    elif meta.get("patient_source"):
        lines.append(f"patients from: {meta['patient_source']}")
    return lines
