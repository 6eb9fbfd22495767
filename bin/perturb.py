"""Search targeted universal perturbations against a trained model and write them out.

Searches V on a balanced subset of TRAINING images (the one ``bin/train.py --train_subset``
draws with the same seed), measures per-target success on held-out TEST images, and writes to
--output_dir (:func:`rat_tf.perturbation_files.write_search`): perturbations.npz,
perturbations.png and search.json (settings, success on search and test images, norms, wall
time).

Example:
  python bin/perturb.py --dataset=mnist --model_path=runs/std/model.keras \\
      --output_dir=runs/std/tup --eps=0.3 --train_subset=1000
"""

from absl import flags, logging

from rat_tf import attacks, cli, data, distribute, models, perturbation_files, trainers, training

Search = attacks.SearchSettings
FLAGS = flags.FLAGS
cli.define_dataset_flag(data.load_arrays, required=True)
cli.define_data_flags()
cli.define("string", "model_path", "Trained classifier (.keras).", default=None, required=True)
cli.define_output_flag("perturbations.npz, perturbations.png, search.json", required=True,
                       sets=perturbation_files.write_search, field="out_dir")
cli.define_search_flags(Search)
cli.define("integer", "batch_size", "Global batch of search images per step.", sets=Search)
cli.define("integer", "train_subset", "Search images: a balanced subset of the training split, "
           "total images, a multiple of the classes (0: all).",
           sets="data.balanced_subset (total)", default=training.DEFAULT_RAT_SUBSET,
           lower_bound=0)
cli.define("list", "targets", "Targets to search.", sets=attacks.targeted_universal,
           unset="all classes")
cli.define_n_test_flag("attacks.targeted_success_rate (its images)", default=0)
cli.define("integer", "seed", "Seed of the subset and of the search order.",
           sets=attacks.targeted_universal)
cli.define_strategy_flags(attacks.targeted_universal)
cli.define("bool", "progress", "Show a progress bar over passes.",
           sets=attacks.targeted_universal, default=True)


def main(argv):
    del argv
    cli.check_data(FLAGS.dataset, FLAGS.data_dir, FLAGS.data_source)
    cli.check_inputs(model_path=FLAGS.model_path)
    cli.check_output_dirs(output_dir=FLAGS.output_dir)
    info = data.get_info(FLAGS.dataset)
    targets = cli.int_list("targets", 0, info.num_classes)
    search = Search(**{"eps": info.eps, **cli.values(Search)})
    strategy = cli.strategy()
    x_train, y_train = data.load_arrays(FLAGS.dataset, "train", FLAGS.data_source, FLAGS.data_dir)
    x_test, y_test = data.load_arrays(FLAGS.dataset, "test", FLAGS.data_source, FLAGS.data_dir)
    x_test, y_test = x_test[:FLAGS.n_test or None], y_test[:FLAGS.n_test or None]
    x, y = cli.balanced_subset(x_train, y_train, FLAGS.train_subset, info.num_classes,
                               FLAGS.seed)
    with strategy.scope():
        model = trainers.load_classifier(FLAGS.model_path, info.image_shape, info.num_classes)
    model_fn = models.as_model_fn(model)  # the logits, also of a classifier ending in a softmax
    logging.info("searching %s on %d %s training images", search.method, len(x), FLAGS.dataset)
    V, stats = attacks.targeted_universal(
        model_fn, x, y, num_classes=info.num_classes, targets=targets, seed=FLAGS.seed,
        strategy=strategy, progress=FLAGS.progress, jit_compile=FLAGS.jit_compile,
        **search.kwargs())
    test_rate = attacks.targeted_success_rate(model_fn, x_test, y_test, V, targets=targets)
    success_test = [float(test_rate[t]) if stats["success_rate"][t] is not None else None
                    for t in range(info.num_classes)]
    settings = {k: FLAGS[k].value for k in (
        "dataset", "model_path", "search_inner_steps", "train_subset", "batch_size", "seed",
        "strategy", "num_cpu_devices", "jit_compile", "per_source")}
    if distribute.is_chief(strategy):
        report = perturbation_files.write_search(
            FLAGS.output_dir, V, stats, x, class_names=info.class_names, settings=settings,
            success_test=success_test, num_test_images=len(x_test))
        logging.info("mean held-out success %.4f (passes %d, %.1fs); wrote %s",
                     report["mean_success_test"], stats["passes"], stats["seconds"],
                     FLAGS.output_dir)


if __name__ == "__main__":
    cli.run(main)
