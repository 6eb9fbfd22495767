"""Benchmark of the training methods: cost per example and the robustness-per-second front.

    python bin/bench_training.py --output_dir=results   # writes results/bench_training.json

1. Cost per input image of rat (replace / one / all / worst targets; one and replace also
   with V learnt online; V as the start of an FGSM step: ``rat_init`` class, target with
   random and runner-up targets, the latter also from V plus noise, with and without the
   logit-consistency penalty), fgsm_at and pgd_at
   relative to standard training: same model (``--model``), batch size and data
   (``--dataset``, MNIST by default; the radius flags' defaults are MNIST's); images/s of the
   steady epoch, every method once per round for ``--cost_repeats`` rounds (a ratio is the
   median of its per-round ratios; against FGSM-AT too when it runs). Also per example
   trained on (rat "one" and "worst" train on each image and one perturbed copy, "worst"
   after 9 inference passes to pick it; "all" on the image and its 9 copies; "replace" on
   one of the two).
2. The robustness-per-second front: from one start model per ``--front_models`` entry
   (pretrained here on ``--pretrain_subset`` images for ``--pretrain_epochs``, or
   ``<work_dir>/start_<model>/model.keras`` when it exists), every method of
   ``--front_methods`` fine-tunes on the same balanced ``--train_subset`` images (batch
   ``--batch_size``, Adam ``--lr``): standard, RAT with static V (searched at start), RAT
   with V searched again from zero every epoch, RAT with V continued every epoch for
   ``--refresh_passes`` passes, RAT with V learnt online from zero, FGSM-AT and PGD-AT
   (``--per_source``: every RAT mode with one V per (source class, target);
   ``--targets_per_image``, ``--perturbed_fraction``, ``--batch_mode``: every RAT mode's).
   After every epoch :class:`rat_tf.callbacks.RobustnessMonitor` measures, on the first
   ``--n_test`` test images: clean accuracy, FGSM ``--fgsm_eps`` accuracy, PGD-20
   ``--pgd_eps`` accuracy, and the success of targeted universal perturbations
   (``--tup_eps``, ``--tup_passes``) searched afresh on ``--tup_n_per_class`` images per
   class of the last 5,000 test images (disjoint from the first ``--n_test``, at most 5,000).
   The time axis is wall
   seconds of training (searches included, the monitor's own time excluded), capped at
   ``--time_cap``; the time at which each method first reaches FGSM accuracy >= ``--target``
   with clean accuracy >= ``--clean_target`` is reported. Writes JSON and one PNG per figure
   (``front_<model>_<figure>.png``, one line per method).
"""

import os
import tempfile

import numpy as np
from absl import app, flags, logging

from rat_tf import (callbacks, cli, data, files, models, perturbation_files, plots, recipes,
                    training)

Config = training.TrainConfig
FLAGS = flags.FLAGS
cli.define_dataset_flag(Config, default="mnist")
cli.define_data_flags(data_source=False)
cli.define_output_flag("bench_training.json", default="results")
cli.define("string", "work_dir", "Where runs are written.", default=None,
           unset="a temporary folder")
cli.define("integer", "batch_size", "Batch size of every method.", sets=Config, default=50)
cli.define("integer", "cost_steps", "Steps per epoch of the cost runs, 2 epochs each (0: skip "
           "the cost part).", default=30, lower_bound=0)
cli.define("integer", "cost_repeats", "Rounds of the cost runs: every method once per round, "
           "in turn, so a slow spell of a shared machine hits all of them; each ratio is the "
           "median of its per-round ratios.", default=1, lower_bound=1)
cli.define("string", "model", "Zoo model of the cost runs.", default="mnist_cnn")
cli.define("list", "cost_methods", "Methods of the cost runs (standard is always run: the "
           "reference).", default=None, unset="all")
cli.define_adv_flags(Config, only=["adv_steps"])
cli.define("float", "adv_eps", "FGSM-AT / PGD-AT radius.", sets=Config, default=None,
           unset="--fgsm_eps")
cli.define("list", "front_methods", "Methods of the front (standard, rat_static, rat_refresh, "
           "rat_refresh_warm, rat_online, fgsm_at, pgd_at).",
           default=["standard", "rat_static", "rat_refresh", "rat_refresh_warm", "rat_online",
                    "fgsm_at", "pgd_at"])
cli.define("list", "front_models", "Zoo models of the front, one start model each.",
           default=["mnist_cnn", "wide_mnist_cnn"])
cli.define("integer", "pretrain_subset", "Balanced training images of the start model's "
           "pretraining (0: all).", default=0, lower_bound=0)
cli.define("integer", "pretrain_epochs", "Epochs of the start model's pretraining.", default=2,
           lower_bound=1)
