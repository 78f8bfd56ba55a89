"""Writing and reading files safely: never a torn file, whatever stops the process; never a pickle that
runs code; never two processes writing one folder.

The lowest layer of the package (it imports only the error types), so data, models, training and the
run-folder contract (:mod:`cmafnet.run`) all write and load through it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pickle
import re
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from itertools import takewhile
from pathlib import Path
from typing import Any

from cmafnet.errors import RunFolderError

LOCK_FILE = ".lock"
_HELD: set[Path] = set()  # folders this process holds (an inner hold of one of them changes nothing)


class FolderInUse(RunFolderError):
    """Another live process holds the folder (:func:`hold_folder`); ``holder`` names it."""

    def __init__(self, folder: Path, holder: str) -> None:
        super().__init__(f"{folder}: in use by {holder}; wait for it to end or choose another folder")
        self.holder = holder


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temporary file in the same folder, fsync, then rename (never a torn file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are meant to be shared like any file
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as indented JSON, written atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def load_plain_torch_file(path: str | Path, map_location: Any = "cpu", what: str = "file") -> Any:
    """``torch.load(weights_only=True)`` with one-line :class:`RunFolderError` refusals.

    A file holding pickled objects other than tensors and plain containers is refused, naming the
    global it would have imported; torch's own text (which advises ``weights_only=False``) is not
    relayed. A truncated or foreign file is "not a readable <what>".
    """
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"(?:Unsupported global: |unsupported )GLOBAL (\S+)", str(err))
        held = f" ({found.group(1)})" if found else ""
        raise RunFolderError(
            f"{path}: refused to load: it holds pickled Python objects{held}, which could run code; "
            "only plain tensors are loaded (convert it to safetensors)"
        ) from None
    except Exception as err:  # a truncated or foreign file
        first = (str(err).splitlines() or [type(err).__name__])[0].split(". ")[0][:120]
        raise RunFolderError(f"{path}: not a readable {what} ({first})") from None


@contextmanager
def hold_folder(folder: str | Path, what: str) -> Iterator[Path]:
    """Hold ``folder`` (created if missing) for this process's writes until the block ends.

    Another live process holding it raises :class:`FolderInUse` at once, naming its pid, host and
    ``what`` (e.g. ``"cmafnet train"``), before the caller has written anything. The lock is an
    ``flock`` on ``folder/.lock``, removed on release; the kernel drops the lock when the holder dies,
    ``kill -9`` included, so a dead holder's file is simply taken over. Folders the hold created are
    removed again if they are still empty on release. A nested hold of a folder this process already
    holds is a no-op (the experiment runner holds a run folder around training and
    evaluation, which hold it too). A folder this process may not write to is not locked: nothing of
    ours can change it.
    """
    folder = Path(folder)
    key = folder.resolve()
    if key in _HELD:
        yield folder
        return
    created = list(takewhile(lambda d: not d.exists(), (folder, *folder.parents)))  # deepest first
    folder.mkdir(parents=True, exist_ok=True)
    fd = _lock(folder / LOCK_FILE, what)
    if fd is None:
        yield folder
        return
    _HELD.add(key)
    try:
        yield folder
    finally:
        _HELD.remove(key)
        with suppress(OSError):  # while still locked, so no one else holds a removed file
            (folder / LOCK_FILE).unlink()
        os.close(fd)  # releases the lock
        for d in created:  # a hold that wrote nothing leaves nothing
            try:
                d.rmdir()
            except OSError:  # not empty (or no longer ours to remove)
                break


def _lock(path: Path, what: str) -> int | None:
    """An open descriptor of ``path`` holding its exclusive ``flock`` (None: not writable here)."""
    while True:
        fd = _open_lock_file(path)
        if fd is None:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise FolderInUse(path.parent, holder) from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)  # its holder removed the file between our open and our lock: lock the current one
    with suppress(OSError):  # opened read-only (another user's file): locked all the same, just not named
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} ({what})\n".encode(), 0)
    return fd


def _open_lock_file(path: Path) -> int | None:
    """``path`` opened for locking: read-write (created if missing), else read-only (an existing file of
    another user: ``flock`` needs no write access); None where neither is allowed."""
    for flags in (os.O_RDWR | os.O_CREAT, os.O_RDONLY):
        try:
            return os.open(path, flags | os.O_CLOEXEC, 0o666)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT):
                raise
    return None
