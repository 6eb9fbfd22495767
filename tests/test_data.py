"""Data readers on the real MNIST / CIFAR-10 files, their failure modes, subsets and pipelines."""

import dataclasses
import gzip
import os
import pickle
import re
import shutil
import struct
import sys
import types

import numpy as np
import pytest
import tensorflow as tf

from rat_tf import data

MNIST_HIST = {"train": [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
              "test": [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]}
CIFAR_FIRST = {"train": [6, 9, 9, 4, 1, 1, 2, 7, 8, 3], "test": [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]}
CIFAR_B1_HIST = [1005, 974, 1032, 1016, 999, 937, 1030, 1001, 1025, 981]


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cifar_train(data_dir):
    """Full CIFAR-10 train as uint8 (the float copy would be 600 MB)."""
    return data.load_files("cifar10", "train", data_dir)


@pytest.fixture(scope="module")
def cifar_test(data_dir):
    return data.load_arrays("cifar10", "test", "files", data_dir)


def _mnist_copy(data_dir, tmp_path, sub="mnist"):
    """Copy the (small) real MNIST test files into tmp_path/sub; return that folder."""
    folder = tmp_path / sub
    folder.mkdir()
    for base in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(os.path.join(data_dir, "mnist", base), folder / base)
    return folder


def _idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr, np.uint8)
    if arr.ndim == 1:
        return struct.pack(">II", 2049, len(arr)) + arr.tobytes()
    return struct.pack(">IIII", 2051, *arr.shape) + arr.tobytes()


def _shrink(monkeypatch, name, **counts):
    """Pretend a dataset split has fewer examples (to test readers on small synthetic files)."""
    info = data.DATASETS[name]
    monkeypatch.setitem(data.DATASETS, name, dataclasses.replace(
        info, num_examples={**info.num_examples, **counts}))


# --------------------------------------------------------------------------- real MNIST
@pytest.mark.parametrize("split", ["train", "test"])
def test_mnist_counts_and_histograms(mnist_arrays, split):
    x_train, y_train, x_test, y_test = mnist_arrays
    x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
    n = sum(MNIST_HIST[split])
    assert x.shape == (n, 28, 28, 1) and x.dtype == np.float32
    assert y.shape == (n,) and y.dtype == np.int32
    assert x.min() == 0.0 and x.max() == 1.0
    assert data.class_histogram(y) == MNIST_HIST[split]


@pytest.mark.parametrize("split", ["train", "test"])
def test_mnist_checksums_pass_and_match_arrays(data_dir, mnist_arrays, split):
    images, labels = data.load_files("mnist", split, data_dir, verify_checksums=True)
    x, y = mnist_arrays[0:2] if split == "train" else mnist_arrays[2:4]
    assert images.dtype == np.uint8
    np.testing.assert_array_equal(images.astype(np.float32) / 255.0, x)
    np.testing.assert_array_equal(labels, y)


def test_info_and_unknown_names(data_dir):
    assert data.get_info("mnist").image_shape == (28, 28, 1)
    assert data.get_info("cifar10").image_shape == (32, 32, 3)
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        data.get_info("svhn")
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_arrays("svhn", "test", "files", data_dir)
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        data.load_arrays("mnist", "validation", "files", data_dir)
    with pytest.raises(ValueError, match="unknown data source 'web'"):
        data.load_arrays("mnist", "test", "web", data_dir)


def test_no_data_dir_is_a_clear_error(monkeypatch):
    monkeypatch.delenv(data.ENV_DATA_DIR, raising=False)
    assert not data.files_available("mnist")
    with pytest.raises(data.DataError, match="no data directory"):
        data.load_files("mnist", "test")


# --------------------------------------------------------------------------- real CIFAR-10
def test_cifar_train_counts(cifar_train):
    images, labels = cifar_train
    assert images.shape == (50000, 32, 32, 3) and images.dtype == np.uint8
    assert labels.dtype == np.int32
    assert data.class_histogram(labels) == [5000] * 10
    assert labels[:10].tolist() == CIFAR_FIRST["train"]
    assert data.class_histogram(labels[:10000]) == CIFAR_B1_HIST


def test_cifar_test_counts(cifar_test):
    x, y = cifar_test
    assert x.shape == (10000, 32, 32, 3) and x.dtype == np.float32
    assert y.dtype == np.int32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert data.class_histogram(y) == [1000] * 10
    assert y[:10].tolist() == CIFAR_FIRST["test"]