cli.define("integer", "train_subset", "Balanced training images every method fine-tunes on.",
           sets=Config, default=1000)
cli.define("float", "lr", "Fine-tuning learning rate (Adam).", sets=Config, default=5e-4)
cli.define("float", "fgsm_eps", "FGSM radius of the robustness target.", default=0.2)
cli.define("float", "pgd_eps", "PGD-20 radius measured along the front.", default=0.1)
cli.define("float", "tup_eps", "Radius of the fresh targeted universal perturbations.",
           default=0.3)
cli.define("integer", "tup_n_per_class", "Images per class of the fresh searches (a balanced "
           "subset of the last 5,000 test images).", default=20, lower_bound=1)
cli.define("integer", "tup_passes", "Passes of each fresh search.", default=2, lower_bound=1)
cli.define("float", "target", "FGSM accuracy to reach.", default=0.8, lower_bound=0.0,
           upper_bound=1.0)
cli.define("float", "clean_target", "Clean accuracy the target needs as well.", default=0.985,
           lower_bound=0.0, upper_bound=1.0)
cli.define("integer", "n_test", "Held-out test images (the first N of the test split) of "
           "the front's measures.", default=1000, lower_bound=100, upper_bound=5000)
cli.define("float", "time_cap", "Max training seconds per method on the front.",
           default=300.0, lower_bound=1.0)
cli.define("integer", "max_epochs", "Max epochs per method on the front.", default=100,
           lower_bound=1)
cli.define_search_flags(Config, only=["search_passes", "per_source"],
                        defaults={"search_passes": 3})
cli.define_rat_flags(Config, only=["online_step_size", "refresh_passes", "targets_per_image",
                                   "perturbed_fraction", "batch_mode"],
                     defaults={"refresh_passes": 1})

# V[t] plus noise toward the runner-up starts an FGSM step (mnist_rat_target's RAT settings)
_RUNNER_UP_NOISE = {"method": "rat", "rat_init": "target", "targets_per_image": "runner_up",
                    "rat_init_noise": 1.0}
# name -> (TrainConfig fields, examples the model trains on per input image)
_COST_METHODS = {
    "standard": ({}, 1),
    "rat_replace": ({"method": "rat", "batch_mode": "replace"}, 1),
    "rat_one": ({"method": "rat", "targets_per_image": "one"}, 2),
    "rat_all": ({"method": "rat", "targets_per_image": "all"}, 10),
    "rat_worst": ({"method": "rat", "targets_per_image": "worst"}, 2),
    "rat_one_online": ({"method": "rat", "targets_per_image": "one", "online": True}, 2),
    "rat_replace_online": ({"method": "rat", "batch_mode": "replace", "online": True}, 1),
    "rat_init_class": ({"method": "rat", "rat_init": "class"}, 1),
    "rat_init_target": ({"method": "rat", "rat_init": "target"}, 1),
    "rat_init_target_runner_up": ({"method": "rat", "rat_init": "target",
                                   "targets_per_image": "runner_up"}, 1),
    "rat_init_target_runner_up_noise": (_RUNNER_UP_NOISE, 1),
    "rat_init_target_runner_up_noise_penalty": ({**_RUNNER_UP_NOISE, "rat_consistency": 10.0},
                                                1),
    "rat_init_target_runner_up_noise_carry": ({**_RUNNER_UP_NOISE, "rat_carry": "last"}, 1),
    "rat_init_target_runner_up_noise_carry_noise": ({**_RUNNER_UP_NOISE, **recipes.MNIST_CARRY},
                                                    1),
    "rat_init_target_runner_up_noise_carry_step": ({**_RUNNER_UP_NOISE,
                                                    "rat_carry": "last_step"}, 1),
    "fgsm_at": ({"method": "fgsm_at"}, 1),
    "pgd_at": ({"method": "pgd_at"}, 1)}


def _front_settings(zeros: str) -> dict[str, dict]:
    """TrainConfig fields of every front method (on top of the shared ones)."""
    rat = {"method": "rat", "search_passes": FLAGS.search_passes,
           "per_source": FLAGS.per_source, "targets_per_image": FLAGS.targets_per_image,
           "perturbed_fraction": FLAGS.perturbed_fraction, "batch_mode": FLAGS.batch_mode}
    return {"standard": {"method": "standard"},
            "rat_static": {**rat, "refresh_every": 0},
            "rat_refresh": {**rat, "refresh_every": 1},
            "rat_refresh_warm": {**rat, "refresh_every": 1,
                                 "refresh_passes": FLAGS.refresh_passes},
            "rat_online": {**rat, "online": True, "perturbations_path": zeros,
                           "online_step_size": FLAGS.online_step_size},
            "fgsm_at": {"method": "fgsm_at"}, "pgd_at": {"method": "pgd_at"}}


