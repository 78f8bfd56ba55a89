"""Input policy: decode one image file or say exactly why it is rejected.

Every check is explicit and nothing is converted silently. The only accepted deviations, each
documented in ``docs/decisions/data.md``:

* a fully opaque RGBA image is accepted and its alpha channel dropped (the alpha carries no
  information); RGBA with any pixel below 255 alpha is rejected;
* a patch smaller than the dataset's canvas (IDC edge patches, BreakHis 700x456) is padded with
  white (the slide background) at the bottom/right, and its original size is recorded;
* a store size given with ``--size`` resizes every accepted image (PIL bicubic, antialiased).

Rejection reasons are the module constants below; the first failing check wins, in the order
not found / not a regular file / too large (bytes; :mod:`cmafnet.data.safety`), zero bytes,
16-bit, not an image, too large (pixels), mode (grayscale/palette/...), truncated, transparency,
size. :func:`decode_image` never raises for a bad file. This module does not import torch so
ingest worker processes start fast.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from cmafnet.data.safety import (
    TOO_LARGE,
    UnsafeFile,
    check_pixels,
    limits,
    one_line,
    pil_guard,
    read_bytes,
)

ZERO_BYTES = "zero bytes"
NOT_IMAGE = "not an image"
TRUNCATED = "truncated or corrupt"
GRAYSCALE = "grayscale"
TRANSPARENT = "RGBA with transparency"
BIT16 = "16-bit"
UNSUPPORTED_MODE = "unsupported colour mode"
BAD_SIZE = "unexpected size"
BAD_NAME = "name does not parse"
LABEL_MISMATCH = "label folder disagrees with name"

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
PAD_VALUE = 255  # white: the glass/background colour of brightfield H&E

_PNG_SIG = b"\x89PNG\r\n\x1a\n"  # then the IHDR chunk, whose bit depth is byte 24
_GRAY_MODES = {"1", "L", "LA", "La"}
_BIT16_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


@dataclass(frozen=True)
class SizePolicy:
    """Which decoded sizes are accepted and how they reach the store size.

    Attributes:
        out_hw: the store's (H, W).
        canvas_hw: the dataset's native (H, W); accepted images are padded to it first.
        allow_smaller: accept any size that fits inside the canvas (IDC edge patches).
        extra_hw: further native sizes padded to the canvas (BreakHis 456x700).
        resize_any: resize any size to ``out_hw`` (folder ingest with an explicit ``--size``).
    """

    out_hw: tuple[int, int]
    canvas_hw: tuple[int, int]
    allow_smaller: bool = False
    extra_hw: frozenset[tuple[int, int]] = field(default_factory=frozenset)
    resize_any: bool = False

    def check(self, h: int, w: int) -> str | None:
        """None when (h, w) is accepted, else a detail string for :data:`BAD_SIZE`."""
        if self.resize_any or (h, w) in (self.out_hw, self.canvas_hw) or (h, w) in self.extra_hw:
            return None
        ch, cw = self.canvas_hw
        if self.allow_smaller and h <= ch and w <= cw:
            return None
        return f"{h}x{w}, expected {ch}x{cw}" + (" or smaller" if self.allow_smaller else "")

    def place(self, arr: np.ndarray) -> np.ndarray:
        """Pad/resize an accepted (h, w, 3) uint8 array to ``out_hw``."""
        h, w = arr.shape[:2]
        if (h, w) == self.out_hw:
            return arr
        if not self.resize_any and (h, w) != self.canvas_hw:
            ch, cw = self.canvas_hw
            canvas = np.full((ch, cw, 3), PAD_VALUE, np.uint8)
            canvas[:h, :w] = arr  # pad bottom/right: keeps the patch's own coordinates
            arr = canvas
        if arr.shape[:2] != self.out_hw:
            oh, ow = self.out_hw
            arr = np.asarray(Image.fromarray(arr).resize((ow, oh), Image.Resampling.BICUBIC))
        return arr


@dataclass
class Decoded:
    """The outcome of :func:`decode_image`: ``array`` is None when ``reason`` is set."""

    array: np.ndarray | None
    reason: str | None = None
    detail: str = ""
    sha256: str = ""
    orig_h: int = -1
    orig_w: int = -1
    dropped_alpha: bool = False


def decode_image(path: str | os.PathLike, policy: SizePolicy | None = None) -> Decoded:
    """Read, check and decode one file into an RGB uint8 array (placed per ``policy``).

    Never raises for a bad file: every problem, including the caps of :mod:`cmafnet.data.safety`
    (:func:`~cmafnet.data.safety.limits`), is a :class:`Decoded` with a reason.
    """
    lim = limits()
    try:
        data = read_bytes(path, lim)
    except UnsafeFile as err:
        return Decoded(None, err.reason, err.detail)
    if not data:
        return Decoded(None, ZERO_BYTES)
    sha = hashlib.sha256(data).hexdigest()
    if data[:8] == _PNG_SIG and data[12:16] == b"IHDR" and len(data) >= 26 and data[24] == 16:
        return Decoded(None, BIT16, "PNG with 16 bits per sample", sha)
    try:
        with pil_guard():
            return _decode(data, sha, policy, lim.max_pixels)
    except UnsafeFile as err:
        return Decoded(None, err.reason, err.detail, sha)
    except MemoryError:
        return Decoded(None, TOO_LARGE, "out of memory while decoding", sha)
    except Exception as err:  # a decoder bug or an exotic file must not stop a job
        return Decoded(None, TRUNCATED, f"{type(err).__name__}: {one_line(err, 120)}", sha)


def _decode(data: bytes, sha: str, policy: SizePolicy | None, max_pixels: int) -> Decoded:
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return Decoded(None, NOT_IMAGE, "format not recognised", sha)
    except (OSError, SyntaxError, ValueError) as err:
        return Decoded(None, NOT_IMAGE, one_line(err, 120), sha)
    w, h = im.size
    check_pixels(im, max_pixels)  # header only: before a single pixel is decoded
    mode = im.mode
    if mode in _BIT16_MODES:
        return Decoded(None, BIT16, f"mode {mode}", sha, h, w)
    if mode in _GRAY_MODES:
        return Decoded(None, GRAYSCALE, f"mode {mode}", sha, h, w)
    if mode not in ("RGB", "RGBA"):
        return Decoded(None, UNSUPPORTED_MODE, f"mode {mode}", sha, h, w)
    try:
        im.load()
    except Exception as err:  # PIL raises OSError, SyntaxError, zlib.error... on damaged data
        return Decoded(None, TRUNCATED, one_line(err, 120), sha, h, w)
    arr = np.asarray(im)
    dropped = False
    if mode == "RGBA":
        if int(arr[..., 3].min()) < 255:
            return Decoded(None, TRANSPARENT, f"min alpha {int(arr[..., 3].min())}", sha, h, w)
        arr, dropped = arr[..., :3], True
    if policy is not None:
        bad = policy.check(h, w)
        if bad:
            return Decoded(None, BAD_SIZE, bad, sha, h, w)
        arr = policy.place(np.ascontiguousarray(arr))
    return Decoded(np.ascontiguousarray(arr), None, "", sha, h, w, dropped)
