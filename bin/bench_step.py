"""Benchmark: where the time of one RAT train step goes.

    python bin/bench_step.py --output_dir=results   # writes results/bench_step.json

For RAT in append and replace mode, static and online (and standard training as the
reference), on real MNIST images of one batch: the compiled ``train_step`` of the trainer,
and, compiled alone on the same batch, (a) the perturbation ops of the step (target draw, row
gather, add, clip, concatenation or swap; online also the V update: the all-reduce, signed
step and projection, on a gradient of V's shape) and (b) the classifier's forward and backward
on the batch the step trains on (the clean batch plus its copies in append mode). Each is the
median of ``--repeats`` timed calls after a warm-up; shares are of the train step. The rest
(optimizer update, loss and metrics, online's extra input gradient) is the step minus both.
"""

import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import flags, logging

from rat_tf import cli, data, files, models, trainers, training

FLAGS = flags.FLAGS
cli.define_data_flags(data_source=False)
cli.define_output_flag("bench_step.json", default="results")
cli.define("enum", "model", "Zoo model of the classifier.", default="mnist_cnn",
           values=sorted(models.MODELS))
cli.define("integer", "batch_size", "Images per step.", default=50, lower_bound=2)
cli.define("integer", "repeats", "Timed calls per measurement (median).", default=30,
           lower_bound=3)
cli.define("bool", "jit_compile", "Compile the train step with XLA.", sets=training.TrainConfig)

_MODES = {  # name -> RATModel settings (None: standard training)
    "standard": None,
    "rat_append": {"batch_mode": "append"},
    "rat_append_online": {"batch_mode": "append", "online": True},
    "rat_replace": {"batch_mode": "replace"},
    "rat_replace_online": {"batch_mode": "replace", "online": True},
}


def _median_seconds(fn, *args) -> float:
    """Median wall seconds of ``fn(*args)`` (synchronised on its outputs) after a warm-up."""
    tf.nest.map_structure(np.asarray, fn(*args))
    times = []
    for _ in range(FLAGS.repeats):
        t = time.perf_counter()
        tf.nest.map_structure(np.asarray, fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _profile(name: str, settings: dict | None, x: tf.Tensor, y: tf.Tensor) -> dict:
    keras.utils.set_random_seed(0)
    classifier = models.build_model(FLAGS.model, "mnist")
    eps = data.get_info("mnist").eps
    if settings is None:
        trainer = trainers.make_trainer("standard", classifier)
    else:
        v = np.random.default_rng(0).uniform(-eps, eps, (10, 28, 28, 1)).astype(np.float32)
        trainer = trainers.make_trainer("rat", classifier, perturbations=v, eps=eps, **settings)
    trainer.compile(optimizer=keras.optimizers.Adam(1e-4), jit_compile=FLAGS.jit_compile)
    trainer.train_on_batch(x, y)  # builds the optimizer and the metrics
    step = tf.function(lambda a, b: trainer.train_step((a, b)), jit_compile=FLAGS.jit_compile)
    out = {"step_seconds": _median_seconds(step, x, y)}
    trained = x
    if settings is not None:
        def perturb(a, b):
            return trainer.training_batch(a, b)[0]

        def perturb_online(a, b):
            batch = perturb(a, b)
            trainer.learn_perturbations(tf.convert_to_tensor(trainer.perturbations),
                                        tf.random.normal(trainer.perturbations.shape))
            return batch

        ops_fn = tf.function(perturb_online if trainer.online else perturb)
        out["perturbation_ops_seconds"] = _median_seconds(ops_fn, x, y)
        if trainer.batch_mode == "append":
            trained = tf.concat([x, x], 0)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    labels = tf.concat([y] * (len(trained) // len(y)), 0)

    @tf.function
    def forward_backward(a, b):
        with tf.GradientTape() as tape:
            loss = loss_fn(b, classifier(a, training=True))
        return tape.gradient(loss, classifier.trainable_variables)

    out["forward_backward_seconds"] = _median_seconds(forward_backward, trained, labels)
    out["trained_examples"] = int(len(trained))
    logging.info("%s: %s", name, out)
    return out


def main(argv):
    del argv
    cli.check_data("mnist", FLAGS.data_dir)
    cli.check_output_dirs(output_dir=FLAGS.output_dir)
    x_all, y_all = data.load_arrays("mnist", "train", data_dir=FLAGS.data_dir)
    x = tf.constant(x_all[:FLAGS.batch_size])
    y = tf.constant(y_all[:FLAGS.batch_size].astype(np.int32))
    results = {"model": FLAGS.model, "batch_size": FLAGS.batch_size,
               "jit_compile": FLAGS.jit_compile, "modes": {}}
    for name, settings in _MODES.items():
        results["modes"][name] = _profile(name, settings, x, y)
    ref = results["modes"]["standard"]["step_seconds"]
    rows = [("mode", "step ms", "vs standard", "pert. ops", "share", "fwd+bwd", "share")]
    for name, r in results["modes"].items():
        r["step_vs_standard"] = r["step_seconds"] / ref
        r["perturbation_share"] = r.get("perturbation_ops_seconds", 0.0) / r["step_seconds"]
        r["forward_backward_share"] = r["forward_backward_seconds"] / r["step_seconds"]
        rows.append((name, f"{1e3 * r['step_seconds']:.1f}", f"{r['step_vs_standard']:.2f}x",
                     f"{1e3 * r.get('perturbation_ops_seconds', 0.0):.2f} ms",
                     f"{r['perturbation_share']:.1%}",
                     f"{1e3 * r['forward_backward_seconds']:.1f} ms",
                     f"{r['forward_backward_share']:.0%}"))
    print(f"one train step of {FLAGS.model}, batch {FLAGS.batch_size}, "
          f"XLA {FLAGS.jit_compile} (median of {FLAGS.repeats}):")
    print("\n".join("{:<20} {:>8} {:>12} {:>10} {:>7} {:>9} {:>6}".format(*r) for r in rows))
    path = os.path.join(FLAGS.output_dir, "bench_step.json")
    logging.info("wrote %s", files.write_json(path, results))


if __name__ == "__main__":
    cli.run(main)
