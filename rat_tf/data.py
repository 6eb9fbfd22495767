"""Datasets: MNIST, Fashion-MNIST and CIFAR-10 read from their standard files (or tfds).

Every reader validates what it reads (magic numbers, record sizes, counts, shapes and,
optionally, the official checksums) and raises :class:`DataError` naming the file and the
problem: never silently wrong data. Images come out as float32 in [0, 1], NHWC; labels int32.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Callable, Iterable, Mapping

import numpy as np
import tensorflow as tf
from absl import logging

from rat_tf import ops, registry
from rat_tf.readers import (OFFICIAL_GZ_MD5, OFFICIAL_MD5, DataError, check_labels,  # noqa: F401
                            find_file, read_cifar10_bin, read_cifar10_py, read_idx,
                            safe_unpickle)  # re-exported: the readers were defined here

ENV_DATA_DIR = "RAT_DATA_DIR"
SPLITS = ("train", "test")
_verify_checksums = False  # what load_files does when not told (see set_verify_checksums)
Reader = Callable[[str, "str | None", bool], "tuple[np.ndarray, np.ndarray]"]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Every fact rat_tf uses about a dataset: one entry of :data:`DATASETS` per dataset.

    ``reader(split, data_dir, verify_checksums)`` returns a whole split as (uint8 NHWC
    images, integer labels) or raises :class:`DataError`. ``mean`` / ``std`` are per-channel
    pixel statistics in [0, 1] units (the zoo models normalise with them). Radii, in pixel
    units: ``eps`` of V (RAT), ``adv_eps`` of FGSM-AT / PGD-AT, and the evaluation's FGSM sweep
    ``fgsm_eps``, PGD radii ``pgd_eps`` and per-class FGSM radius ``class_eps``.
    ``radius_denominator`` (e.g. 255) writes radii as k/255 in tables; ``preset_family`` names
    the experiment presets (:data:`rat_tf.experiment.PRESETS`). ``subdirs`` and ``layouts``
    describe the standard files the built-in readers look for (empty for other readers).
    """

    name: str
    image_shape: tuple[int, int, int]
    num_classes: int
    class_names: tuple[str, ...]
    num_examples: Mapping[str, int]  # split -> count
    mean: tuple[float, ...]
    std: tuple[float, ...]
    eps: float
    adv_eps: float
    fgsm_eps: tuple[float, ...]
    pgd_eps: tuple[float, ...]
    class_eps: float
    preset_family: str
    reader: Reader
    radius_denominator: int | None = None
    subdirs: tuple[str, ...] = ()  # candidate folders below the data dir
    layouts: Mapping[str, tuple[tuple[str, tuple[str, ...]], ...]] = dataclasses.field(
        default_factory=dict)  # split -> ((layout, file names), ...) in order of preference
    tfds_name: str | None = None

    def __post_init__(self) -> None:
        c = self.image_shape[-1] if len(self.image_shape) == 3 else 0
        problems = [
            (len(self.image_shape) == 3 and all(int(d) > 0 for d in self.image_shape),
             f"image_shape must be (H, W, C), got {self.image_shape}"),
            (int(self.num_classes) >= 2, f"num_classes must be >= 2, got {self.num_classes}"),
            (len(self.class_names) == self.num_classes,
             f"{len(self.class_names)} class_names for {self.num_classes} classes"),
            (set(self.num_examples) == set(SPLITS),
             f"num_examples must give the count of each split {SPLITS}, got "
             f"{dict(self.num_examples)}"),
            (len(self.mean) == c and len(self.std) == c and all(v > 0 for v in self.std),
             f"mean and std must hold one value per channel ({c}), std > 0"),
            (all(e > 0 for e in (self.eps, self.adv_eps, self.class_eps, *self.fgsm_eps,
                                 *self.pgd_eps)) and self.fgsm_eps and self.pgd_eps,
             "eps, adv_eps, class_eps, fgsm_eps and pgd_eps must be positive radii"),
            (callable(self.reader), "reader must be callable (split, data_dir, verify)"),
        ]
        for ok, message in problems:
            if not ok:
                raise ValueError(f"dataset {self.name!r}: {message}")


