"""Builders shared by the failure corpus (tests cannot import a conftest)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import cmafnet
from cmafnet.config import dump_config, load_config
from cmafnet.models import create_model
from cmafnet.run import CONFIG_FILE, WEIGHTS_FILE, save_weights, write_meta

STORE_CLASSES = ["non-IDC", "IDC"]
# `train` in a second: the smoke config on the corpus store, one step per epoch, 32 px, no stain step
SMOKE_SETS = ["train.batch_size=8", "train.eval_batch_size=16", "train.max_steps_per_epoch=1",
              "data.stain.enabled=false", "model.img_size=32"]  # fmt: skip
FAST = [
    "--config",
    "smoke",
    *(a for s in SMOKE_SETS for a in ("--set", s)),
    "--no-progress",
    "--device",
    "cpu",
]


def png_header(path: Path, width: int, height: int) -> Path:
    """A tiny PNG that *declares* ``width x height`` RGB pixels (a decompression bomb's header)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(tag + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def rgb_png(path: Path, size: int = 40, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


class FifoWatch:
    """Detects (and releases) a reader blocked on a FIFO, so a regression fails instead of hanging.

    A writer can open a FIFO without blocking only while a reader holds it open; the watcher tries
    every 50 ms and, if it succeeds, records it and closes at once (the reader sees end of file).
    """

    def __init__(self, path: Path) -> None:
        self.path, self.blocked_reader = path, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: nobody is reading
                continue
            self.blocked_reader = True
            os.close(fd)

    def __enter__(self) -> FifoWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def one_error_line(err: str) -> str:
    """The single stderr line of a failed command (no traceback, nothing else)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, f"expected one error line, got:\n{err}"
    return lines[0]


def make_run(root: Path, classes: list[str] = STORE_CLASSES) -> Path:
    cfg = load_config("smoke", ["model.name=resnet18", "model.img_size=32", "data.stain.enabled=false"])
    root.mkdir(parents=True)
    (root / CONFIG_FILE).write_text(dump_config(cfg))
    write_meta(root, {"classes": classes, "img_size": 32, "status": "finished", "dataset": "idc"})
    torch.manual_seed(0)
    save_weights(create_model(cfg.model), root / WEIGHTS_FILE)
    return root


def python(script: str, *args: object) -> subprocess.Popen:
    """``script`` in a fresh Python with this cmafnet importable; stdin and stdout are pipes (text)."""
    env = {**os.environ, "PYTHONPATH": str(Path(cmafnet.__file__).parents[1])}
    argv = [sys.executable, "-c", script, *map(str, args)]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


HOLD = """import sys
from cmafnet.files import hold_folder
with hold_folder(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin (or kills us)
"""


class Holder:
    """Another process holding ``folder`` as ``what`` (:func:`cmafnet.files.hold_folder`) until
    :meth:`release` or :meth:`kill` (``kill -9``); killed on exit whatever happened."""

    def __init__(self, folder: Path, what: str = "cmafnet train") -> None:
        self.proc = python(HOLD, folder, what)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "held"
        self.pid = self.proc.pid

    def release(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(60) == 0

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no cleanup of any kind runs in the holder
        self.proc.wait(60)

    def __enter__(self) -> Holder:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.kill()


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` (the lock file aside) with its size and modification time."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }
