"""Atomic result files on a full disk or an unwritable folder: a clear error, no partial file."""

import builtins
import errno
import json
import os
import subprocess
import uuid

import numpy as np
import pytest

from rat_tf import files, plots


class _FullDiskFile:
    """A real file that accepts ``room`` bytes, then fails like a full disk."""

    def __init__(self, f, room):
        self._f, self._room = f, room

    def write(self, payload):
        self._f.write(payload[:self._room])
        if len(payload) > self._room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return len(payload)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@pytest.fixture
def full_disk(monkeypatch):
    """Every file files.py opens takes 100 bytes, then raises ENOSPC."""
    monkeypatch.setattr(files, "open", lambda path, mode="r": _FullDiskFile(
        builtins.open(path, mode), 100), raising=False)


def _left(folder):
    return sorted(os.listdir(folder))


def test_write_json_round_trip_with_numpy(tmp_path):
    path = files.write_json(str(tmp_path / "a" / "r.json"), {"x": np.float32(0.5),
                                                             "v": np.arange(3)})
    assert json.loads(open(path).read()) == {"x": 0.5, "v": [0, 1, 2]}
    assert _left(tmp_path / "a") == ["r.json"]


def test_write_json_full_disk_names_path_and_leaves_nothing(tmp_path, full_disk):
    target = tmp_path / "report.json"
    with pytest.raises(OSError, match="No space left") as e:
        files.write_json(str(target), {"values": list(range(1000))})
    assert e.value.errno == errno.ENOSPC and str(target) in str(e.value)
    assert _left(tmp_path) == []


def test_failed_overwrite_keeps_old_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    files.write_json(str(target), {"old": 1})

    def fail(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="Input/output error") as e:
        files.write_json(str(target), {"new": 2})
    assert str(target) in str(e.value)
    assert json.loads(target.read_text()) == {"old": 1} and _left(tmp_path) == ["metrics.json"]


def test_unserializable_value_leaves_nothing(tmp_path):
    with pytest.raises(TypeError, match="not JSON serializable"):
        files.write_json(str(tmp_path / "r.json"), {"f": object()})
    assert _left(tmp_path) == []


def test_folder_that_cannot_exist_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(OSError) as e:
        files.write_json(str(blocker / "sub" / "r.json"), {})
    assert str(blocker / "sub" / "r.json") in str(e.value)
    with pytest.raises(OSError, match="not a writable folder") as e:
        files.check_writable_dir(str(blocker / "sub"))
    assert str(blocker / "sub") in str(e.value)


def test_check_writable_dir_creates_and_probes(tmp_path, monkeypatch):
    folder = tmp_path / "out" / "deep"
    assert files.check_writable_dir(str(folder)) == str(folder)
    assert folder.is_dir() and _left(folder) == []

    def refuse(**kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    with pytest.raises(PermissionError, match="not a writable folder") as e:
        files.check_writable_dir(str(folder))
    assert str(folder) in str(e.value)


@pytest.mark.parametrize("figure", ["grid", "curve"])
def test_png_full_disk_names_path_and_leaves_nothing(tmp_path, full_disk, figure):
    target = str(tmp_path / f"{figure}.png")
    with pytest.raises(OSError, match="No space left") as e:
        if figure == "grid":
            plots.perturbation_grid(np.zeros((3, 8, 8, 1), np.float32), target, titles="abc")
        else:
            plots.accuracy_vs_radius({"m": {0.0: 0.9, 0.1: 0.5}}, target)
    assert str(target) in str(e.value) and _left(tmp_path) == []


def test_png_written_whole(tmp_path):
    path = plots.perturbation_grid(np.random.default_rng(0).uniform(
        -0.3, 0.3, (10, 28, 28, 1)).astype(np.float32), str(tmp_path / "v.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert _left(tmp_path) == ["v.png"]


def test_real_full_tmpfs(tmp_path):
    """On a 64 KiB tmpfs (where this process may mount one): a real ENOSPC, nothing left."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", f"tmpfs_{uuid.uuid4().hex[:6]}",
                       str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        files.write_json(str(mnt / "small.json"), {"a": 1})
        big = np.random.default_rng(0).uniform(size=(400, 400, 3))
        with pytest.raises(OSError, match="No space left") as e:
            files.write_json(str(mnt / "big.json"), {"v": big})
        assert str(mnt / "big.json") in str(e.value)
        with pytest.raises(OSError, match="No space left") as e:
            plots.perturbation_grid(big.reshape(10, 40, 400, 3)[:, :, :40], str(mnt / "v.png"),
                                    dpi=400, max_bytes=10**9)
        assert str(mnt / "v.png") in str(e.value)
        assert _left(mnt) == ["small.json"]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
