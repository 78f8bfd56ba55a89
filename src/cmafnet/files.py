"""Writing and reading files safely: never a torn file, whatever stops the process; never a pickle that
runs code.

The lowest layer of the package (it imports only the error types), so data, models, training and the
run-folder contract (:mod:`cmafnet.run`) all write and load through it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import Any

from cmafnet.errors import RunFolderError


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