def _read_standard_files(name: str) -> Reader:
    """The reader of a built-in dataset: its standard distribution files (:func:`load_files`)."""
    def read(split: str, data_dir: str | None, verify: bool) -> tuple[np.ndarray, np.ndarray]:
        return _read_files(name, split, data_dir, verify)

    return read


_DIGITS = tuple(str(i) for i in range(10))
_IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_LAYOUTS = {split: (("idx", names),) for split, names in _IDX_NAMES.items()}
_CIFAR_BIN = {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
              "test": ("test_batch.bin",)}
_CIFAR_PY = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_MNIST_SWEEP = dict(fgsm_eps=(0.05, 0.1, 0.2, 0.3), class_eps=0.1)
DATASETS: registry.Registry[DatasetInfo] = registry.Registry("dataset")
DATASETS.update({
    "mnist": DatasetInfo(
        "mnist", (28, 28, 1), 10, _DIGITS, {"train": 60000, "test": 10000},
        mean=(0.1307,), std=(0.3081,), eps=0.3, adv_eps=0.3, pgd_eps=(0.1, 0.3),
        preset_family="mnist", reader=_read_standard_files("mnist"),
        subdirs=("mnist", "MNIST", "MNIST/raw", ""), layouts=_IDX_LAYOUTS, tfds_name="mnist",
        **_MNIST_SWEEP),
    "fashion_mnist": DatasetInfo(
        "fashion_mnist", (28, 28, 1), 10,
        ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
         "ankle_boot"),
        {"train": 60000, "test": 10000}, mean=(0.2860,), std=(0.3530,), eps=0.1, adv_eps=0.1,
        pgd_eps=(0.1,), preset_family="mnist", reader=_read_standard_files("fashion_mnist"),
        subdirs=("fashion_mnist", "fashion-mnist", "FashionMNIST", "FashionMNIST/raw"),
        layouts=_IDX_LAYOUTS, tfds_name="fashion_mnist", **_MNIST_SWEEP),
    "cifar10": DatasetInfo(
        "cifar10", (32, 32, 3), 10,
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        {"train": 50000, "test": 10000}, mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616), eps=8 / 255, adv_eps=8 / 255,
        fgsm_eps=(2 / 255, 4 / 255, 8 / 255), pgd_eps=(8 / 255,), class_eps=8 / 255,
        preset_family="cifar10", reader=_read_standard_files("cifar10"),
        radius_denominator=255,
        subdirs=("cifar10", "cifar-10-batches-bin", "cifar-10-batches-py", "CIFAR10", ""),
        layouts={split: (("cifar_bin", _CIFAR_BIN[split]), ("cifar_py", _CIFAR_PY[split]))
                 for split in ("train", "test")},
        tfds_name="cifar10"),
})
DATASETS.freeze()


def register(info: DatasetInfo) -> DatasetInfo:
    """Add a dataset to :data:`DATASETS` (a new name; the entry is validated on creation)."""
    if not isinstance(info, DatasetInfo):
        raise TypeError(f"register takes a DatasetInfo, got {type(info).__name__}")
    return DATASETS.add(info.name, info)


def unregister(name: str) -> None:
    """Remove a dataset added by :func:`register` (the built-in ones stay)."""
    DATASETS.remove(name)


def get_info(name: str) -> DatasetInfo:
    """Return the :class:`DatasetInfo` of a dataset, or a clear error for an unknown name."""
    return DATASETS.get_entry(name)


def set_verify_checksums(verify: bool) -> None:
    """Whether the loaders check official md5s when not told (a binary's --verify_checksums)."""
    global _verify_checksums
    _verify_checksums = bool(verify)


def resolve_data_dir(data_dir: str | None = None) -> str | None:
    """The data directory: the argument if given, else $RAT_DATA_DIR, else None."""
    return data_dir or os.environ.get(ENV_DATA_DIR) or None


# --------------------------------------------------------------------------- loading
def _dataset_folder(info: DatasetInfo, data_dir: str, probe: str) -> str | None:
    for sub in info.subdirs:
        folder = os.path.join(data_dir, sub)
        if find_file(folder, probe):
            return folder
    return None


