"""FAB-T, L-inf (Croce & Hein 2020): the targeted fast adaptive boundary attack (minimal
L-inf norm). Registered as ``fab-t``.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import tensorflow as tf

from rat_tf import ops
from rat_tf.attacks.core import ModelFn, check_fraction, check_positive_int, check_target_count
from rat_tf.attacks.runs import (in_graph, over_runs, predicted, prepare_run, run_seed,
                                 top_targets, true_logit)
from rat_tf.attacks.spec import Attack, RunSettings, register


def project_linf_hyperplane(t: tf.Tensor, w: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
    """Per row of t [M, D]: the minimal L-inf step d with t + d in [0, 1]^D onto the
    hyperplane <w, z> = b (as far toward it as the box allows), by the sorted breakpoints of
    the FAB paper and a binary search over them."""
    dim = int(t.shape[-1])
    sign = tf.where(tf.reduce_sum(w * t, 1) - b >= 0, 1.0, -1.0)
    w, b = w * sign[:, None], b * sign
    a = tf.cast(w < 0, t.dtype)
    nonzero = tf.cast(tf.not_equal(w, 0), t.dtype)
    d = (a - t) * nonzero  # the box corner farthest along -w
    p = a - t * (2 * a - 1)
    order = tf.argsort(p, axis=1)
    b = b - tf.reduce_sum(w * t, 1)
    b0 = tf.reduce_sum(w * d, 1)
    desc = tf.reverse(order, [1])
    ws = tf.gather(w, desc, batch_dims=1)
    s = tf.cumsum(tf.abs(ws), axis=1)
    sb = tf.cumsum(-ws * tf.gather(d, desc, batch_dims=1), axis=1) + b0[:, None]
    c_l = b - (sb[:, -1] - s[:, -1] * tf.reduce_min(p, 1)) > 0
    c_2 = (b - b0 > 0) & ~c_l
    lb = tf.zeros_like(b)
    ub = tf.fill(tf.shape(b), float(dim - 1))
    for _ in range(math.ceil(math.log2(dim))):
        mid = tf.floor((lb + ub) / 2)
        j = tf.cast(mid, tf.int32)[:, None]
        cur = tf.gather(order, dim - 1 - j, batch_dims=1)
        b2 = (tf.gather(sb, j, batch_dims=1) - tf.gather(s, j, batch_dims=1)
              * tf.gather(p, cur, batch_dims=1))[:, 0]
        c = b - b2 > 0
        lb, ub = tf.where(c, mid, lb), tf.where(c, ub, mid)
    j = tf.cast(lb, tf.int32)[:, None]
    lam_l = tf.maximum(tf.math.divide_no_nan(b - sb[:, -1], -s[:, -1]), 0.0)[:, None]
    lam_2 = tf.maximum(tf.math.divide_no_nan(b - tf.gather(sb, j, batch_dims=1)[:, 0],
                                             -tf.gather(s, j, batch_dims=1)[:, 0]), 0.0)[:, None]
    d_2 = tf.minimum(lam_2, d) * a + tf.maximum(-lam_2, d) * (1 - a)
    d = tf.where(c_l[:, None], (2 * a - 1) * lam_l, tf.where(c_2[:, None], d_2, d))
    return d * nonzero


def _fab_run(model_fn: ModelFn, x, y, target, todo, eps, steps: int, alpha_max: float,
             eta: float, beta: float, clip, seed, random_start):
    """One targeted FAB run (L-inf): (fooled, x_adv, x, -inf scores); ``fooled`` where an
    adversarial example within ``eps`` was found, ``x_adv`` the smallest one found.

    The box is mapped to [0, 1] for the projection. The loop ends early once every row of
    ``todo`` has one.
    """
    lo, hi = clip
    scale = hi - lo
    shape = tf.shape(x)
    n = shape[0]
    x0 = tf.reshape((tf.cast(x, tf.float32) - lo) / scale, [n, -1])
    eps01 = tf.cast(eps, tf.float32) / scale

    def logits_of(z):
        return tf.cast(model_fn(tf.cast(tf.reshape(z * scale + lo, shape), x.dtype)),
                       tf.float32)

    t = ops.replica_rows(lambda shape: tf.random.stateless_uniform(shape, seed, -1.0, 1.0),
                         tf.shape(x0))
    start = x0 + 0.5 * eps01 * t / (tf.reduce_max(tf.abs(t), 1, keepdims=True) + 1e-12)
    x1 = tf.where(random_start, tf.clip_by_value(start, 0.0, 1.0), x0)

    def body(i, x1, adv, res):
        with tf.GradientTape() as tape:
            tape.watch(x1)
            logits = logits_of(x1)
            df = true_logit(logits, target) - true_logit(logits, y)
            total = tf.reduce_sum(df)
        dg = tape.gradient(total, x1, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        b = -df + tf.reduce_sum(dg * x1, 1)
        d3 = project_linf_hyperplane(tf.concat([x1, x0], 0), tf.concat([dg, dg], 0),
                                      tf.concat([b, b], 0))
        d1, d2 = d3[:n], d3[n:]
        a0 = tf.maximum(tf.reduce_max(tf.abs(d3), 1, keepdims=True), 1e-8)
        a1, a2 = a0[:n], a0[n:]
        alpha = tf.clip_by_value(a1 / (a1 + a2), 0.0, alpha_max)
        x1 = tf.clip_by_value((x1 + eta * d1) * (1 - alpha) + (x0 + eta * d2) * alpha, 0.0, 1.0)
        bad = tf.not_equal(predicted(logits_of(x1)), y)
        dist = tf.reduce_max(tf.abs(x1 - x0), 1)
        closer = bad & (dist < res)
        adv = tf.where(closer[:, None], x1, adv)
        res = tf.where(closer, dist, res)
        x1 = tf.where(bad[:, None], x0 + (x1 - x0) * beta, x1)
        return i + 1, x1, adv, res

    _, _, adv, res = tf.while_loop(
        lambda i, x1, adv, res: (i < steps) & tf.reduce_any(todo & (res > eps01)), body,
        (tf.constant(0), x1, x0, tf.fill([n], np.inf)))
    x_adv = tf.cast(tf.reshape(adv * scale + lo, shape), x.dtype)
    return res <= eps01, x_adv, x, tf.fill([n], -np.inf)


def fab(model_fn: ModelFn, x, y, eps, *, norm: str = "linf", steps: int = 100,
        n_target_classes: int = 9, restarts: int = 1, alpha_max: float = 0.1,
        eta: float = 1.05, beta: float = 0.9, seed: int = 0,
        clip_values=ops.PIXEL_RANGE) -> tf.Tensor:
    """FAB-T, L-inf (Croce & Hein 2020): the targeted fast adaptive boundary attack against
    each of the ``n_target_classes`` top classes other than ``y``.

    Steps toward the linearised decision boundary of the target, biased back toward ``x``
    (``alpha_max``, overshoot ``eta``, backward step ``beta``); restarts after the first
    start at random in the eps/2 ball. Returns the smallest adversarial example found within
    ``eps`` (a run stops once it has one), else ``x`` (gradient stopped).
    """
    steps = check_positive_int(steps, "steps")
    alpha_max = check_fraction(alpha_max, "alpha_max")
    check_fraction(beta, "beta", upper_open=True)
    if not (isinstance(eta, numbers.Real) and eta >= 1):
        raise ValueError(f"eta must be a number >= 1, got {eta!r}")
    model_fn, x, y, _, clip, restarts, seed, logits, todo = prepare_run(
        model_fn, x, y, eps, norm, clip_values, restarts, seed, "fab")
    targets = top_targets(logits, y, check_target_count(logits, n_target_classes))

    def run(r, todo_now):
        return _fab_run(model_fn, x, y, tf.gather(targets, r // restarts, axis=1), todo_now,
                        eps, steps, alpha_max, float(eta), float(beta), clip, run_seed(seed, r),
                        r % restarts > 0)

    return in_graph(lambda: over_runs(run, x, todo, restarts * n_target_classes))


def _run(model_fn: ModelFn, x, y, todo, logits, r, seed, settings: RunSettings) -> tuple:
    """AutoAttack's run ``r`` of FAB-T: against the r-th top class, from x itself."""
    target = tf.gather(top_targets(logits, y, settings.n_target_classes), r, axis=1)
    return _fab_run(model_fn, x, y, target, todo, settings.eps, settings.steps, 0.1, 1.05, 0.9,
                    settings.clip, seed, False)


def _call(model_fn: ModelFn, x, y, eps, settings: RunSettings, seed: int,
          strategy: tf.distribute.Strategy | None = None) -> tf.Tensor:
    """FAB-T with the steps, targets and restarts of ``settings`` on one batch."""
    del strategy  # pure TensorFlow: runs per replica
    return fab(model_fn, x, y, eps, norm=settings.norm, steps=settings.steps,
               n_target_classes=settings.n_target_classes, restarts=settings.restarts,
               seed=seed, clip_values=settings.clip)


def _per_target(settings: RunSettings) -> int:
    """FAB-T runs once per target class."""
    return settings.n_target_classes


register(Attack("fab-t", fab, _call, run=_run, runs=_per_target, passes_per_step=3.0,
                linf_only=True, targeted=True))