def test_cifar_checksum_one_batch_and_layout(data_dir, cifar_train):
    path = os.path.join(data_dir, "cifar10", "data_batch_1.bin.gz")
    images, labels = data.read_cifar10_bin(path, verify=True)
    np.testing.assert_array_equal(images, cifar_train[0][:10000])
    np.testing.assert_array_equal(labels, cifar_train[1][:10000])
    # NHWC from the R, G, B planes of the record.
    with gzip.open(path) as f:
        rec = np.frombuffer(f.read(2 * 3073), np.uint8).reshape(2, 3073)
    np.testing.assert_array_equal(images[1, :, :, 2].ravel(), rec[1, 1 + 2048:])
    np.testing.assert_array_equal(images[0, 0, :, 0], rec[0, 1:33])


def test_cifar_class_names_match_meta_file(data_dir):
    with open(os.path.join(data_dir, "cifar10", "batches.meta.txt")) as f:
        names = [ln.strip() for ln in f if ln.strip()]
    assert tuple(names) == data.get_info("cifar10").class_names


# --------------------------------------------------------------------------- corrupted files
def test_truncated_gzip_names_file(data_dir, tmp_path):
    folder = _mnist_copy(data_dir, tmp_path)
    path = folder / "t10k-images-idx3-ubyte.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(data.DataError, match="truncated") as e:
        data.load_files("mnist", "test", str(tmp_path))
    assert str(path) in str(e.value)


@pytest.mark.parametrize("where", ["middle", "crc"])
def test_flipped_byte_in_gzip(data_dir, tmp_path, where):
    folder = _mnist_copy(data_dir, tmp_path)
    path = folder / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(path.read_bytes())
    raw[100 if where == "middle" else len(raw) - 6] ^= 0xFF  # deflate data (zlib.error) / CRC
    path.write_bytes(bytes(raw))
    with pytest.raises(data.DataError, match="corrupted") as e:
        data.load_files("mnist", "test", str(tmp_path))
    assert str(path) in str(e.value)


def test_flipped_byte_caught_by_checksum(data_dir, tmp_path):
    """A flipped pixel in an uncompressed file reads fine but fails the official md5."""
    folder = _mnist_copy(data_dir, tmp_path)
    gz = folder / "t10k-images-idx3-ubyte.gz"
    plain = bytearray(gzip.decompress(gz.read_bytes()))
    gz.unlink()
    plain[5000] ^= 0x01
    path = folder / "t10k-images-idx3-ubyte"
    path.write_bytes(bytes(plain))
    images, _ = data.load_files("mnist", "test", str(tmp_path))  # no check: silently different
    assert images.shape == (10000, 28, 28, 1)
    with pytest.raises(data.DataError, match="md5") as e:
        data.load_files("mnist", "test", str(tmp_path), verify_checksums=True)
    assert str(path) in str(e.value)


def test_verify_checksums_module_default(data_dir, tmp_path, monkeypatch):
    """set_verify_checksums (the binaries' --verify_checksums) applies where no value is passed."""
    folder = _mnist_copy(data_dir, tmp_path)
    gz = folder / "t10k-images-idx3-ubyte.gz"
    plain = bytearray(gzip.decompress(gz.read_bytes()))
    gz.unlink()
    plain[16 + 100] ^= 0x80
    path = folder / "t10k-images-idx3-ubyte"
    path.write_bytes(bytes(plain))
    monkeypatch.setattr(data, "_verify_checksums", False)  # restored after the test
    assert data.load_arrays("mnist", "test", "auto", str(tmp_path))[0].shape[0] == 10000
    data.set_verify_checksums(True)
    for load in (lambda: data.load_arrays("mnist", "test", "auto", str(tmp_path)),
                 lambda: data.load("mnist", "test", 100, data_dir=str(tmp_path))):
        with pytest.raises(data.DataError, match="md5") as e:
            load()
        assert str(path) in str(e.value)
    x, _ = data.load_arrays("mnist", "test", "files", str(tmp_path), verify_checksums=False)
    assert x.shape[0] == 10000  # an explicit value wins


def test_gz_checksum_mismatch(data_dir, tmp_path):
    folder = _mnist_copy(data_dir, tmp_path)
    path = folder / "t10k-labels-idx1-ubyte.gz"
    labels = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(labels, compresslevel=1))  # same contents, other bytes
    data.load_files("mnist", "test", str(tmp_path))
    with pytest.raises(data.DataError, match="md5") as e:
        data.load_files("mnist", "test", str(tmp_path), verify_checksums=True)
    assert str(path) in str(e.value)


