"""Benchmark of training: accuracy and speed of train(), and its overhead vs model.fit.

    python bin/bench_train.py --output_dir=results   # writes results/bench_train.json

1. Full real MNIST, mnist_cnn, ``--mnist_epochs`` epochs through ``training.train``: test
   accuracy (goal >= 99.0%) and images/s.
2. Overhead: ``training.train`` against a plain ``model.fit`` of the same model, data, batch
   size and epochs (``--overhead_epochs``), as a ratio of fit time and of total wall time
   (train() also loads data, evaluates and saves; goal <= 1.1). One run each.
3. Speed on this machine: images/s of ``--speed_model`` (resnet20) training on real
   CIFAR-10 under float32, mixed_bfloat16 and float32 + XLA (``jit_compile``) at
   ``--batch_size``, and float32 at each of ``--speed_batch_sizes``; each the steady rate of
   a second epoch of ``--speed_steps`` steps, quoted as a ratio to float32 (one run).
4. The CIFAR-10 start-model recipe (the ``small`` preset's pretraining of
   ``rat_tf.experiment``, the model of that preset) for ``--recipe_epochs`` on a balanced
   ``--recipe_subset``, test accuracy on the first ``--n_test`` test images after every epoch:
   ``accuracy_vs_time.png``. ``--recipe_history`` adds the curve of an earlier run's
   ``history.csv`` (a ``bin/train.py --test_every=1`` run, e.g. the 60-minute one).
"""

import os
import tempfile
import time

import keras
from absl import flags, logging

from rat_tf import cli, data, experiment, files, models, plots, training

FLAGS = flags.FLAGS
cli.define_data_flags(data_source=False)
cli.define_output_flag("bench_train.json", default="results")
cli.define("string", "work_dir", "Where runs are written.", default=None,
           unset="a temporary folder")
cli.define("integer", "mnist_epochs", "Epochs of mnist_cnn on full MNIST (0: skip).",
           default=3)
cli.define("integer", "overhead_epochs", "Epochs of the train() vs model.fit comparison.",
           default=1)
cli.define("integer", "batch_size", "Batch size.", sets=training.TrainConfig)
cli.define("string", "speed_model", "Model zoo name of the speed part.", default="resnet20")
cli.define("integer", "speed_steps", "Steps per epoch of each speed run, 2 epochs each (0: "
           "skip the speed part).", default=10)
cli.define("list", "speed_batch_sizes", "Batch sizes of the float32 speed runs.",
           default=["128", "512"])
cli.define("integer", "recipe_epochs", "Epochs of the CIFAR-10 recipe run (0: skip).",
           default=2)
cli.define("integer", "recipe_subset", "Balanced CIFAR-10 training images of the recipe run "
           "(0: all).", default=10000)
cli.define_n_test_flag(training.TrainConfig, default=2000)
cli.define("string", "recipe_history", "history.csv of an earlier recipe run to plot too.",
           default=None, unset="none")

SPEED_RUNS = (("float32", "float32", False), ("mixed_bfloat16", "mixed_bfloat16", False),
              ("float32 + XLA", "float32", True))  # (name, precision, jit_compile)


def _plain_fit(x, y, epochs: int, batch_size: int) -> float:
    """Wall seconds of a plain compile + fit of mnist_cnn (the baseline of the overhead)."""
    keras.utils.set_random_seed(0)
    model = models.build_model("mnist_cnn", "mnist")
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    start = time.time()
    model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=2)
    return time.time() - start


def _speed(work: str, cifar: tuple) -> dict:
    """images/s of each precision / XLA / batch-size run and its ratio to float32."""
    runs = [(f"{name}, batch {FLAGS.batch_size}", precision, jit, FLAGS.batch_size)
            for name, precision, jit in SPEED_RUNS]
    runs += [(f"float32, batch {b}", "float32", False, int(b)) for b in FLAGS.speed_batch_sizes
             if int(b) != FLAGS.batch_size]
    out = {}
    for name, precision, jit, batch_size in runs:
        m = training.train(training.TrainConfig(
            dataset="cifar10", data_dir=FLAGS.data_dir, model=FLAGS.speed_model, epochs=2,
            batch_size=batch_size,
            steps_per_epoch=FLAGS.speed_steps, optimizer="momentum", lr=0.05,
            augment="crop_flip", precision=precision, jit_compile=jit, test_subset=100,
            model_dir=os.path.join(work, "speed", name.replace(" ", "").replace(",", "_"))),
            train_data=cifar)
        out[name] = {"precision": precision, "jit_compile": jit, "batch_size": batch_size,
                     "images_per_sec": m["images_per_sec_steady"]}
        logging.info("speed %s: %.1f images/s", name, m["images_per_sec_steady"])
    base = out[runs[0][0]]["images_per_sec"]
    for r in out.values():
        r["ratio_to_float32"] = r["images_per_sec"] / base
    return out


def _recipe(work: str, cifar: tuple) -> dict:
    """The small preset's pretraining on a subset, test accuracy after every epoch."""
    config = experiment.ExperimentConfig(dataset="cifar10", budget="small",
                                         data_dir=FLAGS.data_dir).resolved()
    train_config = config.pretrain_config(os.path.join(work, "recipe"))
    train_config.epochs, train_config.train_subset = FLAGS.recipe_epochs, FLAGS.recipe_subset
    train_config.test_subset, train_config.test_every = FLAGS.n_test, 1
    train_config.warmup_epochs = min(train_config.warmup_epochs, FLAGS.recipe_epochs / 4)
    m = training.train(train_config, train_data=cifar)
    return {"config": m["config"], "test_images": m["test_images"],
            "test_accuracy": m["test_accuracy"], "images_per_sec": m["images_per_sec"],
            "curve": training.accuracy_curve(os.path.join(train_config.model_dir,
                                                          "history.csv"))}


