"""rat_tf APGD-CE (autoattack(attacks=['apgd-ce'])) on the images dumped by dump.py."""
import sys
import time
import numpy as np
import keras
from rat_tf import autoattack, models

model_path, npz, eps, restarts = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
tag = sys.argv[5]
seeds = [int(s) for s in sys.argv[6:]]
w = np.load(npz)
fn = models.as_model_fn(keras.models.load_model(model_path))
for seed in seeds:
    t0 = time.time()
    out = autoattack.autoattack(fn, w["x"], w["y"], eps, attacks=["apgd-ce"], seed=seed,
                                restarts=restarts, batch_size=500)
    robust = out["robust"]
    np.save(f"{npz}.{tag}_e{eps:g}_r{restarts}_s{seed}.npy", robust)
    line = f"rat_tf[{tag}] APGD-CE eps={eps:g} restarts={restarts} seed={seed}: robust {robust.mean():.4f} ({robust.sum()}/{len(robust)})"
    for off in ("official",):
        try:
            o = np.load(f"{npz}.official_e{eps:g}_r{restarts}_s{seed}.npy")
            line += f" | official {o.mean():.4f}; only official breaks {np.sum(robust & ~o)}, only rat_tf breaks {np.sum(~robust & o)}"
        except FileNotFoundError:
            pass
    print(line, f"{time.time()-t0:.0f}s", flush=True)
