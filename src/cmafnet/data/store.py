"""The packed patch store: every image decoded once into one memory-mappable uint8 array.

A store folder holds::

    images.npy     uint8 (N, H, W, 3), ``np.load(mmap_mode="r")``-able
    index.csv      one row per image: id, patient, label, label_name, subtype, magnification,
                   x, y, orig_h, orig_w, source, sha256 (of the source file's bytes)
    meta.json      dataset, classes, subtype classes, counts, published counts, image size,
                   store_hash, source fingerprint (written last: its presence marks completion)
    rejected.csv   path, reason, detail for every file the input policy refused

``store_hash`` is the sha256 of ``index.csv``'s bytes plus the array shape: it changes whenever
the source images, labels, patients or their order change, and splits and runs record it. The
decoded pixels and the meaning-bearing meta fields are covered by a separate content hash
(:mod:`cmafnet.data.integrity`), checked on open as well.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cmafnet.data.integrity import verify_content
from cmafnet.data.safety import one_line
from cmafnet.errors import ConfigError, RunFolderError

IMAGES_FILE = "images.npy"
INDEX_FILE = "index.csv"
META_FILE = "meta.json"
REJECTED_FILE = "rejected.csv"
INDEX_COLUMNS = (
    "id", "patient", "label", "label_name", "subtype", "magnification",
    "x", "y", "orig_h", "orig_w", "source", "sha256",
)  # fmt: skip
_STR_COLUMNS = ("patient", "label_name", "subtype", "source", "sha256")


def compute_store_hash(index_bytes: bytes, shape: tuple[int, ...]) -> str:
    """sha256 over the index table's bytes and the image array's shape."""
    h = hashlib.sha256(index_bytes)
    h.update(repr(tuple(int(s) for s in shape)).encode())
    return h.hexdigest()


def _read(file: Path, load: Callable[[Path], Any]) -> Any:
    """``load(file)``, with any failure as one line naming the file (exit 4)."""
    try:
        return load(file)
    except (ValueError, OSError, EOFError, pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        empty = file.is_file() and file.stat().st_size == 0
        what = "is empty (0 bytes)" if empty else f"is corrupt ({one_line(err)})"
        raise RunFolderError(f"{file}: {what}; re-ingest the store ('cmafnet ingest ... --force')") from None


class PatchStore:
    """An opened store. Use :meth:`open`; ``images`` is a read-only memory map.

    Attributes:
        images: uint8 ``(N, H, W, 3)`` memory map; row ``i`` of ``index`` is ``images[i]``.
        classes: label class names (index = label).
        subtype_classes: subtype names (empty for datasets without subtypes).
    """

    def __init__(self, path: Path, images: np.ndarray, index: pd.DataFrame, meta: dict[str, Any]) -> None:
        self.path = path
        self.images = images
        self.index = index
        self.meta = meta
        self.classes: list[str] = list(meta["classes"])
        self.subtype_classes: list[str] = list(meta.get("subtype_classes", []))
        self.dataset: str = meta["dataset"]
        self.store_hash: str = meta["store_hash"]

    @classmethod
    def open(cls, path: str | Path, *, verify: bool = True) -> PatchStore:
        """Open a store folder.

        Args:
            path: the folder written by ``cmafnet ingest``.
            verify: recompute the store hash from ``index.csv`` (cheap) and check the content hash
                (meta fields; pixels unless ``CMAFNET_SKIP_PIXEL_HASH`` is set, :mod:`cmafnet.data.integrity`).

        Raises:
            RunFolderError: missing files, an unfinished ingest, or files that do not match.
        """
        path = Path(path)
        if not path.is_dir():
            raise RunFolderError(f"{path}: store folder not found")
        for name in (META_FILE, INDEX_FILE, IMAGES_FILE):
            if not (path / name).is_file():
                hint = " (ingest unfinished? re-run 'cmafnet ingest' to resume)" if name == META_FILE else ""
                raise RunFolderError(f"{path}: not a patch store, {name} missing{hint}")
        meta = _read(path / META_FILE, lambda p: json.loads(p.read_text()))
        images = _read(path / IMAGES_FILE, lambda p: np.load(p, mmap_mode="r"))
        index_bytes = _read(path / INDEX_FILE, Path.read_bytes)
        # ids such as '8863' and empty subtypes stay strings
        index = _read(
            path / INDEX_FILE,
            lambda p: pd.read_csv(p, dtype=dict.fromkeys(_STR_COLUMNS, str), keep_default_na=False),
        )
        if not isinstance(meta, dict):
            raise RunFolderError(f"{path}: corrupt store ({META_FILE} is not a JSON object)")
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise RunFolderError(
                f"{path}: {IMAGES_FILE} is {images.dtype} {images.shape}, expected uint8 (N,H,W,3)"
            )
        if len(index) != images.shape[0]:
            raise RunFolderError(f"{path}: index has {len(index)} rows but images has {images.shape[0]}")
        missing = [c for c in INDEX_COLUMNS if c not in index.columns]
        if missing or "store_hash" not in meta or "classes" not in meta:
            raise RunFolderError(f"{path}: corrupt store (index columns {missing} / meta keys missing)")
        if verify and compute_store_hash(index_bytes, images.shape) != meta["store_hash"]:
            raise RunFolderError(
                f"{path}: store hash mismatch (index.csv, the number or size of images, or meta.json's "
                "store_hash changed after ingest)"
            )
        if verify:
            verify_content(path, meta, images, path / IMAGES_FILE)
        return cls(path, images, index, meta)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    def targets(self, kind: str = "label") -> tuple[np.ndarray, list[str]]:
        """Integer targets for every image and their class names.

        Args:
            kind: ``label`` (benign/malignant, non-IDC/IDC) or ``subtype`` (BreakHis 8 classes).
        """
        if kind == "label":
            return self.index["label"].to_numpy(np.int64), list(self.classes)
        if kind == "subtype":
            if not self.subtype_classes:
                raise ConfigError(f"store {self.path} ({self.dataset}) has no subtypes; use kind='label'")
            lookup = {name: i for i, name in enumerate(self.subtype_classes)}
            return self.index["subtype"].map(lookup).to_numpy(np.int64), list(self.subtype_classes)
        raise ConfigError(f"unknown target kind '{kind}' (label | subtype)")

    def patients(self) -> np.ndarray:
        """The patient id of every image (object array of str)."""
        return self.index["patient"].to_numpy(object)

    def __repr__(self) -> str:
        return f"PatchStore({self.path}, dataset={self.dataset}, n={len(self)}, size={self.image_size})"
