"""Benchmark of the training methods: cost per example and time to robustness.

    python bin/bench_training.py --output_dir=results   # writes results/bench_training.json

1. Cost per input image of rat (replace / one / all / worst targets), fgsm_at and pgd_at
   relative to standard training: same model (mnist_cnn), batch size and data; images/s of the
   steady epoch. Also per example trained on (rat "one" and "worst" train on each image and one
   perturbed copy, "worst" after 9 inference passes to pick it; "all" on the image and its 9
   copies; "replace" on one of the two).
2. Time to robustness: from the same pretrained mnist_cnn, wall time until FGSM (L-inf
   ``--fgsm_eps``) accuracy on held-out test images reaches ``--target`` for rat and pgd_at
   (evaluated after every epoch, evaluation time excluded; RAT's V search included), capped
   at ``--time_cap`` seconds of training per method.
"""

import os
import tempfile

import numpy as np
from absl import app, flags, logging

from rat_tf import callbacks, cli, data, files, perturbation_files, training

Config = training.TrainConfig
FLAGS = flags.FLAGS
cli.define_data_flags(data_source=False)
cli.define_output_flag("bench_training.json", default="results")
cli.define("string", "work_dir", "Where runs are written.", default=None,
           unset="a temporary folder")
cli.define("integer", "batch_size", "Batch size of every method.", sets=Config)
cli.define("integer", "cost_steps", "Steps per epoch of the cost runs, 2 epochs each (0: skip "
           "the cost part).", default=30, lower_bound=0)
cli.define_adv_flags(Config, only=["adv_steps"])
cli.define("float", "adv_eps", "FGSM-AT / PGD-AT radius.", sets=Config, default=None,
           unset="--fgsm_eps")
cli.define("list", "robust_methods", "Methods of the time-to-robustness part (rat, "
           "rat_replace, pgd_at, fgsm_at).", default=["rat", "rat_replace", "pgd_at"])
cli.define("string", "init_from", "Pretrained mnist_cnn (.keras).", sets=Config,
           default=None, unset="train one")
cli.define("integer", "pretrain_subset", "Balanced training images of the 1-epoch "
           "pretraining.", default=12000, lower_bound=10)
cli.define("float", "fgsm_eps", "FGSM radius of the robustness target.", default=0.2)
cli.define("float", "target", "FGSM accuracy to reach.", default=0.8, lower_bound=0.0,
           upper_bound=1.0)
cli.define("integer", "n_test", "Held-out test images (the last N of the test split) for the "
           "FGSM accuracy, and the first N for the final accuracy (0: all).", default=1000,
           lower_bound=0)
cli.define("float", "time_cap", "Max training seconds per method (time to robustness).",
           default=300.0, lower_bound=1.0)
cli.define("integer", "max_epochs", "Max epochs per method (time to robustness).", default=100)
cli.define_search_flags(Config, only=["search_passes"], defaults={"search_passes": 3})
cli.define_rat_flags(Config, only=["refresh_every"], defaults={"refresh_every": 1})

# name -> (TrainConfig fields, examples the model trains on per input image)
_COST_METHODS = {
    "standard": ({}, 1),
    "rat_replace": ({"method": "rat", "batch_mode": "replace"}, 1),
    "rat_one": ({"method": "rat", "targets_per_image": "one"}, 2),
    "rat_all": ({"method": "rat", "targets_per_image": "all"}, 10),
    "rat_worst": ({"method": "rat", "targets_per_image": "worst"}, 2),
    "fgsm_at": ({"method": "fgsm_at"}, 1),
    "pgd_at": ({"method": "pgd_at"}, 1)}