def test_wrong_magic(data_dir, tmp_path):
    folder = _mnist_copy(data_dir, tmp_path)
    path = folder / "t10k-labels-idx1-ubyte.gz"
    plain = bytearray(gzip.decompress(path.read_bytes()))
    plain[3] = 0x07  # magic 2049 -> 2055
    path.write_bytes(gzip.compress(bytes(plain)))
    with pytest.raises(data.DataError, match="bad IDX magic number 2055") as e:
        data.load_files("mnist", "test", str(tmp_path))
    assert str(path) in str(e.value)


def test_images_and_labels_swapped(data_dir, tmp_path):
    folder = _mnist_copy(data_dir, tmp_path)
    img = folder / "t10k-images-idx3-ubyte.gz"
    lbl = folder / "t10k-labels-idx1-ubyte.gz"
    tmp = folder / "tmp"
    img.rename(tmp)
    lbl.rename(img)
    tmp.rename(lbl)
    with pytest.raises(data.DataError, match="not an image file"):
        data.load_files("mnist", "test", str(tmp_path))


def test_label_image_count_mismatch(data_dir, tmp_path):
    folder = _mnist_copy(data_dir, tmp_path)
    path = folder / "t10k-labels-idx1-ubyte.gz"
    labels = data.read_idx(str(path))
    path.write_bytes(gzip.compress(_idx_bytes(labels[:9999])))
    with pytest.raises(data.DataError, match="10000 images but .* 9999 labels") as e:
        data.load_files("mnist", "test", str(tmp_path))
    assert str(path) in str(e.value)


def test_idx_size_disagrees_with_header(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    good = _idx_bytes(np.zeros((3, 4, 4)))
    path.write_bytes(good[:-1])
    with pytest.raises(data.DataError, match="truncated") as e:
        data.read_idx(str(path))
    assert str(path) in str(e.value)
    path.write_bytes(good + b"\x00")
    with pytest.raises(data.DataError, match="trailing bytes"):
        data.read_idx(str(path))
    path.write_bytes(b"\x00\x00")
    with pytest.raises(data.DataError, match="too short"):
        data.read_idx(str(path))


def test_cifar_wrong_record_size_and_bad_label(tmp_path):
    path = tmp_path / "data_batch_1.bin"
    path.write_bytes(bytes(3073 * 2 + 5))
    with pytest.raises(data.DataError, match="3073-byte CIFAR-10 records") as e:
        data.read_cifar10_bin(str(path))
    assert str(path) in str(e.value)
    path.write_bytes(b"")
    with pytest.raises(data.DataError, match="records"):
        data.read_cifar10_bin(str(path))
    rec = np.zeros((2, 3073), np.uint8)
    rec[1, 0] = 10
    path.write_bytes(rec.tobytes())
    with pytest.raises(data.DataError, match="label byte 10 at index 1 out of range 0..9") as e:
        data.read_cifar10_bin(str(path))
    assert str(path) in str(e.value)


def test_mnist_label_out_of_range_names_value_and_index(data_dir, tmp_path):
    folder = _mnist_copy(data_dir, tmp_path)
    path = folder / "t10k-labels-idx1-ubyte.gz"
    labels = data.read_idx(str(path)).copy()
    labels[1234], labels[5000] = 12, 200
    path.write_bytes(gzip.compress(_idx_bytes(labels)))
    with pytest.raises(data.DataError, match="label 12 at index 1234 out of range 0..9") as e:
        data.load_files("mnist", "test", str(tmp_path))
    assert str(path) in str(e.value) and "2 labels out of range" in str(e.value)


def test_cifar_python_label_out_of_range_named(tmp_path):
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({b"data": np.zeros((3, 3072), np.uint8),
                                   b"labels": [1, 2, -1]}))
    with pytest.raises(data.DataError, match="label -1 at index 2 out of range") as e:
        data.read_cifar10_py(str(path))
    assert str(path) in str(e.value)


