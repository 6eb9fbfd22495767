"""AutoAttack in TensorFlow: the ensemble driver over the attacks of the registry.

The parameter-free attack suite of Croce & Hein (ICML 2020) for measuring robust accuracy:
:func:`autoattack` runs the standard sequence APGD-CE, APGD-T, FAB-T, Square (or any
registered attacks, :func:`rat_tf.attacks.autoattack_names`), each attack run only on the
images no earlier one broke; it returns the per-image robust mask, the worst-case images and
which attack broke each image. The attacks themselves are :func:`rat_tf.attacks.apgd` (APGD-CE,
APGD-DLR, APGD-T), :func:`rat_tf.attacks.fab` (FAB-T) and :func:`rat_tf.attacks.square`; the
driver knows of an attack only its registry entry (:class:`rat_tf.attacks.Attack`): its run on
a batch, its number of runs and its cost.

``model_fn``, images, labels and radii follow :mod:`rat_tf.attacks` (images in
``clip_values``, integer labels, everything after ``(model_fn, x, y, eps)`` keyword-only).
The attacks are pure TensorFlow: they trace inside ``tf.function``, loop with
``tf.while_loop`` over per-example state and draw their random numbers from stateless
generators, so a seed fixes the result. Within one call every run (restart or target) works on
all images, and each image keeps the first adversarial example found, else the point of highest
loss (lowest margin for Square). Images the model already misclassifies are returned
unchanged. Loops stop early once every image is fooled, which changes no result.
:func:`autoattack` is a Python driver over one compiled function per attack with fixed, padded
batch shapes, so nothing retraces between batches or runs; each batch is split over the
replicas of a ``tf.distribute`` strategy. Random numbers are drawn for the whole batch and
every replica keeps its rows (:func:`rat_tf.ops.replica_rows`), so results do not depend on the
split.

Where this differs from the reference implementation (fra31/auto-attack): the
first interval's count of loss increases starts from the loss at the random start (the
reference compares the first step with a zero), a run keeps its first adversarial iterate
rather than its last, and Square draws the position and signs of its square per image
rather than once per batch, as in the Square Attack paper's own code.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from rat_tf import models, ops
from rat_tf.attacks import LOSSES, apgd, fab, square
from rat_tf.attacks.core import (ModelFn, ReplicaStep, bcast, check_classes, check_fraction,
                                 check_images, check_model, check_positive_int, check_seed,
                                 check_split, check_target_count, pad_rows, predict, round_up)
from rat_tf.attacks.runs import clean_logits, predicted, run_seed
from rat_tf.attacks.spec import REGISTRY, Attack, RunSettings, autoattack_names

ATTACKS = autoattack_names()  # the built-in ones; any registered later can run as well
VERSIONS = {"standard": ("apgd-ce", "apgd-t", "fab-t", "square")}


def _batch_attack(attack: Attack, model_fn: ModelFn, seed: int, settings: RunSettings,
                  strategy: tf.distribute.Strategy | None) -> ReplicaStep:
    """One compiled run of ``attack`` on a fixed-size global batch split over the replicas:
    ([xb, yb, valid], run, batch) -> (x_out, broken)."""

    def step(xb, yb, valid, r, batch):
        s = run_seed(seed, r, batch)
        logits, correct = clean_logits(model_fn, xb, yb)
        todo = valid & correct
        fooled, x_found, x_best, _ = attack.run(model_fn, xb, yb, todo, logits, r, s, settings)
        rank = xb.shape.rank
        out = tf.where(bcast(todo, rank), tf.where(bcast(fooled, rank), x_found, x_best), xb)
        return out, todo & tf.not_equal(predicted(model_fn(out)), yb)

    return ReplicaStep(step, strategy)


def bucket(n: int, b: int, replicas: int) -> int:
    """The padded batch for the last ``n`` images still robust: ``b``, or b/2, b/4, ...
    (multiples of ``replicas``, at least ``_MIN_BUCKET``) while they hold ``n``: a few shapes to
    compile, and the work of an attack follows the images left (at most twice their number)
    instead of the whole batch. Each row's random draws and iterates do not depend on the
    batch size, nor do the results."""
    size = b
    while size // 2 >= _MIN_BUCKET:
        smaller = round_up(size // 2, replicas)
        if smaller >= size or smaller < n:
            break
        size = smaller
    return size


_MIN_BUCKET = 16  # below this a batch is cheaper to pad than to compile again
_MIN_EFFECTIVE = 64  # below this many images a step costs about the same on a CPU


def _run_cost(name: str, n: int, settings: RunSettings) -> float:
    """Rough cost of one run of attack ``name`` on one batch of ``n`` padded images, in
    forward passes of one image (a backward pass counts as one)."""
    attack = REGISTRY[name]
    return attack.passes_per_step * attack.iterations(settings) * max(n, _MIN_EFFECTIVE)


def _batches_cost(name: str, n: int, b: int, replicas: int, settings: RunSettings) -> float:
    """Rough cost of one run of attack ``name`` on ``n`` images in batches of at most ``b``."""
    full, rest = divmod(n, b)
    cost = full * _run_cost(name, b, settings)
    return cost + (_run_cost(name, bucket(rest, b, replicas), settings) if rest else 0.0)


def _cost(name: str, n: int, b: int, replicas: int, settings: RunSettings) -> float:
    """Rough cost of all runs of attack ``name`` on ``n`` images in batches of ``b``."""
    return REGISTRY[name].runs(settings) * _batches_cost(name, max(0, n), b, replicas, settings)


def attack_cost(name: str, n: int, *, steps: int = 100, n_queries: int = 5000,
                n_target_classes: int = 9, restarts: int = 1, batch_size: int = 500,
                replicas: int = 1) -> float:
    """Rough cost of :func:`autoattack`'s attack ``name`` on ``n`` images, in forward passes
    of one image (a backward pass counts as one): the weight a progress bar gives it."""
    settings = RunSettings(steps=steps, n_queries=n_queries, n_target_classes=n_target_classes,
                           restarts=restarts)
    return _cost(name, n, round_up(batch_size, replicas), replicas, settings)


def check_attacks(attacks: Sequence[str] | str | None, version: str, norm: str) -> list[str]:
    """The attack names of ``attacks`` (None: the version's sequence), each a registered
    attack AutoAttack can run, checked for ``norm``."""
    if version not in VERSIONS:
        raise ValueError(f"unknown version {version!r}; choose one of {sorted(VERSIONS)}")
    names = list(VERSIONS[version] if attacks is None else
                 ([attacks] if isinstance(attacks, str) else attacks))
    known = autoattack_names()
    for name in names:
        if name not in known:
            raise ValueError(f"unknown attack {name!r}; choose from {known}")
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"attacks must name each attack at most once, got {names}")
    linf_only = [a for a in names if REGISTRY[a].linf_only]
    if norm != "linf" and linf_only:
        raise ValueError(f"{', '.join(linf_only)} support norm 'linf' only, got {norm!r}: "
                         f"pass attacks= without them")
    return names


def autoattack(model_fn: ModelFn, x, y, eps, *, norm: str = "linf", version: str = "standard",
               attacks: Sequence[str] | None = None, seed: int = 0, batch_size: int = 500,
               steps: int = 100, n_queries: int = 5000, n_target_classes: int = 9,
               restarts: int = 1, p_init: float = 0.8, rho: float = 0.75,
               clip_values=ops.PIXEL_RANGE,
               strategy: tf.distribute.Strategy | None = None,
               progress: Callable[[float, float], None] | None = None) -> dict:
    """Robust accuracy under AutoAttack: ``attacks`` (default the version's APGD-CE, APGD-T,
    FAB-T, Square; any of :func:`rat_tf.attacks.autoattack_names`) in order, each only on the
    images no earlier attack broke.

    ``steps`` are the iterations of APGD and FAB-T runs, ``n_queries`` Square's,
    ``restarts`` the runs of APGD-CE (and APGD-DLR); APGD-T and FAB-T run once per target
    class. Returns a dict: ``robust`` (bool [N]), ``x_adv`` (the adversarial example of each
    broken image, the first attack's worst case for robust ones, ``x`` for misclassified
    ones), ``robust_accuracy`` ({"clean": ..., attack: accuracy after it}, in order),
    ``broken_by`` (per image the attack that broke it, "clean" if misclassified, None if
    robust) and ``seconds`` per attack.

    Every batch of ``batch_size`` images (a multiple of the replicas; for fewer images, their
    number rounded up to one) is split over the replicas of ``strategy`` (None: the current
    strategy); the results do not depend on the split. ``progress(done, total)``, if given, is
    called after every batch with the :func:`attack_cost` done so far and the estimated total
    (the later attacks weighed by the images still robust).
    """
    norm = ops.check_norm(norm)
    names = check_attacks(attacks, version, norm)
    ops.check_radius(eps)
    clip = ops.check_clip_values(clip_values)
    ops.check_box_radius(eps, norm, clip)
    steps = check_positive_int(steps, "steps")
    n_queries = check_positive_int(n_queries, "n_queries")
    restarts = check_positive_int(restarts, "restarts")
    batch_size = check_positive_int(batch_size, "batch_size")
    p_init = check_fraction(p_init, "p_init")
    rho = check_fraction(rho, "rho")
    seed = check_seed(seed)
    x, y = check_images(x, y, clip)
    model_fn = models.as_model_fn(model_fn)
    num_classes = check_model(model_fn, x)
    probe = tf.zeros([1, num_classes])
    if any(REGISTRY[a].targeted for a in names):
        n_target_classes = check_target_count(probe, n_target_classes)
    for a in names:
        if REGISTRY[a].min_classes:
            check_classes(probe, REGISTRY[a].min_classes, a)
    settings = RunSettings(eps=eps, norm=norm, clip=clip, steps=steps, n_queries=n_queries,
                           n_target_classes=n_target_classes, restarts=restarts, p_init=p_init,
                           rho=rho)
    strategy = strategy or tf.distribute.get_strategy()
    n = len(x)
    b = check_split(min(batch_size, round_up(n, strategy.num_replicas_in_sync)), strategy,
                    "batch_size")
    pred = predict(model_fn, x, batch_size, strategy)
    if y is None:
        y = pred
    robust = pred == y
    broken_by: list[str | None] = [None if r else "clean" for r in robust]
    x_adv = x.copy()
    accuracy = {"clean": float(robust.mean())}
    seconds = {}
    first = True
    replicas = strategy.num_replicas_in_sync
    done = 0.0

    def report(index: int, run: int, batches_left: float) -> None:
        """Tell ``progress`` the cost done and the total: the batches left in this run, then
        this attack's later runs and the later attacks on the images robust now."""
        if progress is not None:
            left = int(robust.sum())
            runs_left = REGISTRY[names[index]].runs(settings) - run - 1
            later = runs_left * _batches_cost(names[index], left, b, replicas, settings)
            later += sum(_cost(a, left, b, replicas, settings) for a in names[index + 1:])
            progress(done, done + batches_left + later)

    for index, name in enumerate(names):
        start = time.perf_counter()
        fn = _batch_attack(REGISTRY[name], model_fn, seed, settings, strategy)
        for r in range(REGISTRY[name].runs(settings)):
            todo = np.flatnonzero(robust)
            for k, i in enumerate(range(0, len(todo), b)):
                ids = todo[i:i + b]
                size = bucket(len(ids), b, replicas)
                out, broken = fn([pad_rows(x[ids], size), pad_rows(y[ids], size),
                                  np.arange(size) < len(ids)], np.int32(r), np.int32(k))
                out, broken = out[:len(ids)], broken[:len(ids)]
                keep = slice(None) if first else broken
                x_adv[ids[keep]] = out[keep]
                robust[ids[broken]] = False
                for j in ids[broken]:
                    broken_by[j] = name
                done += _run_cost(name, size, settings)
                report(index, r, _batches_cost(name, max(0, len(todo) - i - b), b, replicas,
                                               settings))
            first = False
        accuracy[name] = float(robust.mean())
        seconds[name] = time.perf_counter() - start
        logging.info("robust accuracy after %s: %.2f%% (%.1f s)", name, 100 * accuracy[name],
                     seconds[name])
    return {"robust": robust, "x_adv": x_adv, "robust_accuracy": accuracy,
            "broken_by": broken_by, "seconds": seconds}


__all__ = ["apgd", "fab", "square", "autoattack", "attack_cost", "check_attacks", "bucket",
           "ATTACKS", "LOSSES", "VERSIONS"]

