"""Official APGD-CE (fra31/auto-attack, PyTorch) on the tiny_cnn weights dumped by dump.py.

usage: official.py NPZ EPS RESTARTS SEED [SEED ...] -> prints robust accuracy, saves per-image
robust flags to NPZ.official_r{R}_s{S}.npy
"""
import os
import sys
import time
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.environ.get("AUTOATTACK_DIR", "."))  # a checkout of fra31/auto-attack
from autoattack.autopgd_base import APGDAttack  # noqa: E402

torch.set_num_threads(1)
MEAN, STD = 0.1307, 0.3081


class Net(nn.Module):
    """rat_tf's tiny_cnn (stride-2 convs) or mnist_cnn (conv-conv-pool-conv-pool) in PyTorch."""

    def __init__(self, w):
        super().__init__()
        t = lambda a: torch.tensor(np.asarray(a))  # noqa: E731
        self.pooled = "conv3/kernel" in w
        names = ["conv1", "conv2"] + (["conv3"] if self.pooled else [])
        self.convs = nn.ModuleList()
        for name in names:
            k = t(w[f"{name}/kernel"]).permute(3, 2, 0, 1)
            conv = nn.Conv2d(k.shape[1], k.shape[0], 3, stride=1 if self.pooled else 2)
            with torch.no_grad():
                conv.weight.copy_(k)
                conv.bias.copy_(t(w[f"{name}/bias"]))
            self.convs.append(conv)
        self.dense = nn.ModuleList()
        for name in ("fc1", "logits_dense"):
            k = t(w[f"{name}/kernel"])
            lin = nn.Linear(k.shape[0], k.shape[1])
            with torch.no_grad():
                lin.weight.copy_(k.T)
                lin.bias.copy_(t(w[f"{name}/bias"]))
            self.dense.append(lin)

    def forward(self, x):  # x: NCHW in [0, 1]
        x = (x - MEAN) / STD
        if self.pooled:
            x = F.relu(self.convs[1](F.relu(self.convs[0](x))))
            x = F.max_pool2d(x, 2)
            x = F.max_pool2d(F.relu(self.convs[2](x)), 2)
        else:
            x = F.relu(self.convs[1](F.relu(self.convs[0](x))))
        x = x.permute(0, 2, 3, 1).flatten(1)  # Keras flattens NHWC
        return self.dense[1](F.relu(self.dense[0](x)))


def main():
    path, eps, restarts = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
    seeds = [int(s) for s in sys.argv[4:]]
    w = np.load(path)
    model = Net(w).eval()
    x = torch.tensor(w["x"]).permute(0, 3, 1, 2).contiguous()
    y = torch.tensor(w["y"]).long()
    with torch.no_grad():
        logits = model(x).numpy()
    print("max |logit diff| vs Keras:", np.abs(logits - w["logits"]).max(),
          "clean acc:", (logits.argmax(1) == w["y"]).mean())
    for seed in seeds:
        t0 = time.time()
        attack = APGDAttack(model, n_iter=100, norm="Linf", n_restarts=restarts, eps=eps,
                            seed=seed, loss="ce", eot_iter=1, rho=.75, device="cpu")
        adv = attack.perturb(x, y)
        assert (adv - x).abs().max() <= eps + 1e-6
        with torch.no_grad():
            robust = (model(adv).argmax(1) == y).numpy()
        np.save(f"{path}.official_e{eps:g}_r{restarts}_s{seed}.npy", robust)
        print(f"official APGD-CE eps={eps} restarts={restarts} seed={seed}: "
              f"robust {robust.mean():.4f} ({robust.sum()}/{len(robust)}) {time.time()-t0:.0f}s",
              flush=True)


if __name__ == "__main__":
    main()
