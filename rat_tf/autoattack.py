"""AutoAttack in TensorFlow: APGD, APGD-T, FAB-T and Square, and the standard ensemble.

The parameter-free attack suite of Croce & Hein (ICML 2020) for measuring robust accuracy:

- :func:`apgd`: Auto-PGD on the cross-entropy or the DLR loss, and APGD-T (``targeted=True``)
  on the targeted DLR loss against each of the top classes other than the true one. The step
  size starts at 2 eps and is halved at checkpoints (after 22%, then ever shorter intervals
  of at least 6% of the steps) where too few steps raised the loss, or where the step was not
  halved at the last checkpoint and the best loss did not grow since; a halving restarts from
  the best point. Momentum 0.75.
- :func:`fab`: FAB-T, the targeted fast adaptive boundary attack (minimal L-inf norm).
- :func:`square`: Square Attack (Andriushchenko et al. 2020), gradient-free random search on
  the margin loss, with the schedule of square sizes of the reference implementation.
- :func:`autoattack`: the standard sequence APGD-CE, APGD-T, FAB-T, Square, each attack run
  only on the images no earlier one broke; returns the per-image robust mask, the worst-case
  images and which attack broke each image.

``model_fn``, images, labels and radii follow :mod:`rat_tf.attacks` (images in
``clip_values``, integer labels, everything after ``(model_fn, x, y, eps)`` keyword-only).
:func:`apgd`, :func:`fab` and :func:`square` are pure TensorFlow: they trace inside
``tf.function``, loop with ``tf.while_loop`` over per-example state and draw their random
numbers from stateless generators, so a seed fixes the result. Within one call every run
(restart or target) works on all images, and each image keeps the first adversarial example
found, else the point of highest loss (lowest margin for Square). Images the model already
misclassifies are returned unchanged. Loops stop early once every image is fooled, which
changes no result. :func:`autoattack` is a Python driver over one compiled function per attack
with fixed, padded batch shapes, so nothing retraces between batches or runs; each batch is
split over the replicas of a ``tf.distribute`` strategy. Random numbers are drawn for the
whole batch and every replica keeps its rows (:func:`rat_tf.ops.replica_rows`), so results do
not depend on the split.

Where this differs from the reference implementation (fra31/auto-attack): the
first interval's count of loss increases starts from the loss at the random start (the
reference compares the first step with a zero), a run keeps its first adversarial iterate
rather than its last, and Square draws the position and signs of its square per image
rather than once per batch, as in the Square Attack paper's own code.
"""

from __future__ import annotations

import math
import numbers
import time
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from rat_tf import models, ops
from rat_tf.attacks import (ModelFn, ReplicaStep, _bcast, _check_images, _check_model,
                            _check_positive_int, _labels, _multiple, _pad, _predict, _setup,
                            _xent, check_split)

LOSSES = ("ce", "dlr")
ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")
VERSIONS = {"standard": ("apgd-ce", "apgd-t", "fab-t", "square")}
_SQUARE_THRESHOLDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # p halves past each


# ----------------------------------------------------------------------------- checks
def _check_loss(loss) -> str:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
    return loss


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return int(seed)


