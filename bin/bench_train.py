"""Benchmark of training: accuracy and speed of train(), and its overhead vs model.fit.

    python bin/bench_train.py --output_dir=results   # writes results/bench_train.json

1. Full real MNIST, mnist_cnn, ``--mnist_epochs`` epochs through ``training.train``: test
   accuracy (goal >= 99.0%) and images/s.
2. Overhead: ``training.train`` against a plain ``model.fit`` of the same model, data, batch
   size and epochs (``--overhead_epochs``), as a ratio of fit time and of total wall time
   (train() also loads data, evaluates and saves; goal <= 1.1). One run each.
3. Real CIFAR-10, resnet20, ``--cifar_epochs`` on a balanced ``--cifar_subset``: images/s and
   test accuracy.
"""

import os
import tempfile
import time

import keras
from absl import flags, logging

from rat_tf import cli, data, files, models, training

FLAGS = flags.FLAGS
cli.define_data_flags(data_source=False)
cli.define_output_flag("bench_train.json", default="results")
cli.define("string", "work_dir", "Where runs are written.", default=None,
           unset="a temporary folder")
cli.define("integer", "mnist_epochs", "Epochs of mnist_cnn on full MNIST.", default=3)
cli.define("integer", "overhead_epochs", "Epochs of the train() vs model.fit comparison.",
           default=1)
cli.define("integer", "batch_size", "Batch size.", sets=training.TrainConfig)
cli.define("integer", "cifar_epochs", "Epochs of resnet20 on CIFAR-10 (0: skip).", default=1)
cli.define("integer", "cifar_subset", "Balanced CIFAR-10 training images (0: all).",
           default=10000)
cli.define("integer", "cifar_test", "CIFAR-10 test images for the accuracy (0: all).",
           default=2000)


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


def main(argv):
    del argv
    for dataset in ["mnist"] + (["cifar10"] if FLAGS.cifar_epochs else []):
        cli.check_data(dataset, FLAGS.data_dir)
    cli.check_output_dirs(output_dir=FLAGS.output_dir, work_dir=FLAGS.work_dir)
    work = FLAGS.work_dir or tempfile.mkdtemp(prefix="bench_train_")
    results = {}
    mnist = training.TrainConfig(dataset="mnist", data_dir=FLAGS.data_dir, model="mnist_cnn",
                                 epochs=FLAGS.mnist_epochs, batch_size=FLAGS.batch_size,
                                 model_dir=os.path.join(work, "mnist"))
    m = training.train(mnist)
    results["mnist_cnn"] = {"epochs": FLAGS.mnist_epochs, "test_accuracy": m["test_accuracy"],
                            "goal_accuracy": 0.99, "images_per_sec": m["images_per_sec"],
                            "images_per_sec_steady": m["images_per_sec_steady"],
                            "wall_seconds": m["wall_seconds"]}

    if FLAGS.overhead_epochs:
        x, y = data.load_arrays("mnist", "train", data_dir=FLAGS.data_dir)
        plain = _plain_fit(x, y, FLAGS.overhead_epochs, FLAGS.batch_size)
        if FLAGS.overhead_epochs == FLAGS.mnist_epochs:
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

    if FLAGS.cifar_epochs:
        c = training.train(training.TrainConfig(
            dataset="cifar10", data_dir=FLAGS.data_dir, model="resnet20",
            epochs=FLAGS.cifar_epochs, batch_size=FLAGS.batch_size, optimizer="momentum",
            lr=0.05, lr_schedule="cosine", train_subset=FLAGS.cifar_subset,
            test_subset=FLAGS.cifar_test, model_dir=os.path.join(work, "cifar")))
        results["resnet20_cifar10"] = {"epochs": FLAGS.cifar_epochs,
                                       "train_images": c["train_images"],
                                       "test_images": c["test_images"],
                                       "test_accuracy": c["test_accuracy"],
                                       "images_per_sec": c["images_per_sec"],
                                       "wall_seconds": c["wall_seconds"]}

    rows = [("benchmark", "value", "goal")]
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
    if "resnet20_cifar10" in results:
        c = results["resnet20_cifar10"]
        rows.append((f"CIFAR-10 resnet20 {c['epochs']} ep on {c['train_images']} imgs: test acc",
                     f"{100 * c['test_accuracy']:.2f}%", ""))
        rows.append(("CIFAR-10 resnet20 images/s", f"{c['images_per_sec']:.0f}", ""))
    width = max(len(a) for a, _, _ in rows)
    table = "\n".join(f"{a:<{width}}  {b:>14}  {c}" for a, b, c in rows)
    print(table)
    path = os.path.join(FLAGS.output_dir, "bench_train.json")
    logging.info("wrote %s", files.write_json(path, results))


if __name__ == "__main__":
    cli.run(main)