def test_cifar_short_split_fails_count_check(tmp_path):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    (folder / "test_batch.bin").write_bytes(np.zeros((10, 3073), np.uint8).tobytes())
    with pytest.raises(data.DataError, match=r"shape \(10, 32, 32, 3\), expected \(10000"):
        data.load_files("cifar10", "test", str(tmp_path))
    with pytest.raises(data.DataError, match="no cifar10 train files") as e:
        data.load_files("cifar10", "train", str(tmp_path))  # no data_batch_1 anywhere
    assert "data_batch_5.bin[.gz]" in str(e.value) and str(folder) in str(e.value)


def test_cifar_missing_batch_named(tmp_path):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    (folder / "data_batch_1.bin").write_bytes(np.zeros((10, 3073), np.uint8).tobytes())
    with pytest.raises(data.DataError, match="data_batch_2.bin.*missing"):
        data.load_files("cifar10", "train", str(tmp_path))


# --------------------------------------------------------------------------- CIFAR python version
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _Evil(str(marker)), b"labels": [1]})
    with pytest.raises(data.DataError, match="refusing to unpickle .*system"):
        data.safe_unpickle(payload)
    assert not marker.exists()
    for obj in (types.SimpleNamespace(a=1), eval):
        with pytest.raises(data.DataError, match="refusing"):
            data.safe_unpickle(pickle.dumps(obj))
    with pytest.raises(data.DataError, match="not a valid pickle"):
        data.safe_unpickle(b"\x80\x04garbage")
    # Through the loader, the error names the file.
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(payload)
    with pytest.raises(data.DataError, match="test_batch: refusing"):
        data.load_files("cifar10", "test", str(tmp_path))
    assert not marker.exists()


def _py_batch(images: np.ndarray, labels: np.ndarray, protocol: int = 2) -> bytes:
    """A batch in the official python-version layout (dict of bytes keys, N x 3072 planes)."""
    flat = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    batch = {b"batch_label": b"a batch", b"labels": [int(v) for v in labels], b"data": flat,
             b"filenames": [b"img_%d.png" % i for i in range(len(labels))]}
    return pickle.dumps(batch, protocol=protocol)


def test_cifar_python_version_equals_binary(data_dir, tmp_path, cifar_test):
    """The real test batch rewritten in the python layout loads to the same arrays."""
    images, labels = data.read_cifar10_bin(os.path.join(data_dir, "cifar10", "test_batch.bin.gz"))
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    # Python-2-era pickles name numpy.core (not numpy._core).
    raw = _py_batch(images, labels, protocol=2).replace(b"numpy._core.", b"numpy.core.")
    (folder / "test_batch").write_bytes(raw)
    x, y = data.load_arrays("cifar10", "test", "files", str(tmp_path))
    np.testing.assert_array_equal(x, cifar_test[0])
    np.testing.assert_array_equal(y, cifar_test[1])


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_python_version_train(tmp_path, monkeypatch, protocol):
    _shrink(monkeypatch, "cifar10", train=5 * 8)
    rng = np.random.default_rng(protocol)
    images = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(40) % 10
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(5):
        part = slice(8 * i, 8 * i + 8)
        (folder / f"data_batch_{i + 1}").write_bytes(
            _py_batch(images[part], labels[part], protocol))
    got_x, got_y = data.load_files("cifar10", "train", str(tmp_path))
    np.testing.assert_array_equal(got_x, images)
    np.testing.assert_array_equal(got_y, labels)
    assert got_y.dtype == np.int32


def test_cifar_python_version_bad_content(tmp_path):
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({b"data": np.zeros((3, 3072), np.uint8), b"labels": [1, 2]}))
    with pytest.raises(data.DataError, match="do not match"):
        data.read_cifar10_py(str(path))
    path.write_bytes(pickle.dumps({b"labels": [1, 2]}))
    with pytest.raises(data.DataError, match="missing 'data'"):
        data.read_cifar10_py(str(path))
    path.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(data.DataError, match="expected a dict"):
        data.read_cifar10_py(str(path))
    # pixels rescaled to [0, 1] would become all zeros in a silent uint8 cast
    path.write_bytes(pickle.dumps({b"data": np.full((2, 3072), 0.5), b"labels": [1, 2]}))
    with pytest.raises(data.DataError, match="float64 pixels"):
        data.read_cifar10_py(str(path))


# --------------------------------------------------------------------------- Fashion-MNIST
def _write_fashion(tmp_path, n=20, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    folder = tmp_path / "fashion_mnist"
    folder.mkdir()
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images)))
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(labels)))
    return images, labels