def main(argv):
    del argv
    for dataset in ["mnist"] + (["cifar10"] if FLAGS.speed_steps or FLAGS.recipe_epochs
                                else []):
        cli.check_data(dataset, FLAGS.data_dir)
    cli.check_inputs(recipe_history=FLAGS.recipe_history)
    cli.check_output_dirs(output_dir=FLAGS.output_dir, work_dir=FLAGS.work_dir)
    work = FLAGS.work_dir or tempfile.mkdtemp(prefix="bench_train_")
    results, m = {}, None
    if FLAGS.mnist_epochs:
        m = training.train(training.TrainConfig(
            dataset="mnist", data_dir=FLAGS.data_dir, model="mnist_cnn",
            epochs=FLAGS.mnist_epochs, batch_size=FLAGS.batch_size,
            model_dir=os.path.join(work, "mnist")))
        results["mnist_cnn"] = {"epochs": FLAGS.mnist_epochs,
                                "test_accuracy": m["test_accuracy"], "goal_accuracy": 0.99,
                                "images_per_sec": m["images_per_sec"],
                                "images_per_sec_steady": m["images_per_sec_steady"],
                                "wall_seconds": m["wall_seconds"]}

    if FLAGS.overhead_epochs:
        x, y = data.load_arrays("mnist", "train", data_dir=FLAGS.data_dir)
        plain = _plain_fit(x, y, FLAGS.overhead_epochs, FLAGS.batch_size)
        if m is not None and FLAGS.overhead_epochs == FLAGS.mnist_epochs:
            ours = m
        else:
            ours = training.train(training.TrainConfig(
                dataset="mnist", data_dir=FLAGS.data_dir, model="mnist_cnn",
                epochs=FLAGS.overhead_epochs, batch_size=FLAGS.batch_size,
                model_dir=os.path.join(work, "overhead")))
        results["overhead"] = {"epochs": FLAGS.overhead_epochs, "plain_fit_seconds": plain,
                               "train_fit_seconds": ours["fit_seconds"],
                               "train_wall_seconds": ours["wall_seconds"],
                               "fit_ratio": ours["fit_seconds"] / plain,
                               "wall_ratio": ours["wall_seconds"] / plain, "goal_ratio": 1.1}

    cifar = None
    if FLAGS.speed_steps or FLAGS.recipe_epochs:
        cifar = data.load_arrays("cifar10", "train", data_dir=FLAGS.data_dir)
    if FLAGS.speed_steps:
        results["speed"] = _speed(work, cifar)
    curves = {}
    if FLAGS.recipe_epochs:
        results["recipe"] = _recipe(work, cifar)
        curves[f"recipe, {FLAGS.recipe_subset or 50000} images"] = results["recipe"]["curve"]
    if FLAGS.recipe_history:
        curves["earlier run"] = training.accuracy_curve(FLAGS.recipe_history)
        results["recipe_history"] = {"path": FLAGS.recipe_history,
                                     "curve": curves["earlier run"]}
    if curves:
        png = plots.accuracy_vs_time(curves, os.path.join(FLAGS.output_dir,
                                                          "accuracy_vs_time.png"), goal=0.88,
                                     title="CIFAR-10 start-model recipe")
        logging.info("wrote %s", png)

    rows = [("benchmark", "value", "goal")]
    if "mnist_cnn" in results:
        r = results["mnist_cnn"]
        rows.append((f"MNIST mnist_cnn test accuracy ({r['epochs']} ep)",
                     f"{100 * r['test_accuracy']:.2f}%", ">= 99.0%"))
        rows.append(("MNIST mnist_cnn images/s (all / after epoch 1)",
                     f"{r['images_per_sec']:.0f} / {r['images_per_sec_steady'] or 0:.0f}", ""))
    if "overhead" in results:
        o = results["overhead"]
        rows.append((f"train() / model.fit fit time ({o['epochs']} ep)", f"{o['fit_ratio']:.3f}",
                     "<= 1.1"))
        rows.append(("train() total wall / model.fit", f"{o['wall_ratio']:.3f}", ""))
    for name, r in results.get("speed", {}).items():
        rows.append((f"CIFAR-10 {FLAGS.speed_model} images/s, {name}",
                     f"{r['images_per_sec']:.0f} ({r['ratio_to_float32']:.2f}x)", ""))
    for key in ("recipe", "recipe_history"):
        for t, acc in results.get(key, {}).get("curve", []):
            rows.append((f"{key}: test acc after {t / 60:.1f} min", f"{100 * acc:.2f}%",
                         ">= 88% in 60 min (all 50,000 images)"))
    width = max(len(a) for a, _, _ in rows)
    table = "\n".join(f"{a:<{width}}  {b:>14}  {c}" for a, b, c in rows)
    print(table)
    path = os.path.join(FLAGS.output_dir, "bench_train.json")
    logging.info("wrote %s", files.write_json(path, results))


if __name__ == "__main__":
    cli.run(main)