def files_available(name: str, data_dir: str | None = None) -> bool:
    """Whether the standard files of ``name`` are present below the data directory."""
    info = get_info(name)
    data_dir = resolve_data_dir(data_dir)
    if not data_dir:
        return False
    probes = [bases[0] for _, bases in info.layouts.get("test", ())]
    return any(_dataset_folder(info, data_dir, p) for p in probes)


def _check(images: np.ndarray, labels: np.ndarray, info: DatasetInfo, split: str, where: str):
    n = info.num_examples[split]
    if images.shape != (n, *info.image_shape):
        raise DataError(f"{where}: {split} images have shape {images.shape}, expected "
                        f"{(n, *info.image_shape)}")
    if labels.shape != (n,):
        raise DataError(f"{where}: {split} labels have shape {labels.shape}, expected ({n},)")
    check_labels(labels, info.num_classes, where, f"{split} label")


def _missing(name: str, split: str, data_dir: str | None) -> DataError:
    """The error for a split whose files are nowhere: what was looked for where, and the fix."""
    info = get_info(name)
    wanted = " or ".join(", ".join(f"{b}[.gz]" for b in bases)
                         for _, bases in info.layouts.get(split, ()))
    how = (f"point ${ENV_DATA_DIR} (or --data_dir) at the folder holding them (see docs/guide.md, "
           f"Data), or ask for tensorflow_datasets with --data_source=tfds")
    if not data_dir:
        subs = ", ".join(f"{s or '.'}/" for s in info.subdirs)
        return DataError(f"no data directory for {name} {split} (${ENV_DATA_DIR} is not set and "
                         f"no --data_dir was given): the files {wanted} are looked for in "
                         f"{subs} below it; {how}")
    folders = ", ".join(os.path.join(data_dir, s) for s in info.subdirs)
    return DataError(f"no {name} {split} files: looked for {wanted} in {folders}; {how}")