def test_fashion_mnist_reads_idx_files(tmp_path, monkeypatch):
    images, labels = _write_fashion(tmp_path)
    assert data.files_available("fashion_mnist", str(tmp_path))
    assert not data.files_available("mnist", str(tmp_path))
    with pytest.raises(data.DataError, match=r"shape \(20, 28, 28, 1\), expected \(10000"):
        data.load_files("fashion_mnist", "test", str(tmp_path))
    _shrink(monkeypatch, "fashion_mnist", test=20)
    x, y = data.load_arrays("fashion_mnist", "test", "auto", str(tmp_path))
    np.testing.assert_array_equal(x[..., 0], images.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(y, labels)
    # Synthetic files are not the official ones.
    with pytest.raises(data.DataError, match="md5"):
        data.load_files("fashion_mnist", "test", str(tmp_path), verify_checksums=True)


def _fake_tfds(monkeypatch, calls):
    """A stand-in tensorflow_datasets that records its calls and returns grey images."""
    def fake_load(name, split, as_supervised, batch_size, data_dir=None):
        calls.append((name, split, as_supervised, batch_size))
        images = np.full((10000, 28, 28, 1), 51, np.uint8)
        return images, np.arange(10000, dtype=np.int64) % 10

    fake = types.ModuleType("tensorflow_datasets")
    fake.load = fake_load
    fake.as_numpy = lambda ds: ds
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)


def test_tfds_only_when_asked(tmp_path, monkeypatch):
    calls = []
    _fake_tfds(monkeypatch, calls)
    assert not data.files_available("fashion_mnist", str(tmp_path))
    for source in ("auto", "files"):  # never a silent download
        with pytest.raises(data.DataError, match=re.escape(
                "no fashion_mnist test files: looked for t10k-images-idx3-ubyte[.gz], "
                "t10k-labels-idx1-ubyte[.gz] in ")) as e:
            data.load_arrays("fashion_mnist", "test", source, str(tmp_path))
        assert str(tmp_path / "fashion_mnist") in str(e.value)
        assert "RAT_DATA_DIR" in str(e.value) and "--data_dir" in str(e.value)
    assert calls == []
    x, y = data.load_arrays("fashion_mnist", "test", "tfds", str(tmp_path))
    assert calls == [("fashion_mnist", "test", True, -1)]
    assert x.shape == (10000, 28, 28, 1) and x.dtype == np.float32
    np.testing.assert_allclose(x, 0.2)
    assert y.dtype == np.int32 and data.class_histogram(y) == [1000] * 10


def test_auto_without_data_dir_says_where_to_point(monkeypatch):
    monkeypatch.delenv(data.ENV_DATA_DIR, raising=False)
    with pytest.raises(data.DataError, match="no data directory for mnist train") as e:
        data.load_arrays("mnist", "train", "auto")
    msg = str(e.value)
    assert "train-images-idx3-ubyte[.gz]" in msg and "mnist/" in msg and "RAT_DATA_DIR" in msg


def test_missing_split_is_named(data_dir, tmp_path):
    """The test files are there, the train split is not: auto names the train files."""
    _mnist_copy(data_dir, tmp_path)
    assert data.files_available("mnist", str(tmp_path))
    assert data.load_arrays("mnist", "test", "auto", str(tmp_path))[0].shape[0] == 10000
    with pytest.raises(data.DataError, match=re.escape(
            "no mnist train files: looked for train-images-idx3-ubyte[.gz], "
            "train-labels-idx1-ubyte[.gz] in ")) as e:
        data.load_arrays("mnist", "train", "auto", str(tmp_path))
    assert str(tmp_path / "mnist") in str(e.value)


def test_tfds_without_its_modules_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails
    with pytest.raises(data.DataError, match="needs tensorflow_datasets") as e:
        data.load_arrays("mnist", "test", "tfds", str(tmp_path))
    assert "RAT_DATA_DIR" in str(e.value)


