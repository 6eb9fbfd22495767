"""Benchmark: rat_tf's AutoAttack against ART 1.20's APGD-CE + APGD-DLR + Square.

The same SavedModel (--model_path, or an mnist_cnn trained here for one epoch and exported),
the same first --n_test MNIST test images, the same L-inf radius and budgets (APGD steps,
Square queries); each side runs its attacks in turn on the images still robust. Rows: ART's
three attacks, rat_tf's same three (``apgd-ce, apgd-dlr, square``) and rat_tf's standard
AutoAttack (``apgd-ce, apgd-t, fab-t, square``). Every rat_tf time includes tracing. Also the
cost per image relative to its floor: the gradient (and forward) evaluations the attacks made,
times one compiled forward+backward (forward) pass of the model per image. Prints a table and
writes bench_autoattack.json to --output_dir. The budgets default to the robustness report's
(``rat_tf.evaluation.EvalSettings``).

Example:  python bin/bench_autoattack.py --n_test=500 --output_dir=results
"""

import os
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from absl import flags, logging

from rat_tf import autoattack, cli, crosscheck, data, evaluation, export, files, models

FLAGS = flags.FLAGS
cli.define_data_flags(data_source=False)
cli.define("string", "model_path", "SavedModel to attack.", default=None,
           unset="an mnist_cnn trained and exported here")
cli.define("integer", "n_test", "Test images attacked (the first N of the test split).",
           default=500, lower_bound=1)
cli.define("float", "aa_eps", "AutoAttack radius (L-inf) of both sides.", default=0.1)
cli.define_eval_flags(only=["aa_steps", "aa_queries", "batch_size", "seed"])
cli.define_output_flag("bench_autoattack.json", default="results")

_SAME = ("apgd-ce", "apgd-dlr", "square")


def _saved_model(work: str) -> str:
    """An mnist_cnn trained one epoch on 12,000 MNIST training images, exported."""
    x, y = data.load_arrays("mnist", "train", "files", FLAGS.data_dir)
    keras.utils.set_random_seed(FLAGS.seed)
    model = models.build_model("mnist_cnn", "mnist")
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x[:12000], y[:12000], batch_size=64, epochs=1, verbose=2)
    return export.export_saved_model(model, os.path.join(work, "sm"))


def _pass_seconds(model_fn, shape, backward: bool) -> float:
    """Seconds per image of one compiled forward (+ backward) pass of a full batch."""
    @tf.function
    def step(xb):
        with tf.GradientTape() as tape:
            tape.watch(xb)
            out = tf.reduce_sum(model_fn(xb))
        return tape.gradient(out, xb) if backward else out

    xb = tf.random.stateless_uniform([FLAGS.batch_size, *shape], [0, 0])
    step(xb).numpy()
    start = time.perf_counter()
    for _ in range(10):
        out = step(xb)
    np.asarray(out)
    return (time.perf_counter() - start) / (10 * FLAGS.batch_size)


def _floor(after_each: dict, n: int, k: int, t_fb: float, t_f: float) -> float:
    """Seconds the attacks' model evaluations cost at one compiled pass per image."""
    robust_before, total = n * after_each["clean"], 0.0
    runs = {"apgd-ce": 1, "apgd-dlr": 1, "apgd-t": min(9, k - 1), "fab-t": min(9, k - 1)}
    for name, acc in after_each.items():
        if name == "clean":
            continue
        if name == "square":
            total += robust_before * FLAGS.aa_queries * t_f
        else:
            total += robust_before * runs[name] * FLAGS.aa_steps * t_fb
        robust_before = n * acc
    return total


def main(argv):
    del argv
    cli.check_data("mnist", FLAGS.data_dir, "files", splits=["test"] if FLAGS.model_path
                   else ["train", "test"])
    cli.check_inputs(model_path=FLAGS.model_path)
    cli.check_output_dirs(output_dir=FLAGS.output_dir)
    x, y = data.load_arrays("mnist", "test", "files", FLAGS.data_dir)
    x, y = x[:FLAGS.n_test], y[:FLAGS.n_test]
    with tempfile.TemporaryDirectory() as work:
        path = FLAGS.model_path or _saved_model(work)
        budget = dict(steps=FLAGS.aa_steps, n_queries=FLAGS.aa_queries,
                      batch_size=FLAGS.batch_size, seed=FLAGS.seed)
        same = crosscheck.crosscheck_autoattack(path, x, y, FLAGS.aa_eps, attacks=_SAME,
                                                **budget)
        model_fn, _ = evaluation.load_model_fn(path)
        t0 = time.time()
        standard = autoattack.autoattack(model_fn, x, y, FLAGS.aa_eps, **budget)
        t_standard = time.time() - t0
        t_fb = _pass_seconds(model_fn, x.shape[1:], True)
        t_f = _pass_seconds(model_fn, x.shape[1:], False)
    n, art_s = len(x), same["seconds"]["art"]
    rows = [
        {"side": "ART apgd-ce, apgd-dlr, square", "seconds": art_s,
         "robust_accuracy": same["art"]["square"], "floor_seconds": None},
        {"side": "rat_tf apgd-ce, apgd-dlr, square", "seconds": same["seconds"]["rat_tf"],
         "robust_accuracy": same["rat_tf"],
         "floor_seconds": _floor(same["rat_tf_after_each"], n, 10, t_fb, t_f)},
        {"side": "rat_tf standard AA", "seconds": round(t_standard, 1),
         "robust_accuracy": float(standard["robust"].mean()),
         "floor_seconds": _floor(standard["robust_accuracy"], n, 10, t_fb, t_f)},
    ]
    print(f"\nAutoAttack, {n} MNIST test images, L-inf {FLAGS.aa_eps:g}, {FLAGS.aa_steps} steps, "
          f"{FLAGS.aa_queries} Square queries\n")
    print("| side | seconds | images/s | speed vs ART | robust acc. | x floor |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        r["images_per_sec"] = n / r["seconds"]
        r["speed_vs_art"] = art_s / r["seconds"]
        r["times_floor"] = (r["seconds"] / r["floor_seconds"]) if r["floor_seconds"] else None
        floor = "-" if r["times_floor"] is None else f"{r['times_floor']:.1f}"
        print(f"| {r['side']} | {r['seconds']:.1f} | {r['images_per_sec']:.1f} | "
              f"{r['speed_vs_art']:.2f}x | {100 * r['robust_accuracy']:.1f} | {floor} |")
    result = {"n_images": n, "eps": FLAGS.aa_eps, "steps": FLAGS.aa_steps,
              "n_queries": FLAGS.aa_queries, "batch_size": FLAGS.batch_size, "rows": rows,
              "pass_seconds_per_image": {"forward_backward": t_fb, "forward": t_f},
              "crosscheck_ok": same["ok"], "standard_after_each": standard["robust_accuracy"]}
    out = os.path.join(FLAGS.output_dir, "bench_autoattack.json")
    logging.info("wrote %s", files.write_json(out, result))


if __name__ == "__main__":
    cli.run(main)
