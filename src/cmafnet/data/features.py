"""Embeddings of a whole patch store by a frozen backbone: computed once, memory-mapped from disk.

A cache entry is a folder ``<cache dir>/<key[:24]>/`` holding ``features.npy`` (float32 ``(N, D)``, row
``i`` = store image ``i``) and ``key.json`` (what produced it, written last: its presence marks a
complete entry). The key is a hash of everything the embeddings depend on (:func:`cache_key`: the store
hash, the backbone's weights fingerprint and embedding, the preprocessing, the scale, the precision),
so several seeds, heads and splits of one store cost one extraction, and a changed input lands under
another key (old entries are left for the user to delete). Concurrent writers of one key each write
a private temporary file and rename it into place: the last complete one wins, with the same content.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cmafnet.errors import CmafnetError
from cmafnet.files import atomic_write_bytes

log = logging.getLogger(__name__)

CACHE_ENV = "CMAFNET_FEATURE_CACHE"
FEATURES_FILE, KEY_FILE = "features.npy", "key.json"


def default_cache_dir() -> Path:
    """``$CMAFNET_FEATURE_CACHE``, else ``$XDG_CACHE_HOME/cmafnet/features`` (``~/.cache/...``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cmafnet" / "features"


def cache_key(parts: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of what produced the embeddings."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class FeatureCache:
    """A complete cache entry: the memory-mapped embeddings and where they came from."""

    folder: Path
    key: str
    features: np.ndarray  # float32 (N, D), read-only memory map
    reused: bool  # found on disk (no extraction in this process)
    seconds: float  # extraction time in this process (0 when reused)


def _open(folder: Path, key: str, shape: tuple[int, int]) -> np.ndarray | None:
    """The entry's embeddings when it is complete and matches ``key`` and ``shape``, else None."""
    try:
        doc = json.loads((folder / KEY_FILE).read_text())
        feats = np.load(folder / FEATURES_FILE, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if doc.get("key") != key or feats.shape != shape or feats.dtype != np.float32:
        log.warning("feature cache %s does not match its key or shape: extracting again", folder)
        return None
    return feats


def load_or_extract(
    cache_dir: str | Path,
    parts: dict[str, Any],
    shape: tuple[int, int],
    batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    embed: Callable[[torch.Tensor], torch.Tensor],
) -> FeatureCache:
    """The cached embeddings for ``parts``, extracted first when there is no complete entry.

    Args:
        parts: what the embeddings depend on (hashed into the key; stored in ``key.json``).
        shape: ``(N, D)``: store images and embedding width.
        batches: yields ``(idx (B,), x (B, ...))`` covering every row once (called only to extract).
        embed: ``x -> (B, D)`` embeddings.

    Raises:
        CmafnetError: non-finite embeddings, or rows left unwritten.
    """
    key = cache_key(parts)
    folder = Path(cache_dir) / key[:24]
    feats = _open(folder, key, shape)
    if feats is not None:
        log.info("feature cache: reusing %s", folder)
        return FeatureCache(folder, key, feats, True, 0.0)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"features.{os.getpid()}.tmp.npy"
    t0 = time.perf_counter()
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
    done = np.zeros(shape[0], bool)
    try:
        for idx, x in batches():
            z = embed(x).float().cpu().numpy()
            rows = idx.cpu().numpy()
            if not np.isfinite(z).all():
                raise CmafnetError(
                    f"feature extraction: non-finite embeddings for store rows {rows[~np.isfinite(z).all(1)][:5].tolist()} "
                    "(try train.amp=none)"
                )
            out[rows] = z
            done[rows] = True
        if not done.all():
            raise CmafnetError(f"feature extraction: {int((~done).sum())} store rows were not embedded")
        out.flush()
        del out
        os.replace(tmp, folder / FEATURES_FILE)
    finally:
        tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    doc = {"key": key, "shape": list(shape), "dtype": "float32", "seconds": round(seconds, 3), "parts": parts}
    atomic_write_bytes(folder / KEY_FILE, json.dumps(doc, indent=2, default=str).encode())
    log.info("feature cache: %d embeddings of width %d in %.1f s -> %s", shape[0], shape[1], seconds, folder)
    return FeatureCache(folder, key, np.load(folder / FEATURES_FILE, mmap_mode="r"), False, seconds)