# --------------------------------------------------------------------------- subsets
def test_balanced_subset(mnist_arrays):
    _, _, x_test, y_test = mnist_arrays
    xs, ys = data.balanced_subset(x_test, y_test, 7, seed=3)
    assert xs.shape == (70, 28, 28, 1) and data.class_histogram(ys) == [7] * 10
    assert not np.all(np.diff(ys) >= 0), "subset should be shuffled, not sorted by class"
    xs2, ys2 = data.balanced_subset(x_test, y_test, 7, seed=3)
    np.testing.assert_array_equal(xs, xs2)
    np.testing.assert_array_equal(ys, ys2)
    _, ys3 = data.balanced_subset(x_test, y_test, 7, seed=4)
    idx3 = data.subset_indices(y_test, 7, seed=4)
    assert not np.array_equal(data.subset_indices(y_test, 7, seed=3), idx3)
    idx = data.subset_indices(y_test, 7, seed=3)
    assert len(set(idx.tolist())) == 70 and idx.max() < len(y_test)
    np.testing.assert_array_equal(x_test[idx], xs)
    np.testing.assert_array_equal(y_test[idx3], ys3)
    with pytest.raises(ValueError, match="class 5 has only 892"):
        data.balanced_subset(x_test, y_test, 900)
    with pytest.raises(ValueError, match="n_per_class must be positive"):
        data.balanced_subset(x_test, y_test, 0)


# --------------------------------------------------------------------------- tf.data pipelines
def _ids(n):
    """Images whose first pixel encodes their index, and labels equal to the index."""
    x = np.zeros((n, 4, 4, 1), np.float32)
    x[:, 0, 0, 0] = np.arange(n) / n
    return x, np.arange(n)


def test_make_dataset_batches_and_dtypes():
    x, y = _ids(100)
    ds = data.make_dataset(x, y, 32)
    batches = list(ds.as_numpy_iterator())
    assert [len(b[1]) for b in batches] == [32, 32, 32, 4]
    assert batches[0][0].dtype == np.float32 and batches[0][1].dtype == np.int32
    assert ds.element_spec[0].dtype == tf.float32 and ds.element_spec[1].dtype == tf.int32
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), np.arange(100))
    ds = data.make_dataset(x, y, 32, drop_remainder=True)
    assert [len(b[1]) for b in ds.as_numpy_iterator()] == [32, 32, 32]
    a = np.concatenate([b[1] for b in data.make_dataset(x, y, 32, shuffle=True, seed=1)])
    b = np.concatenate([b[1] for b in data.make_dataset(x, y, 32, shuffle=True, seed=1)])
    c = np.concatenate([b[1] for b in data.make_dataset(x, y, 32, shuffle=True, seed=2)])
    np.testing.assert_array_equal(a, b)
    assert sorted(a.tolist()) == list(range(100)) and not np.array_equal(a, c)
    rep = data.make_dataset(x, y, 64, repeat=True)
    assert [len(b[1]) for b in rep.take(3).as_numpy_iterator()] == [64, 64, 64]
    with pytest.raises(ValueError, match="batch_size must be positive"):
        data.make_dataset(x, y, 0)
    with pytest.raises(ValueError, match="expected images"):
        data.make_dataset(x, y[:-1], 8)


def test_load_real_subset(data_dir):
    for bad in ({"limit": -5}, {"limit": 0}, {"n_per_class": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            data.load("mnist", "test", batch_size=30, data_dir=data_dir, **bad)
    ds = data.load("mnist", "test", batch_size=30, data_dir=data_dir, n_per_class=10, seed=0)
    xs, ys = zip(*ds.as_numpy_iterator())
    x, y = np.concatenate(xs), np.concatenate(ys)
    assert [len(b) for b in ys] == [30, 30, 30, 10]
    assert data.class_histogram(y) == [10] * 10
    assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9


@pytest.mark.parametrize("shuffle", [False, True])
def test_mirrored_sharding_covers_each_example_once(shuffle):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    x, y = _ids(100)
    ds = data.make_dataset(x, y, 16, shuffle=shuffle, seed=0)
    dist = strategy.experimental_distribute_dataset(ds)
    seen, per_replica = [], [0, 0]
    for _ in range(2):  # two epochs: each one covers every example exactly once
        epoch = []
        for images, labels in dist:
            for r, (xi, yi) in enumerate(zip(strategy.experimental_local_results(images),
                                             strategy.experimental_local_results(labels))):
                yi = yi.numpy()
                np.testing.assert_array_equal(np.round(xi.numpy()[:, 0, 0, 0] * 100), yi)
                per_replica[r] += len(yi)
                assert len(yi) <= 8
                epoch.extend(yi.tolist())
        assert sorted(epoch) == list(range(100))
        seen.append(epoch)
    assert per_replica[0] > 0 and per_replica[1] > 0
    if shuffle:
        assert seen[0] != seen[1]
