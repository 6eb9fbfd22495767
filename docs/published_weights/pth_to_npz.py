"""Convert Wong et al.'s published MNIST weights (fast_adversarial MNIST/models/*.pth) to the
Keras layout of rat_tf's wong_mnist_net, with the PyTorch logits of the first 100 test images.

usage (a Python with torch): pth_to_npz.py PTH OUT.npz
"""
import sys

import numpy as np
import torch
import torch.nn as nn

from mnist_idx import first_test_images


def wong_net() -> nn.Sequential:
    """fast_adversarial's MNIST/mnist_net.py, as published."""
    return nn.Sequential(nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * 7 * 7, 100), nn.ReLU(), nn.Linear(100, 10))


def main() -> None:
    pth, out = sys.argv[1], sys.argv[2]
    state = torch.load(pth, map_location="cpu", weights_only=True)  # no arbitrary unpickling
    net = wong_net()
    net.load_state_dict(state)
    net.eval()
    x, y = first_test_images(100)
    with torch.no_grad():
        logits = net(torch.tensor(x).permute(0, 3, 1, 2)).numpy()
    w = {k: v.numpy() for k, v in state.items()}
    fc1 = w["5.weight"].reshape(100, 32, 7, 7).transpose(0, 2, 3, 1).reshape(100, -1)  # NCHW->NHWC
    keras_w = {"conv1/kernel": w["0.weight"].transpose(2, 3, 1, 0), "conv1/bias": w["0.bias"],
               "conv2/kernel": w["2.weight"].transpose(2, 3, 1, 0), "conv2/bias": w["2.bias"],
               "fc1/kernel": fc1.T, "fc1/bias": w["5.bias"],
               "logits_dense/kernel": w["7.weight"].T, "logits_dense/bias": w["7.bias"]}
    np.savez(out, torch_logits=logits, **keras_w)
    print(f"{pth}: clean accuracy on the first 100 test images {(logits.argmax(1) == y).mean():.2f}"
          f" -> {out}")


if __name__ == "__main__":
    main()
