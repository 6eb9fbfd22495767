"""Benchmark of the training methods: cost per example and time to robustness.

    python bin/bench_training.py --out=results/bench_training.json

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

FLAGS = flags.FLAGS
cli.define_data_flags(data_source=False)
flags.DEFINE_string("out", "results/bench_training.json", "Output JSON.")
flags.DEFINE_string("work_dir", "", "Where runs are written (default: a temporary directory).")
flags.DEFINE_integer("batch_size", 128, "Batch size of every method.")
flags.DEFINE_integer("cost_steps", 30, "Steps per epoch of the cost runs, 2 epochs each "
                     "(0: skip the cost part).", lower_bound=0)
flags.DEFINE_integer("pgd_steps", 10, "PGD-AT steps.")
flags.DEFINE_float("adv_eps", None, "FGSM-AT/PGD-AT radius (default: --fgsm_eps).")
flags.DEFINE_list("robust_methods", ["rat", "rat_replace", "pgd_at"],
                  "Methods of the time-to-robustness part (rat, rat_replace, pgd_at, fgsm_at).")
flags.DEFINE_string("init_from", "", "Pretrained mnist_cnn (.keras); default: train one.")
flags.DEFINE_integer("pretrain_images", 12000, "Images of the 1-epoch pretraining.")
flags.DEFINE_float("fgsm_eps", 0.2, "FGSM radius of the robustness target.")
flags.DEFINE_float("target", 0.8, "FGSM accuracy to reach.", lower_bound=0.0, upper_bound=1.0)
flags.DEFINE_integer("eval_images", 1000, "Held-out test images for the FGSM accuracy.",
                     lower_bound=1, upper_bound=10000)
flags.DEFINE_float("time_cap", 300.0, "Max training seconds per method (time to robustness).",
                   lower_bound=1.0)
flags.DEFINE_integer("max_epochs", 100, "Max epochs per method (time to robustness).")
flags.DEFINE_integer("search_passes", 3, "RAT: passes of the V search.")
flags.DEFINE_integer("rat_refresh_every", 1,
                     "RAT: search V again every N epochs (0: static V, the paper's mode).")

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
           "refresh_every": FLAGS.rat_refresh_every}
    settings = {"rat": rat, "rat_replace": {**rat, "batch_mode": "replace"},
                "pgd_at": {"method": "pgd_at", "steps_per_epoch": 20},
                "fgsm_at": {"method": "fgsm_at", "steps_per_epoch": 20}}
    unknown = sorted(set(FLAGS.robust_methods) - set(settings))
    if unknown:
        raise app.UsageError(f"--robust_methods: unknown {unknown}; choose from {sorted(settings)}")
    cli.check_data("mnist", FLAGS.data_dir)
    cli.check_inputs(init_from=FLAGS.init_from)
    cli.check_output_files(out=FLAGS.out)
    cli.check_output_dirs(work_dir=FLAGS.work_dir)
    data.set_verify_checksums(FLAGS.verify_checksums)  # TrainConfig has no such field
    work = FLAGS.work_dir or tempfile.mkdtemp(prefix="bench_training_")
    base = dict(dataset="mnist", data_dir=FLAGS.data_dir, model="mnist_cnn", verbose=2,
                batch_size=FLAGS.batch_size, pgd_steps=FLAGS.pgd_steps,
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
            **{**base, "batch_size": 64}, epochs=1, train_subset=FLAGS.pretrain_images,
            model_dir=os.path.join(work, "pretrained")))
        init_from = os.path.join(work, "pretrained", "model.keras")
        results["pretrained_test_accuracy"] = pre["test_accuracy"]
    x_test, y_test = data.load_arrays("mnist", "test", data_dir=FLAGS.data_dir)
    x_eval, y_eval = x_test[-FLAGS.eval_images:], y_test[-FLAGS.eval_images:]
    for method in FLAGS.robust_methods:
        kw = settings[method]
        monitor = callbacks.RobustnessMonitor(x_eval, y_eval, FLAGS.fgsm_eps, target=FLAGS.target,
                                             time_limit=FLAGS.time_cap)
        cfg = training.TrainConfig(**{**base, **kw}, init_from=init_from,
                                   epochs=FLAGS.max_epochs, test_subset=FLAGS.eval_images,
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
          f"{FLAGS.eval_images} held-out test images (cap {FLAGS.time_cap:.0f}s):")
    for method, r in results["time_to_robustness"].items():
        when = f"{r['seconds']:.0f}s" if r["reached"] else "not reached"
        print(f"{method:<8} {when:>12}  after {r['epochs']} epochs, FGSM acc "
              f"{r['final_fgsm_accuracy']:.3f}, clean {r['clean_test_accuracy']:.4f}")
    logging.info("wrote %s", files.write_json(FLAGS.out, results))


if __name__ == "__main__":
    cli.run(main)
