"""Readers of the standard dataset files: IDX (MNIST, Fashion-MNIST) and CIFAR-10 (binary and
python versions, the latter through a restricted unpickler), gzipped or not, validated and
optionally checked against the official md5s; every problem is a :class:`DataError` naming the
file."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import zlib

import numpy as np
from absl import logging

class DataError(ValueError):
    """A data file is missing, truncated, corrupted or of the wrong format."""


# Official md5 of the decompressed files (the IDX / CIFAR binary releases).
OFFICIAL_MD5: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion_mnist": {},  # only the .gz md5s are published for Fashion-MNIST
    "cifar10": {
        "data_batch_1.bin": "5dd7e06a14cb22eb9f671a540d1b7c25",
        "data_batch_2.bin": "5ea93a67294ea407fff1d09f752e9692",
        "data_batch_3.bin": "942cd6a4bcdd0dd3c604fbe906cb4421",
        "data_batch_4.bin": "ae636b3ba5c66a11e91e8cb52e771fcb",
        "data_batch_5.bin": "53f37980c15c3d472c316c40844f3f0d",
        "test_batch.bin": "803d5f7f4d78ea53de84dbe85f74fb6d",
    },
}
OFFICIAL_GZ_MD5: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "cifar10": {},
}
_CIFAR_RECORD = 1 + 32 * 32 * 3  # bytes of one record: the label, then the image


def find_file(folder: str, base: str) -> str | None:
    """``folder/base`` or ``folder/base.gz``, whichever is a file first; None if neither."""
    for cand in (base, base + ".gz"):
        p = os.path.join(folder, cand)
        if os.path.isfile(p):
            return p
    return None


def _read_bytes(path: str, dataset: str, verify: bool) -> bytes:
    """Read a file, transparently gunzipping; check official checksums when asked."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e
    base = os.path.basename(path)
    plain = base[:-3] if base.endswith(".gz") else base
    if verify and base not in OFFICIAL_GZ_MD5.get(dataset, {}) and plain not in OFFICIAL_MD5.get(
            dataset, {}):
        logging.warning("%s: no official checksum is known for this file: not verified", path)
    if verify and base in OFFICIAL_GZ_MD5.get(dataset, {}):
        got = hashlib.md5(raw).hexdigest()
        if got != OFFICIAL_GZ_MD5[dataset][base]:
            raise DataError(f"{path}: md5 {got} differs from the official "
                            f"{OFFICIAL_GZ_MD5[dataset][base]} (corrupted or not the official "
                            f"file)")
    if raw[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
            raise DataError(f"{path}: corrupted or truncated gzip stream ({e})") from e
    else:
        data = raw
    if verify and plain in OFFICIAL_MD5.get(dataset, {}):
        got = hashlib.md5(data).hexdigest()
        if got != OFFICIAL_MD5[dataset][plain]:
            raise DataError(f"{path}: md5 of the contents {got} differs from the official "
                            f"{OFFICIAL_MD5[dataset][plain]} (corrupted or not the official file)")
    return data


def read_idx(path: str, dataset: str = "", verify: bool = False) -> np.ndarray:
    """Read an IDX file (images: magic 2051, labels: magic 2049), gzipped or not, validated."""
    data = _read_bytes(path, dataset, verify)
    if len(data) < 8:
        raise DataError(f"{path}: {len(data)} bytes is too short for an IDX header")
    magic, count = struct.unpack(">II", data[:8])
    if magic == 2049:
        header, shape = 8, (count,)
    elif magic == 2051:
        if len(data) < 16:
            raise DataError(f"{path}: truncated IDX image header")
        rows, cols = struct.unpack(">II", data[8:16])
        header, shape = 16, (count, rows, cols)
    else:
        raise DataError(f"{path}: bad IDX magic number {magic} (expected 2049 for labels or "
                        f"2051 for images)")
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        kind = "truncated" if len(data) < expected else "has trailing bytes"
        raise DataError(f"{path}: {kind}: {len(data)} bytes, header promises {expected}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def check_labels(labels: np.ndarray, num_classes: int, where: str, what: str = "label") -> None:
    """Raise :class:`DataError` naming the first label outside 0..num_classes-1 and its index."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        more = f"; {bad.size} labels out of range in all" if bad.size > 1 else ""
        raise DataError(f"{where}: {what} {int(labels[i])} at index {i} out of range "
                        f"0..{num_classes - 1} (corrupted{more})")


def read_cifar10_bin(path: str, verify: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 binary-version batch: (uint8 images NHWC, int32 labels)."""
    data = _read_bytes(path, "cifar10", verify)
    if len(data) == 0 or len(data) % _CIFAR_RECORD:
        raise DataError(f"{path}: {len(data)} bytes is not a whole number of "
                        f"{_CIFAR_RECORD}-byte CIFAR-10 records (truncated or corrupted)")
    rec = np.frombuffer(data, np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = rec[:, 0].astype(np.int32)
    check_labels(labels, 10, path, "label byte")
    images = rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that admits only plain containers and numpy arrays; anything else is refused."""

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
        ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "bytes"),
        ("builtins", "str"), ("builtins", "int"), ("builtins", "float"), ("_codecs", "encode"),
        ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"refusing to unpickle {module}.{name}: only plain containers and "
                        f"numpy arrays are allowed")


def safe_unpickle(data: bytes) -> object:
    """Unpickle bytes with the restricted unpickler (CIFAR-10 python version)."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except DataError:
        raise
    except Exception as e:  # truncated / garbage pickles raise many kinds
        raise DataError(f"not a valid pickle ({type(e).__name__}: {e})") from e


def read_cifar10_py(path: str, verify: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python-version batch through the restricted unpickler."""
    data = _read_bytes(path, "cifar10", verify)
    try:
        batch = safe_unpickle(data)
    except DataError as e:
        raise DataError(f"{path}: {e}") from e
    if not isinstance(batch, dict):
        raise DataError(f"{path}: expected a dict, got {type(batch).__name__}")
    batch = {(k.decode() if isinstance(k, bytes) else k): v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataError(f"{path}: missing 'data' or 'labels' entry")
    arr = np.asarray(batch["data"])
    if arr.dtype != np.uint8:  # a cast would silently wrap or truncate other pixel values
        raise DataError(f"{path}: 'data' holds {arr.dtype} pixels, CIFAR-10 stores uint8")
    labels = np.asarray(batch["labels"], np.int32)
    if labels.ndim == 1:
        check_labels(labels, 10, path)
    if arr.ndim != 2 or arr.shape[1] != 3072 or arr.shape[0] != labels.shape[0]:
        raise DataError(f"{path}: data shape {arr.shape} / {labels.shape} labels do not match "
                        f"CIFAR-10 (N x 3072, N labels)")
    return np.ascontiguousarray(arr.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), labels
