"""AutoAttack (standard) of the official implementation (fra31/auto-attack, PyTorch) on a
wong_mnist_net given as Keras-layout weights: a published model converted by pth_to_npz.py, or
one trained by rat_tf and dumped by ../apgd_official/dump.py.

usage (a Python with torch): AUTOATTACK_DIR=path/to/auto-attack official_aa.py NPZ EPS N
prints the robust accuracy after each attack; saves the per-image robust flags to
NPZ.official_aa_e{EPS}_n{N}.npy
"""
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mnist_idx import first_test_images

sys.path.insert(0, os.environ.get("AUTOATTACK_DIR", "."))
from autoattack import AutoAttack  # noqa: E402


class KerasLayoutWongNet(nn.Module):
    """wong_mnist_net on NCHW input, from Keras-layout weights (flattened NHWC, as Keras)."""

    def __init__(self, w):
        super().__init__()
        t = lambda a: torch.tensor(np.asarray(a))  # noqa: E731
        self.conv1 = nn.Conv2d(1, 16, 4, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 4, stride=2, padding=1)
        self.fc1, self.fc2 = nn.Linear(32 * 7 * 7, 100), nn.Linear(100, 10)
        with torch.no_grad():
            for conv, name in ((self.conv1, "conv1"), (self.conv2, "conv2")):
                conv.weight.copy_(t(w[f"{name}/kernel"]).permute(3, 2, 0, 1))
                conv.bias.copy_(t(w[f"{name}/bias"]))
            for lin, name in ((self.fc1, "fc1"), (self.fc2, "logits_dense")):
                lin.weight.copy_(t(w[f"{name}/kernel"]).T)
                lin.bias.copy_(t(w[f"{name}/bias"]))

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc2(F.relu(self.fc1(x.permute(0, 2, 3, 1).flatten(1))))


def main() -> None:
    path, eps, n = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(int(os.environ.get("TORCH_THREADS", "2")))
    w = np.load(path, allow_pickle=False)
    model = KerasLayoutWongNet(w).eval()
    x_np, y_np = first_test_images(n)
    x, y = torch.tensor(x_np).permute(0, 3, 1, 2).contiguous(), torch.tensor(y_np)
    for key in ("torch_logits", "logits"):  # the logits the weights came with, if any
        if key in w:
            with torch.no_grad():
                mine = model(x[:len(w[key])]).numpy()
            print(f"max |logit - {key}|: {np.abs(mine - w[key][:n]).max():.2e}")
    t0 = time.time()
    log = f"{path}.official_aa_e{eps:g}_n{n}.log"
    attack = AutoAttack(model, norm="Linf", eps=eps, version="standard", device="cpu",
                        log_path=log, seed=0)
    adv = attack.run_standard_evaluation(x, y, bs=500)
    assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        robust = (model(adv).argmax(1) == y).numpy()
    np.save(f"{path}.official_aa_e{eps:g}_n{n}.npy", robust)
    print(f"official AutoAttack (standard) eps {eps:g} on the first {n} test images: robust "
          f"{100 * robust.mean():.1f}% ({robust.sum()}/{n}) in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
