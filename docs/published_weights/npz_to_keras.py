"""Load Keras-layout wong_mnist_net weights (pth_to_npz.py) into rat_tf's model, check its
logits against PyTorch's on the first 100 test images, and save it as a .keras file.

usage: npz_to_keras.py NPZ OUT.keras
"""
import sys

import numpy as np

from mnist_idx import first_test_images
from rat_tf import models


def main() -> None:
    path, out = sys.argv[1], sys.argv[2]
    w = np.load(path, allow_pickle=False)
    model = models.wong_mnist_net("mnist")
    for name in ("conv1", "conv2", "fc1", "logits_dense"):
        model.get_layer(name).set_weights([w[f"{name}/kernel"], w[f"{name}/bias"]])
    x, _ = first_test_images(100)
    diff = np.abs(np.asarray(model(x)) - w["torch_logits"]).max()
    assert diff < 1e-3, f"Keras and PyTorch logits differ by {diff}"
    model.save(out)
    print(f"max |Keras - PyTorch logit| on 100 images: {diff:.2e} -> {out}")


if __name__ == "__main__":
    main()