def main(argv):
    del argv
    rat = {"method": "rat", "batch_size": 50, "search_passes": FLAGS.search_passes,
           "refresh_every": FLAGS.refresh_every}
    settings = {"rat": rat, "rat_replace": {**rat, "batch_mode": "replace"},
                "pgd_at": {"method": "pgd_at", "steps_per_epoch": 20},
                "fgsm_at": {"method": "fgsm_at", "steps_per_epoch": 20}}
    unknown = sorted(set(FLAGS.robust_methods) - set(settings))
    if unknown:
        raise app.UsageError(f"--robust_methods: unknown {unknown}; choose from {sorted(settings)}")
    cli.check_data("mnist", FLAGS.data_dir)
    cli.check_inputs(init_from=FLAGS.init_from)
    cli.check_output_dirs(output_dir=FLAGS.output_dir, work_dir=FLAGS.work_dir)
    work = FLAGS.work_dir or tempfile.mkdtemp(prefix="bench_training_")
    base = dict(dataset="mnist", data_dir=FLAGS.data_dir, model="mnist_cnn", verbose=2,
                batch_size=FLAGS.batch_size, pgd_steps=FLAGS.adv_steps,
                adv_eps=FLAGS.adv_eps if FLAGS.adv_eps is not None else FLAGS.fgsm_eps)
    results = {"cost": {}, "time_to_robustness": {}}

    # 1. cost per example seen (V's values do not change the cost: zeros)
    zeros = perturbation_files.save(os.path.join(work, "zeros.npz"),
                                       np.zeros((10, 28, 28, 1), np.float32), eps=0.3)
    for name, (kw, examples) in (_COST_METHODS.items() if FLAGS.cost_steps else ()):
        cfg = training.TrainConfig(**base, epochs=2, steps_per_epoch=FLAGS.cost_steps,
                                   train_subset=6000, model_dir=os.path.join(work, "cost_" + name),
                                   **kw)
        if cfg.method == "rat":
            cfg.perturbations_path = zeros
        m = training.train(cfg)
        results["cost"][name] = {"images_per_sec": m["images_per_sec_steady"],
                                 "trained_examples_per_image": examples}
    ref = results["cost"].get("standard", {}).get("images_per_sec")
    for r in results["cost"].values():
        r["cost_vs_standard"] = ref / r["images_per_sec"]
        r["cost_per_trained_example_vs_standard"] = (r["cost_vs_standard"]
                                                     / r["trained_examples_per_image"])

    # 2. time to robustness from one pretrained model
    init_from = FLAGS.init_from
    if not init_from:
        pre = training.train(training.TrainConfig(
            **{**base, "batch_size": 64}, epochs=1, train_subset=FLAGS.pretrain_subset,
            model_dir=os.path.join(work, "pretrained")))
        init_from = os.path.join(work, "pretrained", "model.keras")
        results["pretrained_test_accuracy"] = pre["test_accuracy"]
    x_test, y_test = data.load_arrays("mnist", "test", data_dir=FLAGS.data_dir)
    x_eval, y_eval = x_test[-FLAGS.n_test:], y_test[-FLAGS.n_test:]  # -0: all
    for method in FLAGS.robust_methods:
        kw = settings[method]
        monitor = callbacks.RobustnessMonitor(x_eval, y_eval, FLAGS.fgsm_eps, target=FLAGS.target,
                                             time_limit=FLAGS.time_cap)
        cfg = training.TrainConfig(**{**base, **kw}, init_from=init_from,
                                   epochs=FLAGS.max_epochs, test_subset=FLAGS.n_test,
                                   model_dir=os.path.join(work, "robust_" + method))
        m = training.train(cfg, callbacks=[monitor])
        reached = monitor.time_to_target is not None
        results["time_to_robustness"][method] = {"settings": m["settings"],
            "reached": reached,
            "seconds": (monitor.time_to_target + m["search_seconds"]) if reached else None,
            "search_seconds": m["search_seconds"], "epochs": len(monitor.records),
            "final_fgsm_accuracy": monitor.records[-1]["fgsm_accuracy"],
            "clean_test_accuracy": m["test_accuracy"], "records": monitor.records}

    rows = [("method", "images/s", "cost per image", "examples/image", "cost per example")]
    for name, r in results["cost"].items():
        rows.append((name, f"{r['images_per_sec']:.0f}", f"{r['cost_vs_standard']:.2f}x",
                     str(r["trained_examples_per_image"]),
                     f"{r['cost_per_trained_example_vs_standard']:.2f}x"))
    print("cost relative to standard training (same model, batch size and data):")
    print("\n".join(f"{a:<12} {b:>9} {c:>15} {d:>15} {e:>17}" for a, b, c, d, e in rows))
    print(f"\ntime to FGSM(eps {FLAGS.fgsm_eps}) accuracy >= {FLAGS.target:.0%} on "
          f"{len(x_eval)} held-out test images (cap {FLAGS.time_cap:.0f}s):")
    for method, r in results["time_to_robustness"].items():
        when = f"{r['seconds']:.0f}s" if r["reached"] else "not reached"
        print(f"{method:<8} {when:>12}  after {r['epochs']} epochs, FGSM acc "
              f"{r['final_fgsm_accuracy']:.3f}, clean {r['clean_test_accuracy']:.4f}")
    path = os.path.join(FLAGS.output_dir, "bench_training.json")
    logging.info("wrote %s", files.write_json(path, results))


if __name__ == "__main__":
    cli.run(main)