def _zeros(work: str, eps: float) -> str:
    """A V file of zeros in the dataset's shape with radius ``eps``; returns its path."""
    info = data.get_info(FLAGS.dataset)
    shape = (info.num_classes,) * (1 + FLAGS.per_source) + info.image_shape
    return perturbation_files.save(os.path.join(work, f"zeros_eps{eps:g}.npz"),
                                   np.zeros(shape, np.float32), eps=eps)


def _cost(base: dict, work: str, zeros: str) -> dict:
    """Part 1: images/s of every method against standard training (and FGSM-AT when run)."""
    start_zeros = _zeros(work, base["adv_eps"])  # a V that starts an FGSM step: its radius
    chosen = ["standard", *[m for m in FLAGS.cost_methods or _COST_METHODS if m != "standard"]]
    speeds = {name: [] for name in chosen}
    for round_ in range(FLAGS.cost_repeats):
        for name in chosen:
            kw, _ = _COST_METHODS[name]
            cfg = training.TrainConfig(**base, epochs=2, steps_per_epoch=FLAGS.cost_steps,
                                       train_subset=6000,
                                       model_dir=os.path.join(work, f"cost_{name}_{round_}"),
                                       **kw)
            if cfg.method == "rat":
                cfg.perturbations_path = start_zeros if cfg.rat_init != "none" else zeros
                cfg.per_source = FLAGS.per_source
            speeds[name].append(training.train(cfg)["images_per_sec_steady"])
    results = {}
    for name in chosen:
        examples = _COST_METHODS[name][1]
        r = {"images_per_sec": float(np.median(speeds[name])),
             "images_per_sec_per_round": speeds[name],
             "trained_examples_per_image": examples,
             "cost_vs_standard": _median_ratio(speeds["standard"], speeds[name])}
        r["cost_per_trained_example_vs_standard"] = r["cost_vs_standard"] / examples
        if "fgsm_at" in speeds:
            r["cost_vs_fgsm_at"] = _median_ratio(speeds["fgsm_at"], speeds[name])
        results[name] = r
    return results


def _median_ratio(reference: list[float], speeds: list[float]) -> float:
    """Median over rounds of reference images/s over a method's images/s (its relative cost)."""
    return float(np.median(np.asarray(reference) / np.asarray(speeds)))


def _front(model: str, base: dict, work: str, zeros: str, eval_images: tuple,
           tup_images: tuple) -> dict:
    """Part 2 for one start model: every method's records against training seconds."""
    start = os.path.join(work, f"start_{model}", "model.keras")
    results = {"model": model, "methods": {}}
    if not os.path.isfile(start):
        pre = training.train(training.TrainConfig(
            **{**base, "batch_size": 128, "model": model}, epochs=FLAGS.pretrain_epochs,
            train_subset=FLAGS.pretrain_subset, model_dir=os.path.dirname(start)))
        results["start_test_accuracy"] = pre["test_accuracy"]
    settings = _front_settings(zeros)
    for method in FLAGS.front_methods:
        monitor = callbacks.RobustnessMonitor(
            *eval_images, FLAGS.fgsm_eps, target=FLAGS.target, clean_target=FLAGS.clean_target,
            time_limit=FLAGS.time_cap, pgd_eps=FLAGS.pgd_eps, tup_eps=FLAGS.tup_eps,
            tup_images=tup_images, tup_passes=FLAGS.tup_passes)
        cfg = training.TrainConfig(**{**base, **settings[method], "model": model},
                                   init_from=start, epochs=FLAGS.max_epochs,
                                   train_subset=FLAGS.train_subset, lr=FLAGS.lr,
                                   model_dir=os.path.join(work, f"front_{model}_{method}"),
                                   restart=True)
        m = training.train(cfg, callbacks=[monitor])
        search = m.get("search_seconds") or 0.0  # V searched before fit (static, refresh)
        records = [{**r, "train_seconds": r["train_seconds"] + search}
                   for r in monitor.records]
        reached = monitor.time_to_target is not None
        results["methods"][method] = {
            "settings": m["settings"], "search_seconds": search, "records": records,
            "seconds_to_target": monitor.time_to_target + search if reached else None}
    return results