def locate_files(name: str, split: str, data_dir: str | None = None) -> tuple[str, list[str]]:
    """The files of a split below the data directory: (layout, paths), or a :class:`DataError`.

    The layout is ``idx``, ``cifar_bin`` or ``cifar_py``; the error lists what was looked for
    in which folders and how to point at them.
    """
    info = get_info(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    data_dir = resolve_data_dir(data_dir)
    if data_dir:
        for layout, bases in info.layouts.get(split, ()):
            folder = _dataset_folder(info, data_dir, bases[0])
            if folder is None:
                continue
            paths = [find_file(folder, base) for base in bases]
            for base, path in zip(bases, paths):
                if path is None:
                    raise DataError(f"{os.path.join(folder, base)}[.gz]: missing {name} file "
                                    f"(the other {split} files are in {folder})")
            return layout, paths
    raise _missing(name, split, data_dir)


def load_files(name: str, split: str, data_dir: str | None = None,
               verify_checksums: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a split through the dataset's reader (for the built-in datasets, their standard
    distribution files), checked: (uint8 NHWC images, int32 labels).

    ``verify_checksums`` None: the default of :func:`set_verify_checksums` (off).
    """
    info = get_info(name)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    if verify_checksums is None:
        verify_checksums = _verify_checksums
    images, labels = info.reader(split, resolve_data_dir(data_dir), bool(verify_checksums))
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8:
        raise DataError(f"{name} {split}: the reader returned {images.dtype} images, readers "
                        f"return uint8 pixels")
    _check(images, labels.astype(np.int32), info, split, f"{name} {split}")
    return images, labels.astype(np.int32)


def _read_files(name: str, split: str, data_dir: str | None, verify: bool
                ) -> tuple[np.ndarray, np.ndarray]:
    """Parse a built-in dataset's standard files (IDX or CIFAR-10 binary / python version)."""
    info = get_info(name)
    layout, paths = locate_files(name, split, data_dir)
    if layout == "idx":
        img_path, lbl_path = paths
        images = read_idx(img_path, name, verify)
        labels = read_idx(lbl_path, name, verify).astype(np.int32)
        if images.ndim != 3:
            raise DataError(f"{img_path}: not an image file (shape {images.shape})")
        if labels.ndim != 1:
            raise DataError(f"{lbl_path}: not a label file (shape {labels.shape})")
        check_labels(labels, info.num_classes, lbl_path)
        if images.shape[0] != labels.shape[0]:
            raise DataError(f"{img_path} has {images.shape[0]} images but {lbl_path} has "
                            f"{labels.shape[0]} labels")
        images, where = images[..., None], f"{img_path} / {lbl_path}"
    else:
        parts = [read_cifar10_bin(p, verify) if layout == "cifar_bin"
                 else read_cifar10_py(p, verify) for p in paths]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        where = os.path.dirname(paths[0])
    _check(images, labels, info, split, where)
    return images, labels


def load_tfds(name: str, split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load a split through ``tensorflow_datasets`` (needs a download or a prepared tfds dir)."""
    info = get_info(name)
    if not info.tfds_name:
        raise DataError(f"{name} is not in tensorflow_datasets: read it with "
                        f"--data_source=files")
    try:
        import tensorflow_datasets as tfds  # heavy import, only when used

        ds = tfds.load(info.tfds_name, split=split, as_supervised=True, batch_size=-1,
                       data_dir=data_dir)
    except ImportError as e:  # tfds itself, or one of the modules it imports lazily
        raise DataError(f"data_source 'tfds' needs tensorflow_datasets and its dependencies "
                        f"({type(e).__name__}: {e}); or read the standard files: "
                        f"{_missing(name, split, resolve_data_dir()).args[0]}") from e
    images, labels = tfds.as_numpy(ds)
    images, labels = np.asarray(images, np.uint8), np.asarray(labels, np.int32)
    _check(images, labels, info, split, f"tfds:{info.tfds_name}")
    return images, labels


def load_arrays(name: str, split: str, source: str = "auto", data_dir: str | None = None,
                verify_checksums: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Load a whole split as numpy: (float32 images in [0, 1], NHWC; int32 labels).

    ``source``: ``files`` or ``auto`` (the standard files below ``data_dir`` /
    $RAT_DATA_DIR; missing files are an error that says where they were looked for), or
    ``tfds`` (``tensorflow_datasets``, which may download: only when asked for).
    """
    get_info(name)
    if source not in ("auto", "files", "tfds"):
        raise ValueError(f"unknown data source {source!r}; choose auto, files or tfds")
    if source == "tfds":
        if verify_checksums or (verify_checksums is None and _verify_checksums):
            logging.warning("%s: tensorflow_datasets checks its own downloads; "
                            "--verify_checksums applies to the standard files only", name)
        images, labels = load_tfds(name, split, None)
    else:
        images, labels = load_files(name, split, data_dir, verify_checksums)
    return images.astype(np.float32) / 255.0, labels.astype(np.int32)


# --------------------------------------------------------------------------- subsets & pipelines
def fingerprints(x: np.ndarray) -> np.ndarray:
    """One 16-hex-digit fingerprint per image (sha1 of the image quantized to 8 bits)."""
    x = np.asarray(x)
    if x.ndim < 2:
        raise ValueError(f"expected a batch of images, got shape {x.shape}")
    q = np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8) if x.dtype != np.uint8 else x
    return np.array([hashlib.sha1(row.tobytes()).hexdigest()[:16] for row in q], dtype="<U16")


def check_pixels(images: np.ndarray, what: str = "images") -> None:
    """Raise ValueError unless every value of ``images`` is finite and in [0, 1]."""
    ops.check_pixel_range(np.asarray(images), ops.PIXEL_RANGE, what)


def balanced_subset(images: np.ndarray, labels: np.ndarray, n_per_class: int,
                    seed: int = 0, num_classes: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic class-balanced subset: ``n_per_class`` images of every class, shuffled."""
    if n_per_class <= 0:
        raise ValueError(f"n_per_class must be positive, got {n_per_class}")
    num_classes = num_classes or int(labels.max()) + 1
    rng = np.random.default_rng(seed)
    picks = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < n_per_class:
            raise ValueError(f"class {c} has only {len(idx)} examples, {n_per_class} requested")
        picks.append(rng.choice(idx, n_per_class, replace=False))
    order = np.concatenate(picks)
    rng.shuffle(order)
    return images[order], labels[order]


def subset_indices(labels: np.ndarray, n_per_class: int, seed: int = 0) -> np.ndarray:
    """Indices of the same balanced subset :func:`balanced_subset` returns."""
    idx, _ = balanced_subset(np.arange(len(labels)), labels, n_per_class, seed)
    return idx


def make_dataset(images: np.ndarray, labels: np.ndarray, batch_size: int, *,
                 shuffle: bool = False, seed: int = 0, repeat: bool = False,
                 drop_remainder: bool = False) -> tf.data.Dataset:
    """A ``tf.data`` pipeline of (float32 image, int32 label) batches of ``batch_size``.

    Under a distribution strategy pass the GLOBAL batch size and hand the result to
    ``strategy.experimental_distribute_dataset`` (or ``model.fit``): the dataset is sharded
    by data across workers (auto-shard policy DATA), so no example is seen twice per epoch.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int32)
    if images.ndim != 4 or labels.shape != (images.shape[0],):
        raise ValueError(f"expected images [N,H,W,C] and labels [N], got {images.shape} and "
                         f"{labels.shape}")
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    if shuffle:
        ds = ds.shuffle(min(len(images), 60000), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    opts = tf.data.Options()
    opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    opts.deterministic = True
    return ds.with_options(opts).prefetch(tf.data.AUTOTUNE)


AUGMENTATIONS = ("none", "crop_flip")
CROP_PAD = 4  # pixels of reflect padding of the random crop of "crop_flip"


def augment(images: tf.Tensor, labels: tf.Tensor, seed: tf.Tensor, name: str = "crop_flip",
            pad: int = CROP_PAD) -> tuple[tf.Tensor, tf.Tensor]:
    """A batch augmented by ``name`` (:data:`AUGMENTATIONS`), a pure function of ``seed``.

    ``crop_flip``: each image is padded by ``pad`` pixels on every side by reflection (no new
    pixel values, so images stay in [0, 1]), cropped back to its size at a random offset and
    flipped left-right with probability 1/2. ``seed`` is a stateless seed (two integers);
    labels are returned unchanged, in the order of their images.
    """
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augment {name!r}; choose one of {AUGMENTATIONS}")
    if int(pad) < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    if name == "none":
        return images, labels
    images = tf.convert_to_tensor(images)
    n = tf.shape(images)[0]
    h, w = images.shape[1], images.shape[2]
    crop_seed, flip_seed = tf.unstack(
        tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2))
    if pad:
        padded = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
        offsets = tf.random.stateless_uniform([n, 2], crop_seed, 0, 2 * pad + 1, tf.int32)
        rows = offsets[:, :1] + tf.range(h)[None]  # [n, h]
        cols = offsets[:, 1:] + tf.range(w)[None]  # [n, w]
        images = tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), cols, axis=2,
                           batch_dims=1)
    flip = tf.random.stateless_uniform([n], flip_seed) < 0.5
    images = tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)
    return images, labels


