"""Result files: atomic writes (a reader never sees half a file) and JSON of numpy values."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable

import numpy as np


def atomic_write(path: str, write: Callable[[str], None], suffix: str = "") -> str:
    """Write ``path`` through ``write(tmp_path)`` then ``os.replace``; returns ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


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
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent, default=jsonable)
    return atomic_write(path, write, ".json")
