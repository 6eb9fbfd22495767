"""Read the first N MNIST test images from $RAT_DATA_DIR/mnist with numpy alone (no rat_tf)."""
import gzip
import os

import numpy as np


def first_test_images(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 28, 28, 1) float32 images in [0, 1] and (n,) int64 labels, from the idx files."""
    folder = os.path.join(os.environ.get("RAT_DATA_DIR", "../shared/data"), "mnist")
    with gzip.open(os.path.join(folder, "t10k-images-idx3-ubyte.gz")) as f:
        raw = np.frombuffer(f.read(), np.uint8)
    with gzip.open(os.path.join(folder, "t10k-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8)
    assert raw[:4].tobytes() == b"\x00\x00\x08\x03" and labels[:4].tobytes() == b"\x00\x00\x08\x01"
    x = raw[16:].reshape(-1, 28, 28, 1)[:n].astype(np.float32) / 255.0
    return x, labels[8:][:n].astype(np.int64)
