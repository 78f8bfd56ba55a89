"""Input safety: what may be read, and how much of it, before any decoder sees a byte.

Every path a user hands to ``ingest``, ``predict``, ``wsi`` or ``evaluate`` goes through here:

* only **regular files** are read: a device (``/dev/zero``), a FIFO (which would block forever), a
  socket or a folder named like an image is refused with its kind;
* a **byte cap** is checked on ``stat`` before reading and again while reading (a file growing
  under us): :data:`DEFAULT_MAX_FILE_MB`, overridable with ``CMAFNET_MAX_FILE_MB``;
* a **pixel cap** is checked on the image header before decoding: :data:`DEFAULT_MAX_PIXELS`
  (8192 x 8192), overridable with ``CMAFNET_MAX_IMAGE_PIXELS``. Pillow's own decompression-bomb
  guard (a warning at 89 Mpx, an exception at 179 Mpx, process-wide) is replaced by this per-file
  rejection, so a 429-byte PNG declaring 60000 x 60000 pixels is one rejected file ("too large:
  60000 x 60000 pixels ..."), never a failed job or a printed warning.

Per-image problems raise :class:`UnsafeFile` (a reason and a detail, turned into a rejection row by
the caller); problems with a file that defines the whole job (a slide, a CSV list or manifest)
raise :class:`~cmafnet.errors.InputDataError` with one line naming the file. This module does not
import torch, so ingest worker processes start fast.
"""

from __future__ import annotations

import io
import os
import re
import stat
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from cmafnet.errors import ConfigError, InputDataError

NOT_FOUND = "file not found"
NOT_REGULAR = "not a regular file"
TOO_LARGE = "too large"

MAX_FILE_MB_ENV = "CMAFNET_MAX_FILE_MB"
MAX_PIXELS_ENV = "CMAFNET_MAX_IMAGE_PIXELS"
# An uncompressed 8-bit RGB TIFF/BMP of the largest accepted image (8192 x 8192) is 192 MiB, so
# every file that can hold an accepted image fits under the byte cap.
DEFAULT_MAX_FILE_MB = 256
DEFAULT_MAX_PIXELS = 8192 * 8192  # 67,108,864 pixels, 192 MiB decoded as RGB

_PIL_LOCK = threading.RLock()
_OBJECT_REPR = re.compile(r"\s*<[^<>]* (?:object )?at 0x[0-9a-fA-F]+>")
_KINDS = {
    stat.S_ISDIR: "a folder",
    stat.S_ISFIFO: "a FIFO",
    stat.S_ISCHR: "a device",
    stat.S_ISBLK: "a device",
    stat.S_ISSOCK: "a socket",
}


class UnsafeFile(Exception):
    """One input file is refused before or while decoding; ``reason`` is a rejection reason."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Limits:
    """The caps applied to one input file (see the module docstring)."""

    max_bytes: int = DEFAULT_MAX_FILE_MB << 20
    max_pixels: int = DEFAULT_MAX_PIXELS


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw.replace("_", ""))
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{name}={raw!r}: expected a positive number")
    return value


def limits() -> Limits:
    """The caps in force: the defaults, or ``CMAFNET_MAX_FILE_MB`` / ``CMAFNET_MAX_IMAGE_PIXELS``.

    Raises:
        ConfigError: an environment variable that is not a positive number.
    """
    mb = _env_number(MAX_FILE_MB_ENV, DEFAULT_MAX_FILE_MB)
    return Limits(max_bytes=int(mb * 2**20), max_pixels=int(_env_number(MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS)))


def one_line(err: BaseException | str, limit: int = 160) -> str:
    """An exception as one short line, without ``<... object at 0x...>`` reprs."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    text = _OBJECT_REPR.sub("", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _mb(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB" if n >= 2**20 else f"{n:,} bytes"


