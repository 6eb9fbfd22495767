"""Result files: atomic writes (a reader never sees half a file) and JSON of numpy values.

A failed write (full disk, unwritable folder) raises an ``OSError`` whose message names the
target path, and leaves neither the target nor a temporary file behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable

import numpy as np


def _named(e: OSError, path: str, what: str = "cannot write") -> OSError:
    """The OSError ``e`` again (same errno and type), with a message that names ``path``."""
    return type(e)(e.errno, f"{path}: {what} ({e.strerror or e})") if e.errno else OSError(
        f"{path}: {what} ({e})")


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def atomic_write(path: str, write: Callable[[str], None], suffix: str = "") -> str:
    """Write ``path`` through ``write(tmp_path)`` then ``os.replace``; returns ``path``.

    On failure the temporary file is removed and an ``OSError`` names ``path``.
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=suffix)
        os.close(fd)
    except OSError as e:
        raise _named(e, path) from e
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        raise _named(e, path) from e
    finally:
        if os.path.lexists(tmp):
            _remove_quietly(tmp)
    return path


def write_bytes(path: str, payload: bytes, suffix: str = "") -> str:
    """Write ``payload`` to ``path`` atomically; returns ``path``."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(payload)
    return atomic_write(path, write, suffix)


def check_writable_dir(folder: str) -> str:
    """Create ``folder`` if needed and prove it writable with a temporary file; returns it.

    Raises an ``OSError`` naming the folder when it cannot be created or written.
    """
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".tmp_writable_")
    except OSError as e:
        raise _named(e, folder, "not a writable folder") from e
    os.close(fd)
    _remove_quietly(probe)
    return folder


def jsonable(o: Any) -> Any:
    """``json.dump`` default: numpy scalars and arrays as Python values; anything else refused."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"{type(o).__name__} value {o!r} is not JSON serializable")


def floats(values: Any) -> list:
    """JSON-ready floats: None for missing or NaN/infinite entries (nested lists kept)."""
    return [floats(v) if isinstance(v, (list, tuple, np.ndarray)) and np.ndim(v)
            else None if v is None or not np.isfinite(v) else float(v) for v in values]


def write_json(path: str, obj: Any, indent: int = 2) -> str:
    """Write ``obj`` as JSON to ``path`` atomically (numpy values allowed)."""
    return write_bytes(path, json.dumps(obj, indent=indent, default=jsonable).encode(), ".json")
