"""The store's content hash: its pixels and every meta field that changes what the store means.

``store_hash`` (:mod:`cmafnet.data.store`) identifies a store by ``index.csv`` and the array shape;
splits and runs record it. The content hash written here by ingest (``meta.json`` key
``content_hash``) protects what that identity does not cover, and :meth:`PatchStore.open` checks
it when a store is opened for splitting, training or evaluation:

* ``pixels``: a sha256 tree hash of ``images.npy``'s pixel bytes: 64 MiB chunks hashed in parallel
  threads (hashlib releases the GIL; sha256 uses the CPU's SHA extensions, 1.3 GB/s per core
  measured on a buffer, faster than blake2b's 0.85), then one sha256 over the chunk digests, the
  shape and the dtype. About 0.75 GB/s per core through the memory map: ~3 s for the 2 GB IDC
  store. A digest is computed once per process per file version (inode, size, mtime, ctime).
* ``meta``: a short sha256 per ``meta.json`` field, for every field except the informational
  ones in :data:`INFORMATIONAL` (timings, worker count, package version, the source's path and
  fingerprint), so an edit names the field. The covered field names are recorded with the digests:
  a field added to ``meta.json`` later by hand does not invalidate the store.

Set ``CMAFNET_SKIP_PIXEL_HASH=1`` to skip the pixel check for very large stores; every open then
warns that pixel edits go undetected. The meta fields and the index are always checked (cheap).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from cmafnet.errors import RunFolderError

log = logging.getLogger(__name__)

CONTENT_KEY = "content_hash"
ALGORITHM = "sha256-tree-64MiB"
CHUNK_BYTES = 64 << 20
SKIP_ENV = "CMAFNET_SKIP_PIXEL_HASH"
INFORMATIONAL = frozenset({
    "cmafnet_version", "decode_seconds", "decoded_files", "noop", "source", "source_fingerprint",
    "store_bytes", "store_hash", "throughput_img_per_s", "total_seconds", "workers", CONTENT_KEY,
})  # fmt: skip
_LARGE = 4 << 30  # stores above 4 GiB say that the check runs and how to skip it
_DIGESTS: dict[tuple, str] = {}  # (path, inode, size, mtime, ctime) -> pixel digest, this process
_WARNED: set[str] = set()
REINGEST = "re-ingest the store ('cmafnet ingest ... --force')"


def pixel_digest(images: np.ndarray, workers: int | None = None) -> str:
    """sha256 tree hash of a C-contiguous array's bytes (see the module docstring)."""
    flat = np.ascontiguousarray(images).reshape(-1).view(np.uint8)
    starts = range(0, flat.size, CHUNK_BYTES)

    def chunk(i: int) -> bytes:
        return hashlib.sha256(memoryview(flat[i : i + CHUNK_BYTES])).digest()

    n_threads = max(1, min(workers or os.cpu_count() or 1, 16, len(starts)))
    with ThreadPoolExecutor(n_threads) as pool:
        digests = b"".join(pool.map(chunk, starts))
    top = hashlib.sha256(f"{ALGORITHM}|{tuple(images.shape)}|{images.dtype.str}|".encode())
    top.update(digests)
    return top.hexdigest()


def _field_digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def content_hash(meta: dict[str, Any], images: np.ndarray) -> dict[str, Any]:
    """The ``content_hash`` entry of ``meta.json`` for a store's final meta and pixels."""
    digests = {k: _field_digest(v) for k, v in sorted(meta.items()) if k not in INFORMATIONAL}
    return {"algorithm": ALGORITHM, "pixels": pixel_digest(images), "meta": digests}


def verify_content(path: Path, meta: dict[str, Any], images: np.ndarray, images_path: Path) -> None:
    """Check an opened store (folder ``path``) against its content hash; :class:`RunFolderError` on a change.

    The pixels are checked unless ``CMAFNET_SKIP_PIXEL_HASH`` is set; ``images_path`` keys the
    per-process digest cache.
    """
    size = meta.get("image_size")
    if size is not None and list(size) != list(images.shape[1:3]):
        raise RunFolderError(
            f"{path}: meta.json image_size {list(size)} does not match images.npy "
            f"({images.shape[1]}x{images.shape[2]}); meta.json was edited, {REINGEST}"
        )
    recorded = meta.get(CONTENT_KEY)
    if recorded is None:
        if str(path) not in _WARNED:
            _WARNED.add(str(path))
            log.warning(
                "%s: this store has no content hash (ingested by an older cmafnet), so edits of images.npy "
                "or meta.json cannot be detected; %s to add one (its store hash, splits and runs stay valid)",
                path,
                REINGEST,
            )
        return
    if not isinstance(recorded, dict) or recorded.get("algorithm") != ALGORITHM:
        algo = recorded.get("algorithm") if isinstance(recorded, dict) else None
        raise RunFolderError(f"{path}: meta.json content_hash is unreadable (algorithm {algo!r}); {REINGEST}")
    want = recorded.get("meta")
    if not isinstance(want, dict):
        raise RunFolderError(f"{path}: meta.json content_hash has no field digests; {REINGEST}")
    now = {k: _field_digest(meta[k]) for k in want if k in meta}
    changed = sorted(k for k in want if now.get(k) != want[k])
    if changed:
        names = ", ".join(f"{k} (removed)" if k not in meta else k for k in changed)
        raise RunFolderError(f"{path}: meta.json changed after ingest: {names}; restore it or {REINGEST}")
    if os.environ.get(SKIP_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        log.warning(
            "%s: pixel hash NOT checked (%s is set): edits of images.npy go undetected", path, SKIP_ENV
        )
        return
    st = images_path.stat()
    key = (str(images_path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _DIGESTS:
        t0 = time.perf_counter()
        if images.nbytes > _LARGE:
            gib = images.nbytes / 2**30
            log.info("%s: checking the pixel hash (%.1f GiB; %s=1 skips it)", images_path, gib, SKIP_ENV)
        _DIGESTS[key] = pixel_digest(images)
        log.debug("%s: pixel hash in %.2f s", images_path, time.perf_counter() - t0)
    if _DIGESTS[key] != recorded.get("pixels"):
        raise RunFolderError(
            f"{path}: images.npy does not match the pixel hash recorded at ingest (pixels changed after "
            f"ingest); {REINGEST}"
        )
