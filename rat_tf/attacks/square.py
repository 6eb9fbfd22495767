"""Square Attack, L-inf (Andriushchenko et al. 2020): gradient-free random search on the
margin loss, with the schedule of square sizes of the reference implementation.

Square draws the position and signs of its square per image rather than once per batch, as in
the Square Attack paper's own code. Registered as ``square``.
"""

from __future__ import annotations

import tensorflow as tf

from rat_tf import ops
from rat_tf.attacks.core import ModelFn, bcast, check_fraction, check_positive_int
from rat_tf.attacks.runs import (best_other, in_graph, over_runs, prepare_run, run_seed,
                                 true_logit)
from rat_tf.attacks.spec import Attack, RunSettings, register

_SQUARE_THRESHOLDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # p halves past each


def _check_images_4d(x: tf.Tensor, attack: str) -> None:
    if x.shape.rank != 4 or not x.shape[1:].is_fully_defined():
        raise ValueError(f"{attack} needs images [N, H, W, C] of known H, W, C, got shape "
                         f"{x.shape}")


def _margin(model_fn: ModelFn, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """z_y - max_{i != y} z_i: <= 0 means misclassified."""
    logits = tf.cast(model_fn(x), tf.float32)
    return true_logit(logits, y) - best_other(logits, y)


def _square_p(i: tf.Tensor, p_init: float, n_queries: int, rescale: bool) -> tf.Tensor:
    """The fraction of pixels a square covers at query i (the reference schedule)."""
    it = tf.cast(i, tf.float32)
    if rescale:
        it = tf.floor(it / n_queries * 10000.0)
    halvings = tf.reduce_sum(tf.cast(it > tf.constant(_SQUARE_THRESHOLDS, tf.float32),
                                     tf.float32))
    return p_init / 2.0 ** halvings


def _square_run(model_fn: ModelFn, x, y, todo, eps, n_queries: int, p_init: float,
                rescale: bool, clip, seed):
    """One L-inf Square Attack run: (fooled, x_best, x_best, -margin)."""
    _, h, w, c = x.shape.as_list()
    eps = tf.cast(eps, x.dtype)
    n = tf.shape(x)[0]
    stripes = tf.sign(ops.replica_rows(
        lambda shape: tf.random.stateless_uniform(shape, seed, -1.0, 1.0, x.dtype), [n, 1, w, c]))
    x_best = ops.apply_perturbation(x, eps * stripes, clip)
    margin = _margin(model_fn, x_best, y)
    rows, cols = tf.range(h)[None], tf.range(w)[None]

    def body(i, x_best, margin):
        active = todo & (margin > 0)
        p = _square_p(i, p_init, n_queries, rescale)
        s = tf.cast(tf.clip_by_value(tf.round(tf.sqrt(p * h * w)), 1.0, float(min(h, w))),
                    tf.int32)
        u = ops.replica_rows(lambda shape: tf.random.stateless_uniform(shape, run_seed(seed, i)),
                             [n, 2 + c])
        vh = tf.cast(tf.floor(u[:, 0] * tf.cast(h - s, tf.float32)), tf.int32)[:, None]
        vw = tf.cast(tf.floor(u[:, 1] * tf.cast(w - s, tf.float32)), tf.int32)[:, None]
        inside = ((rows >= vh) & (rows < vh + s))[:, :, None] & (
            (cols >= vw) & (cols < vw + s))[:, None, :]
        sign = tf.cast(tf.sign(u[:, 2:] * 2.0 - 1.0), x.dtype)[:, None, None, :]
        d = tf.cast(inside, x.dtype)[..., None] * (2.0 * eps) * sign
        x_new = ops.apply_perturbation(x, ops.project(x_best + d - x, eps, "linf"), clip)
        m = _margin(model_fn, x_new, y)
        better = active & ((m < margin) | (m <= 0))
        return (i + 1, tf.where(bcast(better, 4), x_new, x_best), tf.where(better, m, margin))

    _, x_best, margin = tf.while_loop(
        lambda i, xb, m: (i < n_queries) & tf.reduce_any(todo & (m > 0)), body,
        (tf.constant(0), x_best, margin))
    return margin <= 0, x_best, x_best, -margin


def square(model_fn: ModelFn, x, y, eps, *, norm: str = "linf", n_queries: int = 5000,
           p_init: float = 0.8, restarts: int = 1, seed: int = 0,
           rescale_schedule: bool = False, clip_values=ops.PIXEL_RANGE) -> tf.Tensor:
    """Square Attack, L-inf (Andriushchenko et al. 2020): random square updates of +-2 eps
    kept when they lower the margin, ``n_queries`` per run; gradient-free.

    The square side shrinks with the reference schedule of ``p_init`` (over 10,000 queries;
    ``rescale_schedule`` stretches it to ``n_queries``). Returns x_adv (gradient stopped).
    """
    n_queries = check_positive_int(n_queries, "n_queries")
    p_init = check_fraction(p_init, "p_init")
    model_fn, x, y, _, clip, restarts, seed, _, todo = prepare_run(
        model_fn, x, y, eps, norm, clip_values, restarts, seed, "square")
    _check_images_4d(x, "square")

    def run(r, todo_now):
        return _square_run(model_fn, x, y, todo_now, eps, n_queries, p_init,
                           bool(rescale_schedule), clip, run_seed(seed, r))

    return in_graph(lambda: over_runs(run, x, todo, restarts))


def _run(model_fn: ModelFn, x, y, todo, logits, r, seed, settings: RunSettings) -> tuple:
    """One AutoAttack run of Square on a batch (the reference schedule, not rescaled)."""
    del logits, r
    return _square_run(model_fn, x, y, todo, settings.eps, settings.n_queries,
                       settings.p_init, False, settings.clip, seed)


def _call(model_fn: ModelFn, x, y, eps, settings: RunSettings, seed: int,
          strategy: tf.distribute.Strategy | None = None) -> tf.Tensor:
    """Square with ``settings.n_queries`` queries per run on one batch."""
    del strategy  # pure TensorFlow: runs per replica
    return square(model_fn, x, y, eps, norm=settings.norm, n_queries=settings.n_queries,
                  p_init=settings.p_init, restarts=settings.restarts, seed=seed,
                  clip_values=settings.clip)


register(Attack("square", square, _call, run=_run, passes_per_step=1.0, budget="n_queries",
                linf_only=True))