def check_file(path: str | os.PathLike, max_bytes: int | None = None) -> int:
    """``stat`` ``path`` (following links) and return its size; raise :class:`UnsafeFile` if it
    is missing, not a regular file, or larger than ``max_bytes``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UnsafeFile(NOT_FOUND) from None
    except OSError as err:
        raise UnsafeFile(NOT_REGULAR, f"cannot stat: {err.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for is_kind, k in _KINDS.items() if is_kind(st.st_mode)), "not a plain file")
        raise UnsafeFile(NOT_REGULAR, kind)
    if max_bytes is not None and st.st_size > max_bytes:
        raise UnsafeFile(TOO_LARGE, f"{_mb(st.st_size)} file, limit {_mb(max_bytes)} ({MAX_FILE_MB_ENV})")
    return st.st_size


def read_bytes(path: str | os.PathLike, lim: Limits | None = None) -> bytes:
    """The bytes of a regular file no larger than the byte cap (:class:`UnsafeFile` otherwise)."""
    lim = lim or limits()
    check_file(path, lim.max_bytes)
    try:
        with open(path, "rb") as f:
            data = f.read(lim.max_bytes + 1)  # never more than the cap, even if the file grew
    except OSError as err:
        raise UnsafeFile(NOT_REGULAR, f"unreadable: {err.strerror or one_line(err)}") from None
    if len(data) > lim.max_bytes:
        raise UnsafeFile(TOO_LARGE, f"more than {_mb(lim.max_bytes)} ({MAX_FILE_MB_ENV})")
    return data


@contextmanager
def pil_guard() -> Iterator[None]:
    """Pillow with its process-wide decompression-bomb check lifted (the pixel cap is checked
    per file by :func:`open_image` instead) and its bomb warning silenced.

    ``Image.MAX_IMAGE_PIXELS`` is a module global, so the change is serialised with a lock and
    restored on exit.
    """
    with _PIL_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def check_pixels(im: Image.Image, max_pixels: int) -> None:
    """Raise :class:`UnsafeFile` ("too large: W x H pixels") when ``im`` exceeds the pixel cap."""
    w, h = im.size
    if w * h > max_pixels:
        raise UnsafeFile(TOO_LARGE, f"{w} x {h} pixels, limit {max_pixels:,} ({MAX_PIXELS_ENV})")


def image_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(H, W)`` from an image header, or None when the file is unsafe or not an image.

    Reads the header only (Pillow opens lazily); used to take a majority image size.
    """
    try:
        check_file(path, limits().max_bytes)
        with pil_guard(), Image.open(path) as im:
            return im.size[1], im.size[0]
    except Exception:  # unsafe or unreadable: decoding rejects it later with its reason
        return None


def require_regular_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path if it is an existing regular file, else one-line :class:`InputDataError`.

    For files that define a whole job (a slide, a CSV list or manifest), where a per-file
    rejection does not apply.
    """
    try:
        check_file(path)
    except UnsafeFile as err:
        detail = "not found" if err.reason == NOT_FOUND else f"is {err.reason} ({err.detail})"
        raise InputDataError(f"{path}: {what} {detail}") from None
    return Path(path)


def read_text(path: str | os.PathLike, what: str) -> str:
    """A UTF-8 text file (a CSV manifest or input list) or one-line :class:`InputDataError`."""
    require_regular_file(path, what)
    try:
        data = read_bytes(path)
    except UnsafeFile as err:
        raise InputDataError(f"{path}: {what} {err}") from None
    if b"\x00" in data:
        raise InputDataError(f"{path}: {what} is not a text file (it holds NUL bytes)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputDataError(
            f"{path}: {what} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"
        ) from None


def text_stream(path: str | os.PathLike, what: str) -> io.StringIO:
    """:func:`read_text` as a file object for ``csv`` / ``pandas``."""
    return io.StringIO(read_text(path, what), newline="")


def check_output_file(path: str | os.PathLike, option: str, example: str = "predictions.csv") -> Path:
    """Refuse an output file path that is an existing folder (before any work is done)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{option} {p}: is a folder; give a file name, e.g. {p / example}")
    if p.exists() and not p.is_file():
        raise ConfigError(f"{option} {p}: exists and is not a regular file")
    return p


def check_output_dir(path: str | os.PathLike, option: str) -> Path:
    """Refuse an output folder path that exists as something other than a folder."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{option} {p}: exists and is not a folder")
    parent = next((q for q in p.parents if q.exists()), None)
    if parent is not None and not parent.is_dir():  # a file where a parent folder should be
        raise ConfigError(f"{option} {p}: {parent} is not a folder")
    return p
