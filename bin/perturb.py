"""Search targeted universal perturbations against a trained model and write them out.

Searches V on a balanced subset of TRAINING images, measures per-target success on held-out
TEST images, and writes to --output_dir (:func:`rat_tf.perturbation_files.write_search`):
perturbations.npz, perturbations.png and search.json (settings, success on search and test
images, norms, wall time).

Example:
  python bin/perturb.py --dataset=mnist --model_path=runs/std/model.keras \
      --output_dir=runs/std/tup --eps=0.3 --n_per_class=100
"""

import keras
from absl import flags, logging

from rat_tf import attacks, cli, data, distribute, ops, perturbation_files

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", "mnist", "Dataset name (mnist, fashion_mnist, cifar10).")
cli.define_data_flags()
flags.DEFINE_alias("source", "data_source")
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
flags.DEFINE_bool("per_source", False, "One V per (source class, target): V [K,K,H,W,C], for "
                  "bin/train.py --per_source.")
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
    cli.check_data(FLAGS.dataset, FLAGS.data_dir, FLAGS.data_source)
    cli.check_inputs(model_path=FLAGS.model_path)
    cli.check_output_dirs(output_dir=FLAGS.output_dir)
    strategy = distribute.get_strategy(FLAGS.strategy, num_cpu_devices=FLAGS.num_cpu_devices)
    info = data.get_info(FLAGS.dataset)
    x_train, y_train = data.load_arrays(FLAGS.dataset, "train", FLAGS.data_source,
                                        FLAGS.data_dir, FLAGS.verify_checksums)
    x_test, y_test = data.load_arrays(FLAGS.dataset, "test", FLAGS.data_source, FLAGS.data_dir,
                                      FLAGS.verify_checksums)
    if FLAGS.test_limit:
        x_test, y_test = x_test[:FLAGS.test_limit], y_test[:FLAGS.test_limit]
    x, y = data.balanced_subset(x_train, y_train, FLAGS.n_per_class, FLAGS.seed,
                                info.num_classes)
    with strategy.scope():
        model = keras.models.load_model(FLAGS.model_path)
    model_fn = lambda images: model(images, training=False)  # noqa: E731
    targets = [int(t) for t in FLAGS.targets] if FLAGS.targets else None
    logging.info("searching %s on %d %s training images", FLAGS.method, len(x), FLAGS.dataset)
    V, stats = attacks.targeted_universal(
        model_fn, x, y, num_classes=info.num_classes, eps=FLAGS.eps, norm=FLAGS.norm,
        method=FLAGS.method, targets=targets, delta=FLAGS.delta, max_passes=FLAGS.max_passes,
        step_size=FLAGS.step_size, batch_size=FLAGS.batch_size, seed=FLAGS.seed,
        strategy=strategy, progress=FLAGS.progress, inner_steps=FLAGS.inner_steps,
        jit_compile=FLAGS.jit_compile, per_source=FLAGS.per_source)
    test_rate = attacks.targeted_success_rate(model_fn, x_test, y_test, V, targets=targets)
    success_test = [float(test_rate[t]) if stats["success_rate"][t] is not None else None
                    for t in range(info.num_classes)]
    settings = {k: FLAGS[k].value for k in (
        "dataset", "model_path", "inner_steps", "n_per_class", "batch_size", "seed", "strategy",
        "num_cpu_devices", "jit_compile", "per_source")}
    if distribute.is_chief(strategy):
        report = perturbation_files.write_search(FLAGS.output_dir, V, stats, x, class_names=info.class_names,
                                      settings=settings, success_test=success_test,
                                      num_test_images=len(x_test))
        logging.info("mean held-out success %.4f (passes %d, %.1fs); wrote %s",
                     report["mean_success_test"], stats["passes"], stats["seconds"],
                     FLAGS.output_dir)


if __name__ == "__main__":
    cli.run(main)