def load(name: str, split: str, batch_size: int, *, source: str = "auto",
         data_dir: str | None = None, n_per_class: int | None = None, limit: int | None = None,
         shuffle: bool | None = None, seed: int = 0, verify_checksums: bool | None = None,
         drop_remainder: bool = False) -> tf.data.Dataset:
    """The one entry point: a batched ``tf.data`` pipeline of a dataset split.

    ``n_per_class`` takes a deterministic balanced subset; ``limit`` keeps the first examples.
    Shuffling defaults to on for train, off for test.
    """
    for what, value in (("n_per_class", n_per_class), ("limit", limit)):
        if value is not None and (isinstance(value, bool) or int(value) < 1):
            raise ValueError(f"{what} must be a positive number of examples (or None), got "
                             f"{value!r}")
    images, labels = load_arrays(name, split, source, data_dir, verify_checksums)
    if n_per_class is not None:
        images, labels = balanced_subset(images, labels, n_per_class, seed)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    if shuffle is None:
        shuffle = split == "train"
    return make_dataset(images, labels, batch_size, shuffle=shuffle, seed=seed,
                        drop_remainder=drop_remainder)


def class_histogram(labels: Iterable[int], num_classes: int = 10) -> list[int]:
    """Count of each class in ``labels``."""
    return np.bincount(np.asarray(list(labels) if not isinstance(labels, np.ndarray) else labels,
                                  np.int64), minlength=num_classes).tolist()
