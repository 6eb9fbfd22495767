"""Pieces of the attacks made of runs (APGD, FAB-T, Square): per-example logits helpers,
seeds, the worst case over runs and the checks of one call.

Every run works on all images of a batch and returns (fooled, x_found, x_best, score); a call
keeps per image the first adversarial example found over its runs, else the point of highest
score (:func:`over_runs`).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from rat_tf.attacks.core import (ModelFn, as_labels, bcast, check_linf, check_positive_int,
                                 check_seed, setup_attack)


def run_seed(seed, *salts) -> tf.Tensor:
    """A stateless-RNG seed [2] from ``seed`` (an integer or a seed [2]) and int tensors
    folded in."""
    s = tf.constant([seed, 0], tf.int64) if isinstance(seed, int) else seed
    for salt in salts:
        s = tf.random.experimental.stateless_fold_in(s, tf.cast(salt, tf.int64))
    return s


def predicted(logits: tf.Tensor) -> tf.Tensor:
    """The predicted classes [N] of ``logits``."""
    return tf.argmax(logits, axis=-1, output_type=tf.int32)


def true_logit(logits: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """The logit of class ``y`` per example."""
    return tf.gather(logits, y, axis=1, batch_dims=1)


def best_other(logits: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """max_{i != y} z_i per example."""
    k = tf.shape(logits)[-1]
    masked = tf.where(tf.one_hot(y, k, on_value=True, off_value=False), -np.inf, logits)
    return tf.reduce_max(masked, axis=-1)


def top_targets(logits: tf.Tensor, y: tf.Tensor, n: int) -> tf.Tensor:
    """[N, n]: per example the n classes other than ``y`` of highest logit, best first."""
    k = tf.shape(logits)[-1]
    masked = tf.where(tf.one_hot(y, k, on_value=True, off_value=False), -np.inf, logits)
    return tf.math.top_k(masked, n).indices


def over_runs(run, x: tf.Tensor, todo: tf.Tensor, n_runs: int) -> tf.Tensor:
    """Worst case per example over ``run(r, todo_now)`` -> (fooled, x_found, x_best, score),
    r = 0..n_runs-1: the first adversarial example found, else the highest-score point.

    Runs stop once every row of ``todo`` is fooled; rows outside ``todo`` come back as ``x``.
    """
    rank = x.shape.rank

    def body(r, fooled, x_found, x_hi, s_hi):
        f, xf, xb, s = run(r, todo & ~fooled)
        new = f & ~fooled
        higher = s > s_hi
        return (r + 1, fooled | f, tf.where(bcast(new, rank), xf, x_found),
                tf.where(bcast(higher, rank), xb, x_hi), tf.where(higher, s, s_hi))

    n = tf.shape(x)[0]
    init = (tf.constant(0), tf.zeros([n], tf.bool), x, x, tf.fill([n], -np.inf))
    _, fooled, x_found, x_hi, _ = tf.while_loop(
        lambda r, f, *_: (r < n_runs) & tf.reduce_any(todo & ~f), body, init)
    out = tf.where(bcast(fooled, rank), x_found, x_hi)
    return tf.stop_gradient(tf.where(bcast(todo, rank), out, x))


def in_graph(fn):
    """``fn()`` traced as one graph when called eagerly (no per-op dispatch in the loops)."""
    return tf.function(fn)() if tf.executing_eagerly() else fn()


def clean_logits(model_fn: ModelFn, x: tf.Tensor, y: tf.Tensor):
    """(clean logits, correctly classified [N])."""
    logits = tf.cast(model_fn(x), tf.float32)
    return logits, tf.equal(predicted(logits), y)


def prepare_run(model_fn, x, y, eps, norm, clip_values, restarts, seed, attack: str):
    """The checks of an attack call: (model_fn, x, y, clip, restarts, seed, clean logits,
    correctly classified); ``attack`` names the attack if it is L-inf only, else None."""
    model_fn, x, norm, clip = setup_attack(model_fn, x, norm, eps, None, clip_values)
    if attack is not None:
        check_linf(norm, attack)
    restarts = check_positive_int(restarts, "restarts")
    seed = check_seed(seed)
    y = as_labels(model_fn, x, y)
    return (model_fn, x, y, norm, clip, restarts, seed) + clean_logits(model_fn, x, y)
