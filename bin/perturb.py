"""Search targeted universal perturbations against a trained model and write them out.

Searches V on a balanced subset of TRAINING images, measures per-target success on held-out
TEST images, and writes to --output_dir: perturbations.npz, perturbations.png and
perturbation.json (settings, success on search and test images, norms, wall time).

Example:
  python bin/perturb.py --dataset=mnist --model_path=runs/std/model.keras \
      --output_dir=runs/std/tup --eps=0.3 --n_per_class=100
"""

import os
import time

import keras
from absl import app, flags, logging

from rat_tf import attacks, data, distribute, files, ops, plots

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "mnist", "Dataset name (mnist, fashion_mnist, cifar10).")
flags.DEFINE_string("data_dir", None, "Folder with the dataset files (default $RAT_DATA_DIR).")
flags.DEFINE_enum("source", "auto", ["auto", "files", "tfds"], "Where to read the data from.")
flags.DEFINE_string("model_path", None, "Trained classifier (.keras).", required=True)
flags.DEFINE_string("output_dir", None, "Where to write the outputs.", required=True)
flags.DEFINE_enum("method", "sgd", list(attacks.TU_METHODS), "Search method.")
flags.DEFINE_enum("norm", "linf", list(ops.NORMS), "Norm of the perturbation ball.")
flags.DEFINE_float("eps", 0.3, "Radius xi of the perturbation ball.")
flags.DEFINE_float("delta", 0.2, "A target stops once its success reaches 1 - delta.")
flags.DEFINE_integer("max_passes", 10, "Maximum passes over the search images.")
flags.DEFINE_float("step_size", None, "Step size (default eps/10 for sgd, eps/5 otherwise).")
flags.DEFINE_integer("inner_steps", 10, "Inner FGSM steps per image (batched, reference).")
flags.DEFINE_integer("n_per_class", 100, "Search images per class (balanced training subset).")
flags.DEFINE_list("targets", None, "Targets to search (default: all classes).")
flags.DEFINE_integer("batch_size", 128, "Global batch of search images per step.")
flags.DEFINE_integer("test_limit", 0, "Evaluate on the first N test images (0: all).",
                     lower_bound=0)
flags.DEFINE_integer("seed", 0, "Seed of the subset and of the search order.")
flags.DEFINE_enum("strategy", "default", list(distribute.STRATEGIES), "Distribution strategy.")
flags.DEFINE_integer("num_cpu_devices", 0, "Split the CPU into N devices (mirrored on CPU).")
flags.DEFINE_bool("jit_compile", False, "XLA-compile the per-replica search step.")
flags.DEFINE_bool("progress", True, "Show a progress bar over passes.")


def main(argv):
    del argv
    strategy = distribute.get_strategy(FLAGS.strategy, num_cpu_devices=FLAGS.num_cpu_devices)
    info = data.get_info(FLAGS.dataset)
    x_train, y_train = data.load_arrays(FLAGS.dataset, "train", FLAGS.source, FLAGS.data_dir)
    x_test, y_test = data.load_arrays(FLAGS.dataset, "test", FLAGS.source, FLAGS.data_dir)
    if FLAGS.test_limit:
        x_test, y_test = x_test[:FLAGS.test_limit], y_test[:FLAGS.test_limit]
    x, y = data.balanced_subset(x_train, y_train, FLAGS.n_per_class, FLAGS.seed,
                                info.num_classes)
    with strategy.scope():
        model = keras.models.load_model(FLAGS.model_path)
    model_fn = lambda images: model(images, training=False)  # noqa: E731
    targets = [int(t) for t in FLAGS.targets] if FLAGS.targets else None
    logging.info("searching %s on %d %s training images", FLAGS.method, len(x), FLAGS.dataset)
    start = time.perf_counter()
    V, stats = attacks.targeted_universal(
        model_fn, x, y, info.num_classes, FLAGS.eps, norm=FLAGS.norm, method=FLAGS.method,
        targets=targets, delta=FLAGS.delta, max_passes=FLAGS.max_passes,
        step_size=FLAGS.step_size, batch_size=FLAGS.batch_size, seed=FLAGS.seed,
        strategy=strategy, progress=FLAGS.progress, inner_steps=FLAGS.inner_steps,
        jit_compile=FLAGS.jit_compile)
    seconds = time.perf_counter() - start
    test_rate = attacks.targeted_success_rate(model_fn, x_test, y_test, V, targets=targets)
    searched = stats["targets"]
    settings = {k: FLAGS[k].value for k in (
        "dataset", "model_path", "method", "norm", "eps", "delta", "max_passes", "inner_steps",
        "n_per_class", "batch_size", "seed", "strategy", "num_cpu_devices", "jit_compile")}
    settings.update(step_size=stats["step_size"], targets=searched)
    report = {
        "settings": settings,
        "success_test": [None if t not in searched else float(test_rate[t])
                         for t in range(info.num_classes)],
        "success_search": stats["success_rate"],
        "mean_success_test": float(sum(test_rate[t] for t in searched) / len(searched)),
        "norm": stats["norm"],
        "passes": stats["passes"],
        "converged": stats["converged"],
        "num_search_images": int(len(x)),
        "num_test_images": int(len(x_test)),
        "num_replicas": stats["num_replicas"],
        "wall_seconds": seconds,
    }
    if distribute.is_chief(strategy):
        os.makedirs(FLAGS.output_dir, exist_ok=True)
        attacks.save_perturbations(  # fingerprints: evaluation refuses these search images
            os.path.join(FLAGS.output_dir, "perturbations.npz"), V, search_images=x,
            **settings, success_test=report["success_test"])
        titles = [f"{n}\n{'-' if r is None else f'{100 * r:.0f}%'}"
                  for n, r in zip(info.class_names, report["success_test"])]
        plots.perturbation_grid(V, os.path.join(FLAGS.output_dir, "perturbations.png"),
                                titles=titles)
        files.write_json(os.path.join(FLAGS.output_dir, "perturbation.json"), report)
    logging.info("mean held-out success %.4f (passes %d, %.1fs); wrote %s",
                 report["mean_success_test"], stats["passes"], seconds, FLAGS.output_dir)


if __name__ == "__main__":
    app.run(main)