def _print_front(front: dict) -> None:
    print(f"\nfront of {front['model']} (target: FGSM({FLAGS.fgsm_eps}) >= {FLAGS.target:.0%}"
          f" with clean >= {FLAGS.clean_target:.1%}; cap {FLAGS.time_cap:.0f}s):")
    print(f"{'method':<17} {'to target':>10} {'seconds':>8} {'clean':>7} {'FGSM':>7} "
          f"{'PGD':>7} {'TUP succ':>9}")
    for method, r in front["methods"].items():
        last = r["records"][-1]
        when = (f"{r['seconds_to_target']:.0f}s" if r["seconds_to_target"] is not None
                else "no")
        print(f"{method:<17} {when:>10} {last['train_seconds']:>8.0f} "
              f"{last['clean_accuracy']:>7.4f} {last['fgsm_accuracy']:>7.4f} "
              f"{last.get('pgd_accuracy', float('nan')):>7.4f} "
              f"{last.get('tup_success', float('nan')):>9.4f}")


def _plot_front(front: dict) -> list[str]:
    paths = []
    for key, title in (("fgsm_accuracy", f"FGSM {FLAGS.fgsm_eps} accuracy"),
                       ("pgd_accuracy", f"PGD-20 {FLAGS.pgd_eps} accuracy"),
                       ("clean_accuracy", "clean accuracy")):
        curves = {m: [(r["train_seconds"], r[key]) for r in v["records"]]
                  for m, v in front["methods"].items()}
        goal = FLAGS.target if key == "fgsm_accuracy" else (
            FLAGS.clean_target if key == "clean_accuracy" else None)
        path = os.path.join(FLAGS.output_dir, f"front_{front['model']}_{key}.png")
        paths.append(plots.accuracy_vs_time(curves, path, goal=goal,
                                            title=f"{front['model']}: {title}"))
    return paths


def main(argv):
    del argv
    settings = _front_settings("")
    unknown = sorted(set(FLAGS.front_methods) - set(settings))
    if unknown:
        raise app.UsageError(f"--front_methods: unknown {unknown}; choose from {sorted(settings)}")
    unknown = sorted(set(FLAGS.cost_methods or ()) - set(_COST_METHODS))
    if unknown:
        raise app.UsageError(f"--cost_methods: unknown {unknown}; choose from "
                             f"{sorted(_COST_METHODS)}")
    bad_models = sorted((set(FLAGS.front_models) | {FLAGS.model}) - set(models.MODELS))
    if bad_models:
        raise app.UsageError(f"--front_models: unknown {bad_models}; choose from "
                             f"{sorted(models.MODELS)}")
    cli.check_data(FLAGS.dataset, FLAGS.data_dir)
    cli.check_output_dirs(output_dir=FLAGS.output_dir, work_dir=FLAGS.work_dir)
    work = FLAGS.work_dir or tempfile.mkdtemp(prefix="bench_training_")
    base = dict(dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, model=FLAGS.model, verbose=2,
                batch_size=FLAGS.batch_size, pgd_steps=FLAGS.adv_steps,
                adv_eps=FLAGS.adv_eps if FLAGS.adv_eps is not None else FLAGS.fgsm_eps)
    zeros = _zeros(work, FLAGS.tup_eps)
    results = {"cost": _cost(base, work, zeros) if FLAGS.cost_steps else {}, "front": []}
    x_test, y_test = data.load_arrays(FLAGS.dataset, "test", data_dir=FLAGS.data_dir)
    eval_images = (x_test[:FLAGS.n_test], y_test[:FLAGS.n_test])
    tup_images = data.balanced_subset(x_test[-5000:], y_test[-5000:], FLAGS.tup_n_per_class,
                                      seed=0)
    path = os.path.join(FLAGS.output_dir, "bench_training.json")
    for model in FLAGS.front_models:
        front = _front(model, base, work, zeros, eval_images, tup_images)
        front["figures"] = _plot_front(front)
        results["front"].append(front)
        files.write_json(path, results)  # what is done so far survives a kill

    with_fgsm = "fgsm_at" in results["cost"]
    rows = [("method", "images/s", "cost per image", "examples/image", "cost per example",
             "vs fgsm_at" if with_fgsm else "")]
    for name, r in results["cost"].items():
        rows.append((name, f"{r['images_per_sec']:.0f}", f"{r['cost_vs_standard']:.2f}x",
                     str(r["trained_examples_per_image"]),
                     f"{r['cost_per_trained_example_vs_standard']:.2f}x",
                     f"{r['cost_vs_fgsm_at']:.2f}x" if with_fgsm else ""))
    if results["cost"]:
        width = max(len(row[0]) for row in rows)
        print(f"cost relative to standard training (same model, batch size and data; median of "
              f"{FLAGS.cost_repeats} round(s)):")
        print("\n".join(f"{a:<{width}} {b:>9} {c:>15} {d:>15} {e:>17} {f:>11}"
                        for a, b, c, d, e, f in rows))
    for front in results["front"]:
        _print_front(front)
    logging.info("wrote %s", files.write_json(path, results))


if __name__ == "__main__":
    cli.run(main)