def _check_fraction(value, name: str, upper_open: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and 0 < value and (value < 1 if upper_open
                                                            else value <= 1)
    if not ok:
        raise ValueError(f"{name} must be in (0, 1{')' if upper_open else ']'}, got {value!r}")
    return float(value)


def _check_linf(norm, attack: str) -> str:
    norm = ops.check_norm(norm)
    if norm != "linf":
        raise ValueError(f"{attack} supports norm 'linf' only, got {norm!r}")
    return norm


def _check_images_4d(x: tf.Tensor, attack: str) -> None:
    if x.shape.rank != 4 or not x.shape[1:].is_fully_defined():
        raise ValueError(f"{attack} needs images [N, H, W, C] of known H, W, C, got shape "
                         f"{x.shape}")


def _check_classes(logits: tf.Tensor, need: int, what: str) -> None:
    k = logits.shape[-1]
    if k is not None and k < need:
        raise ValueError(f"{what} needs a classifier of at least {need} classes, got {k}")


def _check_targets(logits: tf.Tensor, n_target_classes) -> int:
    n = _check_positive_int(n_target_classes, "n_target_classes")
    k = logits.shape[-1]
    if k is not None and n > k - 1:
        raise ValueError(f"n_target_classes {n} must be at most the number of classes - 1 "
                         f"({k - 1})")
    return n


# ----------------------------------------------------------------------------- shared pieces
def _seed(seed, *salts) -> tf.Tensor:
    """A stateless-RNG seed [2] from ``seed`` (an integer or a seed [2]) and int tensors
    folded in."""
    s = tf.constant([seed, 0], tf.int64) if isinstance(seed, int) else seed
    for salt in salts:
        s = tf.random.experimental.stateless_fold_in(s, tf.cast(salt, tf.int64))
    return s


def _pred(logits: tf.Tensor) -> tf.Tensor:
    return tf.argmax(logits, axis=-1, output_type=tf.int32)


def _true_logit(logits: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    return tf.gather(logits, y, axis=1, batch_dims=1)


def _best_other(logits: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """max_{i != y} z_i per example."""
    k = tf.shape(logits)[-1]
    masked = tf.where(tf.one_hot(y, k, on_value=True, off_value=False), -np.inf, logits)
    return tf.reduce_max(masked, axis=-1)


def _targets(logits: tf.Tensor, y: tf.Tensor, n: int) -> tf.Tensor:
    """[N, n]: per example the n classes other than ``y`` of highest logit, best first."""
    k = tf.shape(logits)[-1]
    masked = tf.where(tf.one_hot(y, k, on_value=True, off_value=False), -np.inf, logits)
    return tf.math.top_k(masked, n).indices


def _loss(logits: tf.Tensor, y: tf.Tensor, loss: str, target: tf.Tensor | None) -> tf.Tensor:
    """Per-example objective APGD maximises: CE / DLR (untargeted), -CE(target) / targeted
    DLR -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) with ``target``."""
    logits = tf.cast(logits, tf.float32)
    if loss == "ce":
        return _xent(y, logits) if target is None else -_xent(target, logits)
    z_y = _true_logit(logits, y)
    top = tf.math.top_k(logits, 3 if target is None else 4).values
    if target is None:
        return -(z_y - _best_other(logits, y)) / (top[:, 0] - top[:, 2] + 1e-12)
    return -(z_y - _true_logit(logits, target)) / (
        top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def _margin(model_fn: ModelFn, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    """z_y - max_{i != y} z_i: <= 0 means misclassified."""
    logits = tf.cast(model_fn(x), tf.float32)
    return _true_logit(logits, y) - _best_other(logits, y)


def _over_runs(run, x: tf.Tensor, todo: tf.Tensor, n_runs: int) -> tf.Tensor:
    """Worst case per example over ``run(r, todo_now)`` -> (fooled, x_found, x_best, score),
    r = 0..n_runs-1: the first adversarial example found, else the highest-score point.

    Runs stop once every row of ``todo`` is fooled; rows outside ``todo`` come back as ``x``.
    """
    rank = x.shape.rank

    def body(r, fooled, x_found, x_hi, s_hi):
        f, xf, xb, s = run(r, todo & ~fooled)
        new = f & ~fooled
        higher = s > s_hi
        return (r + 1, fooled | f, tf.where(_bcast(new, rank), xf, x_found),
                tf.where(_bcast(higher, rank), xb, x_hi), tf.where(higher, s, s_hi))

    n = tf.shape(x)[0]
    init = (tf.constant(0), tf.zeros([n], tf.bool), x, x, tf.fill([n], -np.inf))
    _, fooled, x_found, x_hi, _ = tf.while_loop(
        lambda r, f, *_: (r < n_runs) & tf.reduce_any(todo & ~f), body, init)
    out = tf.where(_bcast(fooled, rank), x_found, x_hi)
    return tf.stop_gradient(tf.where(_bcast(todo, rank), out, x))


def _in_graph(fn):
    """``fn()`` traced as one graph when called eagerly (no per-op dispatch in the loops)."""
    return tf.function(fn)() if tf.executing_eagerly() else fn()


def _clean(model_fn: ModelFn, x: tf.Tensor, y: tf.Tensor):
    """(clean logits, correctly classified [N])."""
    logits = tf.cast(model_fn(x), tf.float32)
    return logits, tf.equal(_pred(logits), y)


def _prepare(model_fn, x, y, eps, norm, clip_values, restarts, seed, attack: str):
    """The checks of an attack call: (model_fn, x, y, clip, restarts, seed, clean logits,
    correctly classified); ``attack`` names the attack if it is L-inf only, else None."""
    model_fn, x, norm, clip = _setup(model_fn, x, norm, eps, None, clip_values)
    if attack is not None:
        _check_linf(norm, attack)
    restarts = _check_positive_int(restarts, "restarts")
    seed = _check_seed(seed)
    y = _labels(model_fn, x, y)
    return (model_fn, x, y, norm, clip, restarts, seed) + _clean(model_fn, x, y)


# ----------------------------------------------------------------------------- APGD
def _apgd_run(model_fn: ModelFn, x, y, target, todo, eps, norm: str, loss: str, steps: int,
              rho: float, clip, seed):
    """One APGD run from a random start on the sphere: (fooled, x_found, x_best, loss_best).

    ``x_found`` is the first misclassified iterate (where ``fooled``), ``x_best`` the iterate
    of highest loss. The loop ends early once no row of ``todo`` is left unfooled.
    """
    rank = x.shape.rank
    eps = tf.cast(eps, x.dtype)
    k_first, k_min, k_decr = (max(int(f * steps), 1) for f in (0.22, 0.06, 0.03))

    def evaluate(x_adv):
        with tf.GradientTape() as tape:
            tape.watch(x_adv)
            logits = model_fn(x_adv)
            obj = _loss(logits, y, loss, target)
            total = tf.reduce_sum(obj)
        grad = tape.gradient(total, x_adv,
                             unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return obj, grad, tf.not_equal(_pred(logits), y)

    def move(x_adv, d):  # x_adv + d projected onto the ball around x and the pixel box
        return ops.apply_perturbation(x, ops.project(x_adv + d - x, eps, norm), clip)

    if norm == "linf":
        t = ops.replica_rows(
            lambda shape: tf.random.stateless_uniform(shape, seed, -1.0, 1.0, x.dtype),
            tf.shape(x))
    else:
        t = ops.replica_rows(lambda shape: tf.random.stateless_normal(shape, seed, dtype=x.dtype),
                             tf.shape(x))
    t = t / _bcast(tf.cast(ops.batch_norms(t, norm), x.dtype) + 1e-12, rank)
    x0 = ops.apply_perturbation(x, eps * t, clip)
    obj0, grad0, fooled0 = evaluate(x0)
    n = tf.shape(x)[0]
    # i, steps since the checkpoint, checkpoint interval k, x_adv, x_old, grad, x_best,
    # grad_best, loss_best, loss_prev, increases, loss_best at checkpoint, halved at
    # checkpoint, step size, fooled, x_found
    state = (tf.constant(0), tf.constant(0), tf.constant(k_first), x0, x0, grad0, x0, grad0,
             obj0, obj0, tf.zeros([n]), obj0, tf.ones([n], tf.bool),
             tf.fill([n], 2.0) * tf.cast(eps, tf.float32), fooled0, x0)

    def body(i, since, k, x_adv, x_old, grad, x_best, grad_best, loss_best, loss_prev, incr,
             best_check, halved_check, step, fooled, x_found):
        a = tf.where(i > 0, 0.75, 1.0)
        z = move(x_adv, _bcast(tf.cast(step, x.dtype), rank) * ops.normalized_step(grad, norm))
        x_new = move(x_adv, tf.cast(a, x.dtype) * (z - x_adv)
                     + tf.cast(1.0 - a, x.dtype) * (x_adv - x_old))
        obj, g, bad = evaluate(x_new)
        x_found = tf.where(_bcast(bad & ~fooled, rank), x_new, x_found)
        fooled = fooled | bad
        up = obj > loss_best
        x_best = tf.where(_bcast(up, rank), x_new, x_best)
        grad_best = tf.where(_bcast(up, rank), g, grad_best)
        loss_best = tf.where(up, obj, loss_best)
        incr = incr + tf.cast(obj > loss_prev, tf.float32)
        since = since + 1
        check = tf.equal(since, k)
        halve = check & ((incr <= tf.cast(k, tf.float32) * rho)  # too few increases
                         | (~halved_check & (best_check >= loss_best)))  # or a stall
        step = tf.where(halve, step / 2.0, step)
        x_next = tf.where(_bcast(halve, rank), x_best, x_new)
        g_next = tf.where(_bcast(halve, rank), grad_best, g)
        halved_check = tf.where(check, halve, halved_check)
        best_check = tf.where(check, loss_best, best_check)
        incr = tf.where(check, tf.zeros_like(incr), incr)
        k = tf.where(check, tf.maximum(k - k_decr, k_min), k)
        since = tf.where(check, 0, since)
        return (i + 1, since, k, x_next, x_adv, g_next, x_best, grad_best, loss_best, obj, incr,
                best_check, halved_check, step, fooled, x_found)

    out = tf.while_loop(lambda i, *s: (i < steps) & tf.reduce_any(todo & ~s[-2]), body, state)
    return out[-2], out[-1], out[6], out[8]


def apgd(model_fn: ModelFn, x, y, eps, *, norm: str = "linf", loss: str | None = None,
         targeted: bool = False, steps: int = 100, restarts: int = 1,
         n_target_classes: int = 9, seed: int = 0, rho: float = 0.75,
         clip_values=ops.PIXEL_RANGE) -> tf.Tensor:
    """Auto-PGD (Croce & Hein 2020); ``targeted=True`` is APGD-T, run against each of the
    ``n_target_classes`` top classes other than the true label ``y`` (``restarts`` runs each).

    ``y``: true labels (None: the model's predictions). ``loss``: "ce" or "dlr"; None is the
    suite's choice, "ce" untargeted and "dlr" (targeted DLR) for APGD-T; targeted "ce" is
    -CE toward the target. Returns x_adv (gradient stopped).
    """
    loss = _check_loss(("dlr" if targeted else "ce") if loss is None else loss)
    steps = _check_positive_int(steps, "steps")
    rho = _check_fraction(rho, "rho")
    model_fn, x, y, norm, clip, restarts, seed, logits, todo = _prepare(
        model_fn, x, y, eps, norm, clip_values, restarts, seed, None)
    if loss == "dlr":
        _check_classes(logits, 4 if targeted else 3, "the targeted DLR loss" if targeted
                       else "the DLR loss")
    targets = None
    if targeted:
        targets = _targets(logits, y, _check_targets(logits, n_target_classes))

    def run(r, todo_now):
        target = None if targets is None else tf.gather(targets, r // restarts, axis=1)
        return _apgd_run(model_fn, x, y, target, todo_now, eps, norm, loss, steps, rho, clip,
                         _seed(seed, r))

    n_runs = restarts * (n_target_classes if targeted else 1)
    return _in_graph(lambda: _over_runs(run, x, todo, n_runs))


# ----------------------------------------------------------------------------- Square
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
        u = ops.replica_rows(lambda shape: tf.random.stateless_uniform(shape, _seed(seed, i)),
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
        return (i + 1, tf.where(_bcast(better, 4), x_new, x_best), tf.where(better, m, margin))

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
    n_queries = _check_positive_int(n_queries, "n_queries")
    p_init = _check_fraction(p_init, "p_init")
    model_fn, x, y, _, clip, restarts, seed, _, todo = _prepare(
        model_fn, x, y, eps, norm, clip_values, restarts, seed, "square")
    _check_images_4d(x, "square")

    def run(r, todo_now):
        return _square_run(model_fn, x, y, todo_now, eps, n_queries, p_init,
                           bool(rescale_schedule), clip, _seed(seed, r))

    return _in_graph(lambda: _over_runs(run, x, todo, restarts))


# ----------------------------------------------------------------------------- FAB-T
def _project_linf_hyperplane(t: tf.Tensor, w: tf.Tensor, b: tf.Tensor) -> tf.Tensor:
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
            df = _true_logit(logits, target) - _true_logit(logits, y)
            total = tf.reduce_sum(df)
        dg = tape.gradient(total, x1, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        b = -df + tf.reduce_sum(dg * x1, 1)
        d3 = _project_linf_hyperplane(tf.concat([x1, x0], 0), tf.concat([dg, dg], 0),
                                      tf.concat([b, b], 0))
        d1, d2 = d3[:n], d3[n:]
        a0 = tf.maximum(tf.reduce_max(tf.abs(d3), 1, keepdims=True), 1e-8)
        a1, a2 = a0[:n], a0[n:]
        alpha = tf.clip_by_value(a1 / (a1 + a2), 0.0, alpha_max)
        x1 = tf.clip_by_value((x1 + eta * d1) * (1 - alpha) + (x0 + eta * d2) * alpha, 0.0, 1.0)
        bad = tf.not_equal(_pred(logits_of(x1)), y)
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
    steps = _check_positive_int(steps, "steps")
    alpha_max = _check_fraction(alpha_max, "alpha_max")
    _check_fraction(beta, "beta", upper_open=True)
    if not (isinstance(eta, numbers.Real) and eta >= 1):
        raise ValueError(f"eta must be a number >= 1, got {eta!r}")
    model_fn, x, y, _, clip, restarts, seed, logits, todo = _prepare(
        model_fn, x, y, eps, norm, clip_values, restarts, seed, "fab")
    targets = _targets(logits, y, _check_targets(logits, n_target_classes))

    def run(r, todo_now):
        return _fab_run(model_fn, x, y, tf.gather(targets, r // restarts, axis=1), todo_now,
                        eps, steps, alpha_max, float(eta), float(beta), clip, _seed(seed, r),
                        r % restarts > 0)

    return _in_graph(lambda: _over_runs(run, x, todo, restarts * n_target_classes))


# ----------------------------------------------------------------------------- AutoAttack
def _batch_attack(name: str, model_fn: ModelFn, eps, norm: str, clip, seed: int, steps: int,
                  n_queries: int, n_target_classes: int, p_init: float, rho: float,
                  strategy: tf.distribute.Strategy | None) -> ReplicaStep:
    """One compiled run of attack ``name`` on a fixed-size global batch split over the
    replicas: ([xb, yb, valid], run, batch) -> (x_out, broken)."""

    def attack(xb, yb, valid, r, batch):
        s = _seed(seed, r, batch)
        logits, correct = _clean(model_fn, xb, yb)
        todo = valid & correct
        if name in ("apgd-t", "fab-t"):
            target = tf.gather(_targets(logits, yb, n_target_classes), r, axis=1)
        if name in ("apgd-ce", "apgd-dlr", "apgd-t"):
            loss = "ce" if name == "apgd-ce" else "dlr"
            res = _apgd_run(model_fn, xb, yb, target if name == "apgd-t" else None, todo, eps,
                            norm, loss, steps, rho, clip, s)
        elif name == "fab-t":
            res = _fab_run(model_fn, xb, yb, target, todo, eps, steps, 0.1, 1.05, 0.9, clip, s,
                           False)
        else:
            res = _square_run(model_fn, xb, yb, todo, eps, n_queries, p_init, False, clip, s)
        fooled, x_found, x_best, _ = res
        rank = xb.shape.rank
        out = tf.where(_bcast(todo, rank), tf.where(_bcast(fooled, rank), x_found, x_best), xb)
        return out, todo & tf.not_equal(_pred(model_fn(out)), yb)

    return ReplicaStep(attack, strategy)


def _bucket(n: int, b: int, replicas: int) -> int:
    """The padded batch for the last ``n`` images still robust: ``b``, or b/2, b/4, ...
    (multiples of ``replicas``, at least ``_MIN_BUCKET``) while they hold ``n``: a few shapes to
    compile, and the work of an attack follows the images left (at most twice their number)
    instead of the whole batch. Each row's random draws and iterates do not depend on the
    batch size, nor do the results."""
    size = b
    while size // 2 >= _MIN_BUCKET:
        smaller = _multiple(size // 2, replicas)
        if smaller >= size or smaller < n:
            break
        size = smaller
    return size


_MIN_BUCKET = 16  # below this a batch is cheaper to pad than to compile again
_MIN_EFFECTIVE = 64  # below this many images a step costs about the same on a CPU
_PASSES_PER_STEP = {"apgd-ce": 2.0, "apgd-dlr": 2.0, "apgd-t": 2.0, "fab-t": 3.0, "square": 1.0}


def _run_cost(name: str, n: int, steps: int, n_queries: int) -> float:
    """Rough cost of one run of attack ``name`` on one batch of ``n`` padded images, in
    forward passes of one image (a backward pass counts as one)."""
    iterations = n_queries if name == "square" else steps
    return _PASSES_PER_STEP[name] * iterations * max(n, _MIN_EFFECTIVE)


def _batches_cost(name: str, n: int, b: int, replicas: int, steps: int,
                  n_queries: int) -> float:
    """Rough cost of one run of attack ``name`` on ``n`` images in batches of at most ``b``."""
    full, rest = divmod(n, b)
    cost = full * _run_cost(name, b, steps, n_queries)
    return cost + (_run_cost(name, _bucket(rest, b, replicas), steps, n_queries) if rest else 0.0)


def _runs(name: str, restarts: int, n_target_classes: int) -> int:
    """How many runs :func:`autoattack` makes of attack ``name``."""
    return {"apgd-ce": restarts, "apgd-dlr": restarts, "apgd-t": n_target_classes,
            "fab-t": n_target_classes}.get(name, 1)


def attack_cost(name: str, n: int, *, steps: int = 100, n_queries: int = 5000,
                n_target_classes: int = 9, restarts: int = 1, batch_size: int = 500,
                replicas: int = 1) -> float:
    """Rough cost of :func:`autoattack`'s attack ``name`` on ``n`` images, in forward passes
    of one image (a backward pass counts as one): the weight a progress bar gives it."""
    return _runs(name, restarts, n_target_classes) * _batches_cost(
        name, max(0, n), _multiple(batch_size, replicas), replicas, steps, n_queries)


def check_attacks(attacks: Sequence[str] | str | None, version: str, norm: str) -> list[str]:
    """The attack names of ``attacks`` (None: the version's sequence), checked for ``norm``."""
    if version not in VERSIONS:
        raise ValueError(f"unknown version {version!r}; choose one of {sorted(VERSIONS)}")
    names = list(VERSIONS[version] if attacks is None else
                 ([attacks] if isinstance(attacks, str) else attacks))
    for name in names:
        if name not in ATTACKS:
            raise ValueError(f"unknown attack {name!r}; choose from {ATTACKS}")
    if len(set(names)) != len(names) or not names:
        raise ValueError(f"attacks must name each attack at most once, got {names}")
    linf_only = [a for a in names if a in ("fab-t", "square")]
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
    FAB-T, Square) in order, each only on the images no earlier attack broke.

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
    steps = _check_positive_int(steps, "steps")
    n_queries = _check_positive_int(n_queries, "n_queries")
    restarts = _check_positive_int(restarts, "restarts")
    batch_size = _check_positive_int(batch_size, "batch_size")
    p_init = _check_fraction(p_init, "p_init")
    rho = _check_fraction(rho, "rho")
    seed = _check_seed(seed)
    x, y = _check_images(x, y, clip)
    model_fn = models.as_model_fn(model_fn)
    num_classes = _check_model(model_fn, x)
    probe = tf.zeros([1, num_classes])
    if any(a in names for a in ("apgd-t", "fab-t")):
        n_target_classes = _check_targets(probe, n_target_classes)
    if "apgd-dlr" in names or "apgd-t" in names:
        _check_classes(probe, 4 if "apgd-t" in names else 3, "the DLR loss of apgd-dlr/apgd-t")
    strategy = strategy or tf.distribute.get_strategy()
    n = len(x)
    b = check_split(min(batch_size, _multiple(n, strategy.num_replicas_in_sync)), strategy,
                    "batch_size")
    pred = _predict(model_fn, x, batch_size, strategy)
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
            kw = dict(steps=steps, n_queries=n_queries, n_target_classes=n_target_classes,
                      restarts=restarts, batch_size=b, replicas=replicas)
            runs_left = _runs(names[index], restarts, n_target_classes) - run - 1
            later = runs_left * _batches_cost(names[index], left, b, replicas, steps, n_queries)
            later += sum(attack_cost(a, left, **kw) for a in names[index + 1:])
            progress(done, done + batches_left + later)

    for index, name in enumerate(names):
        start = time.perf_counter()
        fn = _batch_attack(name, model_fn, eps, norm, clip, seed, steps, n_queries,
                           n_target_classes, p_init, rho, strategy)
        for r in range(_runs(name, restarts, n_target_classes)):
            todo = np.flatnonzero(robust)
            for k, i in enumerate(range(0, len(todo), b)):
                ids = todo[i:i + b]
                size = _bucket(len(ids), b, replicas)
                out, broken = fn([_pad(x[ids], size), _pad(y[ids], size),
                                  np.arange(size) < len(ids)], np.int32(r), np.int32(k))
                out, broken = out[:len(ids)], broken[:len(ids)]
                keep = slice(None) if first else broken
                x_adv[ids[keep]] = out[keep]
                robust[ids[broken]] = False
                for j in ids[broken]:
                    broken_by[j] = name
                done += _run_cost(name, size, steps, n_queries)
                report(index, r, _batches_cost(name, max(0, len(todo) - i - b), b, replicas,
                                               steps, n_queries))
            first = False
        accuracy[name] = float(robust.mean())
        seconds[name] = time.perf_counter() - start
        logging.info("robust accuracy after %s: %.2f%% (%.1f s)", name, 100 * accuracy[name],
                     seconds[name])
    return {"robust": robust, "x_adv": x_adv, "robust_accuracy": accuracy,
            "broken_by": broken_by, "seconds": seconds}


__all__ = ["apgd", "fab", "square", "autoattack", "attack_cost", "ATTACKS", "LOSSES",
           "VERSIONS"]
