"""Attacks: FGSM, PGD and (targeted) universal perturbations, stateless and tf.function-friendly.

``model_fn`` is a Keras classifier (logits or a final softmax: see
:func:`rat_tf.models.describe`), a trainer wrapping one, or any callable mapping a batch of
images to logits (inside a ``train_step`` pass ``lambda x: model(x, training=False)``). Images
lie in ``clip_values`` ([0, 1] by default; radii are in the same units); labels are integer
class ids (one-hot rows are accepted). Everything after ``(model_fn, x, y, eps)`` is
keyword-only. :func:`fgsm` and
:func:`pgd` are pure TensorFlow (no numpy, no Python side effects): they trace inside
``tf.function``, XLA and replica contexts. The universal searches are Python drivers over
compiled passes with fixed shapes: each pass is one ``tf.function`` that loops over padded,
masked batches of a distributed dataset, so nothing retraces between passes.

Targeted universal perturbations (docs/method.md, section 1) are searched for all targets at
once as one tensor V [K,H,W,C]: every batch of B images is tiled against the K perturbations
(one [K*B] forward pass), and images whose label equals the target are left out of that
target's loss and statistics. Under a ``tf.distribute`` strategy every replica works on its
shard of each global batch and the update sums are all-reduced, so every replica holds the same
V; the search is deterministic for a given seed.

Seeded random starts of :func:`fgsm` and :func:`pgd` called per replica (inside
``strategy.run``) are drawn for the whole global batch and each replica keeps its rows
(:func:`rat_tf.ops.replica_rows`), so they do not depend on how a batch is split. The
evaluation loops (:func:`targeted_success_rate`, :func:`fooling_rate`) run a
:class:`ReplicaStep`: fixed-size global batches, each replica on its slice, the per-image
results put back together in order.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import time
from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from rat_tf import files, models, ops

ModelFn = Callable[[tf.Tensor], tf.Tensor]
TU_METHODS = ("reference", "batched", "sgd")


# ----------------------------------------------------------------------------- helpers
def _xent(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Per-example sparse softmax cross-entropy in float32."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(labels, tf.int32), logits=tf.cast(logits, tf.float32))


def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _labels(model_fn: ModelFn, x: tf.Tensor, y) -> tf.Tensor:
    """Integer labels [N]: ``y`` (class ids, or one-hot rows), or the model's predictions when
    ``y`` is None."""
    if y is None:
        return tf.argmax(model_fn(x), axis=-1, output_type=tf.int32)
    y = tf.convert_to_tensor(y)
    if y.shape.rank == 2 and y.shape[-1] != 1:
        return tf.argmax(y, axis=-1, output_type=tf.int32)
    if y.shape.rank == 2:
        y = y[:, 0]
    if y.shape.rank != 1:
        raise ValueError(f"labels must be integer class ids [N] or one-hot rows [N, K], got "
                         f"shape {y.shape}")
    return tf.cast(y, tf.int32)


def _setup(model_fn, x, norm, eps, step_size, clip_values):
    """The common checks of an attack: (model_fn as x -> logits, x tensor, norm name, range)."""
    norm = ops.check_norm(norm)
    ops.check_radius(eps)
    ops.check_radius(step_size, "step_size")
    clip_values = ops.check_clip_values(clip_values)
    ops.check_box_radius(eps, norm, clip_values)
    ops.check_pixel_range(x, clip_values)
    return models.as_model_fn(model_fn), tf.convert_to_tensor(x), norm, clip_values


def _ascent_grad(model_fn: ModelFn, x_adv: tf.Tensor, y: tf.Tensor, targeted: bool,
                 with_logits: bool = False):
    """Gradient of the attack objective (CE, or -CE toward ``y`` if targeted) w.r.t. ``x_adv``
    (and the logits at ``x_adv`` with ``with_logits``)."""
    with tf.GradientTape() as tape:
        tape.watch(x_adv)
        logits = model_fn(x_adv)
        loss = _xent(y, logits)
        total = -tf.reduce_sum(loss) if targeted else tf.reduce_sum(loss)
    grad = tape.gradient(total, x_adv)
    return (grad, logits) if with_logits else grad


def _objective(model_fn: ModelFn, x_adv: tf.Tensor, y: tf.Tensor, targeted: bool):
    """(success [N] bool, objective [N]) of adversarial examples, for picking the worst case."""
    logits = model_fn(x_adv)
    pred = tf.argmax(logits, axis=-1, output_type=tf.int32)
    loss = _xent(y, logits)
    if targeted:
        return tf.equal(pred, y), -loss
    return tf.not_equal(pred, y), loss


def _bcast(mask: tf.Tensor, rank: int) -> tf.Tensor:
    return tf.reshape(mask, tf.concat([tf.shape(mask), tf.ones([rank - 1], tf.int32)], 0))


# ----------------------------------------------------------------------------- FGSM / PGD
def pgd_step_size(eps, steps: int, step_size=None):
    """``step_size`` if given, else the PGD default 2.5 * eps / steps (Madry et al. 2018)."""
    return 2.5 * eps / steps if step_size is None else step_size


def _start(x: tf.Tensor, eps, norm: str, seed, init: tf.Tensor | None) -> tf.Tensor:
    """A random start in the ball: ``init`` (checked, projected) or a fresh uniform draw; with
    a ``seed``, this replica's rows of the draw for the whole global batch."""
    if init is None:
        if seed is None:
            return ops.random_in_ball(tf.shape(x), eps, norm, None, x.dtype)
        unit = ops.replica_rows(lambda shape: ops.random_in_ball(shape, 1.0, norm, seed),
                                tf.shape(x))
        radius = tf.cast(eps, tf.float32)
        if radius.shape.rank:
            radius = _bcast(radius, x.shape.rank)
        return tf.cast(unit * radius, x.dtype)
    init = tf.convert_to_tensor(init, x.dtype)
    if init.shape.is_fully_defined() and x.shape.is_fully_defined() and init.shape != x.shape:
        raise ValueError(f"init must have the shape of x {x.shape}, got {init.shape}")
    return ops.project(init, eps, norm)


def fgsm(model_fn: ModelFn, x, y, eps, *, norm: str = "linf", targeted: bool = False,
         rand_init: bool = False, seed: int | None = None, step_size=None,
         init: tf.Tensor | None = None, init_scale: float = 1.0, box_start: bool = True,
         project: bool = True, clip_values=ops.PIXEL_RANGE) -> tf.Tensor:
    """Fast gradient (sign) method: one step of size ``eps`` (FGSM-RS with ``rand_init``).

    ``y``: true labels (untargeted; None uses the model's predictions) or targets. With
    ``rand_init`` (Wong et al. 2020) the start is uniform in the ball of radius
    ``init_scale * eps`` (or ``init``, a start perturbation drawn by the caller) and the step
    defaults to 1.25 * eps. The gradient is taken at the start clipped to the pixel box, or
    with ``box_start=False`` at x + start itself (Wong et al.'s MNIST code: clipping gives the
    zero background a one-sided start). The step is projected back to the ``eps`` ball unless
    ``project=False`` (N-FGSM, de Jorge et al. 2022: ``init_scale=2``, step ``eps``). A seeded
    start does not depend on the split over replicas (see module). Returns x_adv in
    ``clip_values`` (gradient stopped).
    """
    model_fn, x, norm, clip = _setup(model_fn, x, norm, eps, step_size, clip_values)
    y = _labels(model_fn, x, y)
    if not init_scale > 0:
        raise ValueError(f"init_scale must be positive, got {init_scale}")
    if step_size is None:
        step_size = 1.25 * eps if rand_init else eps
    delta = (_start(x, eps * init_scale, norm, seed, init) if rand_init else tf.zeros_like(x))
    x0 = ops.apply_perturbation(x, delta, clip) if box_start else x + delta
    g = _ascent_grad(model_fn, x0, y, targeted)
    delta = x0 - x + tf.cast(step_size, x.dtype) * ops.normalized_step(g, norm)
    if project:
        delta = ops.project(delta, eps, norm)
    return tf.stop_gradient(ops.apply_perturbation(x, delta, clip))


def pgd(model_fn: ModelFn, x, y, eps, *, step_size=None, steps: int = 40, norm: str = "linf",
        targeted: bool = False, rand_init: bool = True, restarts: int = 1,
        seed: int | None = None, init: tf.Tensor | None = None, freeze_fooled: bool = False,
        clip_values=ops.PIXEL_RANGE) -> tf.Tensor:
    """Projected gradient descent (Madry et al. 2018), keeping the worst case over restarts.

    With ``freeze_fooled`` an example stops moving once the model gets it wrong (right, if
    targeted), as in Wong et al.'s MNIST PGD training: a model at chance then still trains on
    mildly perturbed images.

    Per example, a restart replaces the current worst case if it succeeds where that one did
    not, or succeeds equally and has a higher loss (lower, toward the target, if targeted).
    ``step_size`` defaults to 2.5 * eps / steps. ``init``: the random start of the first
    restart, drawn by the caller; restart r otherwise starts from a uniform draw seeded by
    (``seed``, r), which does not depend on the split over replicas (see module).
    Returns x_adv in ``clip_values`` (gradient stopped).
    """
    model_fn, x, norm, clip = _setup(model_fn, x, norm, eps, step_size, clip_values)
    steps = _check_positive_int(steps, "steps")
    restarts = _check_positive_int(restarts, "restarts")
    y = _labels(model_fn, x, y)
    step_size = tf.cast(pgd_step_size(eps, steps, step_size), x.dtype)
    rank = x.shape.rank

    def body(i, delta):
        x_adv = ops.apply_perturbation(x, delta, clip)
        g, logits = _ascent_grad(model_fn, x_adv, y, targeted, with_logits=True)
        moved = ops.project(x_adv - x + step_size * ops.normalized_step(g, norm), eps, norm)
        if freeze_fooled:
            hit = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), y)
            moved = tf.where(_bcast(hit if not targeted else ~hit, rank), moved, delta)
        return i + 1, moved

    best_x = best_ok = best_obj = None
    for r in range(restarts):
        if rand_init:
            rseed = None if seed is None else tf.constant([int(seed), r], tf.int64)
            delta = _start(x, eps, norm, rseed, init if r == 0 else None)
        else:
            delta = tf.zeros_like(x)
        _, delta = tf.while_loop(lambda i, d: i < steps, body, [tf.constant(0), delta])
        x_adv = ops.apply_perturbation(x, delta, clip)
        if restarts == 1:
            return tf.stop_gradient(x_adv)
        ok, obj = _objective(model_fn, x_adv, y, targeted)
        if best_x is None:
            best_x, best_ok, best_obj = x_adv, ok, obj
            continue
        better = (ok & ~best_ok) | ((ok == best_ok) & (obj > best_obj))
        best_x = tf.where(_bcast(better, rank), x_adv, best_x)
        best_ok, best_obj = best_ok | ok, tf.where(better, obj, best_obj)
    return tf.stop_gradient(best_x)


# ----------------------------------------------------------------------------- universal search
def _check_model(model_fn: ModelFn, x: np.ndarray, num_classes: int | None = None) -> int:
    """The number of classes K of ``model_fn``; ValueError unless it accepts ``x``-shaped
    images and returns logits [N, K] (with ``num_classes`` K when given)."""
    want = getattr(model_fn, "input_shape", None)
    if isinstance(want, tuple) and len(want) == 4 and tuple(want[1:]) != tuple(x.shape[1:]):
        raise ValueError(f"images/perturbations of shape {tuple(x.shape[1:])} do not match the "
                         f"model input shape {tuple(want[1:])}")
    try:
        logits = model_fn(tf.constant(x[:1]))
    except (ValueError, TypeError, tf.errors.InvalidArgumentError) as e:
        raise ValueError(f"the model does not accept images of shape {x.shape[1:]}: {e}") from e
    if logits.shape.rank != 2 or (num_classes is not None and logits.shape[-1] != num_classes):
        raise ValueError(f"the model must return logits [N, {num_classes or 'K'}], got shape "
                         f"{tuple(logits.shape)}")
    return int(logits.shape[-1])


def _check_images(x, y, clip_values=ops.PIXEL_RANGE) -> tuple[np.ndarray, np.ndarray]:
    """float32 images [N,H,W,C] in ``clip_values`` and int32 labels [N] (one-hot converted)."""
    x = np.asarray(x, np.float32)
    if x.ndim != 4 or len(x) == 0:
        raise ValueError(f"expected a non-empty batch of images [N,H,W,C], got shape {x.shape}")
    ops.check_pixel_range(x, clip_values)
    if y is not None:
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[0] == len(x) and y.shape[1] > 1 and np.all(
                (y == 0) | (y == 1)) and np.all(y.sum(1) == 1):
            y = np.argmax(y, 1)  # one-hot rows
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"expected integer labels of shape [{len(x)}] (or one-hot rows "
                             f"[{len(x)}, K]), got {y.dtype} {y.shape}")
        y = y.astype(np.int32)
    return x, y


def _check_targets(targets, num_classes: int) -> list[int]:
    if targets is None:
        return list(range(num_classes))
    targets = [int(t) for t in np.atleast_1d(targets)]
    if not targets:
        raise ValueError("targets must not be empty")
    bad = [t for t in targets if not 0 <= t < num_classes]
    if bad:
        raise ValueError(f"targets {bad} out of range [0, {num_classes})")
    if len(set(targets)) != len(targets):
        raise ValueError(f"targets must be distinct, got {targets}")
    return sorted(targets)


def _float32_radius(eps: float) -> np.float32:
    """The largest float32 not above ``eps``, so a float32 bound is also exact in float64."""
    e = np.float32(eps)
    return np.nextafter(e, np.float32(0)) if float(e) > eps else e


def enforce_bound(v: np.ndarray, eps: float, norm: str) -> np.ndarray:
    """Make every slice of float32 ``v`` satisfy ||v[i]|| <= eps exactly (float64 check)."""
    v = np.asarray(v, np.float32).copy()
    if norm == "linf":
        e = _float32_radius(eps)
        return np.clip(v, -e, e)
    for i in range(len(v)):
        for _ in range(10):
            n = float(np.sqrt(np.sum(np.square(v[i].astype(np.float64)))))
            if n <= eps:
                break
            v[i] *= np.float32(eps / n * (1 - 1e-6))
    return v


def _padded_dataset(x: np.ndarray, y: np.ndarray, global_batch: int, passes: int,
                    seed: int | None) -> tuple[tf.data.Dataset, int]:
    """(x, y, mask) batches padded to whole global batches (fixed shapes), ``passes`` times.

    With a ``seed`` every pass visits the images in a fresh order drawn from numpy's seeded
    generator (independent of TensorFlow's global seed); without one, in the given order.
    """
    n = len(x)
    npad = -(-n // global_batch) * global_batch
    pad = npad - n
    xs = np.concatenate([x, np.zeros((pad,) + x.shape[1:], np.float32)]) if pad else x
    ys = np.concatenate([y, np.zeros(pad, np.int32)]) if pad else y
    ms = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
    if seed is None:
        ds = tf.data.Dataset.from_tensor_slices((xs, ys, ms)).repeat()
    else:
        rng = np.random.default_rng(seed)
        order = np.concatenate([rng.permutation(npad) for _ in range(passes)]).astype(np.int32)
        arrays = tuple(tf.constant(a) for a in (xs, ys, ms))
        ds = tf.data.Dataset.from_tensor_slices(order).map(
            lambda i: tuple(tf.gather(a, i) for a in arrays))
    ds = ds.batch(global_batch, drop_remainder=True)
    opts = tf.data.Options()
    opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    opts.deterministic = True
    return ds.with_options(opts), npad // global_batch


class UniversalSearch:
    """A compiled, reusable universal-perturbation search for P perturbations at once.

    ``labels[p]`` is the class perturbation p pushes toward (targeted) or, with ``labels=None``,
    the single row (P == 1) pushes every image away from its own label (untargeted). With
    ``sources`` = K (targeted only) there is one row per (source class s, target): an image
    of label s is only perturbed by the rows of its own class, rows ``s * P + p``. Update
    rules: ``sgd`` (projected sign/normalized gradient step on the summed CE) and ``batched``
    (mean of the per-image targeted inner attacks of the not-yet-fooled images; with batch 1
    this is the reference). Build it once and call :meth:`run` many times (RAT's refresh mode
    does): the pass is traced once (the data iterator and the step count are its arguments),
    never again between passes or calls, whatever the size of the search set.
    Success counts for the stop rule come from the forward pass the update already makes (the
    rate of each batch at the V it saw), so a pass costs no extra evaluation; the returned rate
    is measured exactly once at the end.
    """

    def __init__(self, model_fn: ModelFn, image_shape: Sequence[int], labels: list[int] | None,
                 eps: float, norm: str = "linf", method: str = "sgd",
                 step_size: float | None = None, inner_steps: int = 10, batch_size: int = 128,
                 strategy: tf.distribute.Strategy | None = None, jit_compile: bool = False,
                 sources: int = 1, clip_values=ops.PIXEL_RANGE):
        norm = ops.check_norm(norm)
        self.model_fn, self.eps, self.norm, self.method = model_fn, eps, norm, method
        self.clip_values = ops.check_clip_values(clip_values)
        self.strategy = strategy = strategy or tf.distribute.get_strategy()
        self.targeted = labels is not None
        self.num = len(labels) if self.targeted else 1  # rows an image is perturbed with
        if sources > 1 and not self.targeted:
            raise ValueError("per-source perturbations are targeted: pass labels")
        self.sources = int(sources)
        self.rows = self.sources * self.num  # rows of V
        self.shape = tuple(int(d) for d in image_shape)
        self.labels = tf.constant(labels if self.targeted else [0], tf.int32)
        self.step_size = float(_default_step(eps, norm, method) if step_size is None
                               else step_size)
        self.inner_steps = inner_steps
        replicas = strategy.num_replicas_in_sync
        self.global_batch = -(-batch_size // replicas) * replicas
        with strategy.scope():
            self.v = tf.Variable(tf.zeros((self.rows,) + self.shape), trainable=False,
                                 name="universal_perturbations",
                                 synchronization=tf.VariableSynchronization.ON_WRITE,
                                 aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        local = self._local_sgd if method == "sgd" else self._local_batched
        self._local = tf.function(local, jit_compile=True) if jit_compile else local
        self._run_pass = tf.function(self._pass)
        self._run_eval = tf.function(self._eval)

    # -- per-replica pieces -------------------------------------------------------------
    def _row_ids(self, yb):
        """[P,B] the row of V that perturbs image b toward labels[p]."""
        return yb[None] * self.num + tf.range(self.num)[:, None]

    def _tiled(self, v, xb, yb):
        """Perturbed copies clip(x_b + v_p) as [P*B,H,W,C]."""
        vb = v[:, None] if self.sources == 1 else tf.gather(v, self._row_ids(yb))
        xt = ops.apply_perturbation(xb[None], vb, self.clip_values)
        return tf.reshape(xt, (-1,) + self.shape)

    def _per_row(self, values, yb):
        """Sum [P,B,...] per-image values into the rows of V they belong to: [rows,...]."""
        if self.sources == 1:
            return tf.reduce_sum(values, axis=1)
        flat = tf.reshape(values, tf.concat([[-1], tf.shape(values)[2:]], 0))
        return tf.math.unsorted_segment_sum(flat, tf.reshape(self._row_ids(yb), [-1]),
                                            self.rows)

    def _weights(self, yb, mb):
        """[P,B] weights: valid images, minus those whose label is the target (targeted)."""
        w = tf.tile(mb[None], [self.num, 1])
        if self.targeted:
            w *= tf.cast(tf.not_equal(yb[None], self.labels[:, None]), tf.float32)
        return w

    def _row_labels(self, yb):
        if self.targeted:
            return tf.tile(self.labels[:, None], [1, tf.shape(yb)[0]])
        return yb[None]

    def _hits(self, logits, yb, w):
        """[rows] weighted count of images whose perturbed copy succeeds (hits the target /
        flips)."""
        pred = tf.reshape(tf.argmax(logits, -1, output_type=tf.int32), tf.shape(w))
        hit = tf.equal(pred, self._row_labels(yb))
        if not self.targeted:
            hit = ~hit
        return self._per_row(w * tf.cast(hit, tf.float32), yb)

    def _local_sgd(self, v, xb, yb, mb):
        """Summed gradient of the weighted CE w.r.t. V, its weight per row and the hits at V."""
        w = self._weights(yb, mb)
        with tf.GradientTape() as tape:
            tape.watch(v)
            logits = self.model_fn(self._tiled(v, xb, yb))
            ce = tf.reshape(_xent(tf.reshape(self._row_labels(yb), [-1]), logits), tf.shape(w))
            loss = tf.reduce_sum(w * ce)
        weight = self._per_row(w, yb)
        return (tf.convert_to_tensor(tape.gradient(loss, v)), weight, self._hits(logits, yb, w),
                weight)

    def _local_batched(self, v, xb, yb, mb):
        """Summed inner-attack increments of the not-yet-fooled images, their count, the hits
        at V and the weight per row."""
        rows = tf.reshape(self._row_labels(yb), [-1])
        x0 = self._tiled(v, xb, yb)
        w = self._weights(yb, mb)
        pred = tf.argmax(self.model_fn(x0), -1, output_type=tf.int32)
        fooled = tf.cast(pred == rows, tf.float32)
        need = tf.reshape(w, [-1]) * (1.0 - fooled)
        hits = self._per_row(w * tf.reshape(fooled, tf.shape(w)), yb)
        alpha = tf.constant(self.step_size, tf.float32)
        rank = len(self.shape) + 1

        def cond(i, xa, still):
            return (i < self.inner_steps) & tf.reduce_any(still > 0)

        def body(i, xa, still):
            g = _ascent_grad(self.model_fn, xa, rows, targeted=True)
            xa = ops.apply_perturbation(
                xa, alpha * ops.normalized_step(g, self.norm) * _bcast(still, rank),
                self.clip_values)
            p = tf.argmax(self.model_fn(xa), -1, output_type=tf.int32)
            return i + 1, xa, still * tf.cast(p != rows, tf.float32)

        _, xa, _ = tf.while_loop(cond, body, [tf.constant(0), x0, need])
        d = tf.reshape((xa - x0) * _bcast(need, rank), (self.num, -1) + self.shape)
        return (self._per_row(d, yb), self._per_row(tf.reshape(need, [self.num, -1]), yb),
                hits, self._per_row(w, yb))

    def _replica_step(self, batch, active, lr):
        xb, yb, mb = batch
        ctx = tf.distribute.get_replica_context()
        v = tf.convert_to_tensor(self.v)
        total, count, hits, weight = self._local(v, xb, yb, mb)
        total, count = ctx.all_reduce(tf.distribute.ReduceOp.SUM, [total, count])
        if self.method == "sgd":
            direction = ops.normalized_step(total, self.norm)
            new = v + (-lr if self.targeted else lr) * direction
        else:
            new = v + total / _bcast(tf.maximum(count, 1.0), rank=len(self.shape) + 1)
        new = ops.project(new, self.eps, self.norm)
        self.v.assign(tf.where(_bcast(active, len(self.shape) + 1), new, v))
        return hits, weight

    def _sum(self, per_replica):
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def _pass(self, iterator, steps, active, lr):
        """One pass of updates; returns the [P] hits and weights seen along the way."""
        hits, total = tf.zeros([self.rows]), tf.zeros([self.rows])
        for _ in tf.range(steps):
            h, n = self.strategy.run(self._replica_step, args=(next(iterator), active, lr))
            hits += self._sum(h)
            total += self._sum(n)
        return hits, total

    def _replica_eval(self, batch):
        xb, yb, mb = batch
        w = self._weights(yb, mb)
        return (self._hits(self.model_fn(self._tiled(tf.convert_to_tensor(self.v), xb, yb)), yb,
                           w), self._per_row(w, yb))

    def _eval(self, iterator, steps):
        hits, total = tf.zeros([self.rows]), tf.zeros([self.rows])
        for _ in tf.range(steps):
            h, n = self.strategy.run(self._replica_eval, args=(next(iterator),))
            hits += self._sum(h)
            total += self._sum(n)
        return hits / tf.maximum(total, 1.0)

    def _iterator(self, x, y, passes, seed):
        ds, steps = _padded_dataset(x, y, self.global_batch, passes, seed)
        return iter(self.strategy.experimental_distribute_dataset(ds)), tf.constant(steps)

    # -- driver -------------------------------------------------------------------------
    def traces(self) -> int:
        """How many times the pass function was traced (1 = no retracing)."""
        return int(self._run_pass.experimental_get_tracing_count())

    def run(self, x: np.ndarray, y: np.ndarray, *, max_passes: int = 10,
            delta: float | None = 0.2, seed: int = 0, progress: bool = False,
            init: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray, int, list[list[float]]]:
        """Search from V = ``init`` (None: 0; [rows,H,W,C] within the bound) on (x, y) until
        every row reaches 1 - delta or ``max_passes``.

        Returns (V [rows,H,W,C] within the bound, exact final rate [rows] on x (NaN for rows
        no image of x can be pushed by, e.g. source == target), passes, history of the
        per-pass running rates).
        """
        self.v.assign(tf.zeros_like(self.v) if init is None else tf.constant(init, tf.float32))
        train_iter, steps = self._iterator(x, y, max_passes, seed)
        active = np.ones(self.rows, bool)
        stage = "targeted universal search" if self.targeted else "universal search"
        bar = None
        if progress:  # current values (not averages over passes), shown from the start
            print(f"{stage}: {self.rows} perturbations, {len(x)} images, up to {max_passes} "
                  f"passes", flush=True)
            bar = keras.utils.Progbar(max_passes, unit_name="pass",
                                      stateful_metrics=["success", "active rows"])
            bar.update(0)
        history, passes = [], 0
        lr = tf.constant(self.step_size, tf.float32)
        for passes in range(1, max_passes + 1):
            hits, total = self._run_pass(train_iter, steps, tf.constant(active), lr)
            reachable = total.numpy() > 0  # a pass sees every image: same in every pass
            running = hits.numpy() / np.maximum(total.numpy(), 1.0)
            history.append(running.tolist())
            active &= reachable
            if delta is not None:
                active &= running < 1.0 - delta
            mean = float(running[reachable].mean()) if reachable.any() else 0.0
            if bar is not None:
                bar.update(passes, [("success", mean), ("active rows", int(active.sum()))],
                           finalize=passes == max_passes or not active.any())
            logging.info("%s pass %d: running rate %.4f, %d rows active", stage, passes,
                         mean, active.sum())
            if not active.any():
                break
        eval_iter, eval_steps = self._iterator(x, y, 1, None)
        rate = np.where(reachable, self._run_eval(eval_iter, eval_steps).numpy(), np.nan)
        return enforce_bound(self.v.numpy(), self.eps, self.norm), rate, passes, history


def _default_step(eps: float, norm: str, method: str) -> float:
    return eps / 10.0 if method == "sgd" else eps / 5.0


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """The settings of a targeted universal search (see :func:`targeted_universal`)."""

    eps: float
    norm: str = "linf"
    method: str = "sgd"
    max_passes: int = 10
    delta: float = 0.2
    step_size: float | None = None
    batch_size: int = 128
    inner_steps: int = 10
    per_source: bool = False

    def kwargs(self) -> dict:
        """The keyword arguments of :func:`targeted_universal`."""
        return dataclasses.asdict(self)


def targeted_universal(model_fn: ModelFn, x, y, eps: float, *, num_classes: int | None = None,
                       norm: str = "linf", method: str = "sgd",
                       targets: Sequence[int] | None = None, delta: float = 0.2,
                       max_passes: int = 10, step_size: float | None = None,
                       batch_size: int = 128, seed: int = 0,
                       strategy: tf.distribute.Strategy | None = None, progress: bool = False,
                       inner_steps: int = 10, jit_compile: bool = False,
                       cache: dict | None = None, per_source: bool = False,
                       clip_values=ops.PIXEL_RANGE, init=None) -> tuple[np.ndarray, dict]:
    """Search targeted universal perturbations V [K,H,W,C] for all ``targets`` at once.

    ``num_classes`` K defaults to the model's number of outputs (given, it is checked).

    ``per_source=True`` searches one perturbation per (source class s, target t), universal
    over the images of class s: V [K,K,H,W,C] with V[s, t] (zero where s == t), at the cost
    of the per-target search (each image is perturbed by its own class's K rows only).

    Methods: ``sgd`` (default, fast: projected sign-SGD on the mean targeted CE, step
    ``step_size`` = eps/10 by default), ``batched`` (mean of per-image targeted FGSM increments,
    ``inner_steps`` steps of ``step_size`` = eps/5 stopping once the class is t, over the
    not-yet-fooled images of a batch) and ``reference`` (the same rule one image at a time, the
    paper's loop; runs on one device). A target stops once its success during a pass on ``x``
    reaches 1 - delta. Rows of targets not searched are zero. Returns (V float32 numpy, stats)
    with stats ``success_rate`` (list[K], exact on ``x`` at the end; None where not searched),
    ``norm``, ``passes``, ... (per source: ``success_rate`` and ``norm`` per target over all
    sources, ``success_rate_pairs`` and ``norm_pairs`` [K][K]). ``cache``: a dict owned by the
    caller in which the compiled :class:`UniversalSearch` is kept and reused by later calls
    with the same settings (no tracing again, e.g. when V is refreshed every epoch).
    ``init``: the V to start from (the shape of the returned V, projected into the ball;
    None: zero), e.g. the current V of a RAT run, so a refresh continues it.
    """
    if method not in TU_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {TU_METHODS}")
    norm = ops.check_norm(norm)
    ops.check_radius(eps)
    if num_classes is not None:
        num_classes = _check_positive_int(num_classes, "num_classes")
    clip_values = ops.check_clip_values(clip_values)
    ops.check_box_radius(eps, norm, clip_values)
    max_passes = _check_positive_int(max_passes, "max_passes")
    batch_size = _check_positive_int(batch_size, "batch_size")
    inner_steps = _check_positive_int(inner_steps, "inner_steps")
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    if step_size is None:
        step_size = _default_step(eps, norm, method)
    ops.check_radius(step_size, "step_size")
    x, y = _check_images(x, y, clip_values)
    if y is None:
        raise ValueError("targeted_universal needs the labels y of the search images")
    model_fn = models.as_model_fn(model_fn)
    num_classes = _check_model(model_fn, x, num_classes)
    targets = _check_targets(targets, num_classes)
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}), got range [{y.min()}, {y.max()}]")
    strategy = strategy or tf.distribute.get_strategy()
    if method == "reference":
        if strategy.num_replicas_in_sync > 1:
            logging.warning("method 'reference' is sequential (one image at a time): running it "
                            "on the default strategy")
        strategy, batch_size = tf.distribute.get_strategy(), 1
        if strategy.num_replicas_in_sync > 1:
            raise ValueError("method 'reference' is sequential (one image at a time); call it "
                             "outside a multi-replica strategy scope, or use 'batched'")
    start = time.perf_counter()
    sources = num_classes if per_source else 1
    full_shape = ((sources,) if per_source else ()) + (num_classes,) + x.shape[1:]
    if init is not None:
        init = np.asarray(init, np.float32)
        if init.shape != full_shape:
            raise ValueError(f"init must be a V of shape {list(full_shape)} (the search's "
                             f"output), got {list(init.shape)}")
        if not np.all(np.isfinite(init)):
            raise ValueError("init holds NaN or infinite values")
        rows = init.reshape((sources, num_classes) + x.shape[1:])[:, targets]
        init = np.asarray(ops.project(rows.reshape((-1,) + x.shape[1:]), eps, norm))
    key = (getattr(model_fn, "classifier", model_fn), tuple(x.shape[1:]), tuple(targets),
           float(eps), norm, method, float(step_size), inner_steps, batch_size, strategy,
           jit_compile, sources, clip_values)
    search = cache.get(key) if cache is not None else None
    if search is None:
        search = UniversalSearch(model_fn, x.shape[1:], targets, eps, norm, method, step_size,
                                 inner_steps, batch_size, strategy, jit_compile, sources,
                                 clip_values)
        if cache is not None:
            cache.clear()  # keep one compiled search (and its model) alive, not every one
            cache[key] = search
    v, rate, passes, history = search.run(x, y, max_passes=max_passes, delta=delta, seed=seed,
                                          progress=progress, init=init)
    reached = rate[np.isfinite(rate)]
    stats = {"passes": passes, "method": method, "targets": targets, "eps": float(eps),
             "norm_type": norm, "delta": float(delta), "step_size": float(step_size),
             "converged": bool(reached.size and np.all(reached >= 1.0 - delta)),
             "per_source": bool(per_source), "history": history,
             "seconds": time.perf_counter() - start,
             "num_replicas": strategy.num_replicas_in_sync,
             "traces": search.traces()}
    # Row s * T + i of the search is (source s, targets[i]); one source when not per source.
    full = np.zeros((sources, num_classes) + x.shape[1:], np.float32)
    full[:, targets] = v.reshape((sources, len(targets)) + x.shape[1:])
    success = np.full((sources, num_classes), np.nan)
    success[:, targets] = rate.reshape(sources, len(targets))
    norms = np.asarray(ops.batch_norms(full.reshape((-1,) + x.shape[1:]), norm),
                       np.float64).reshape(sources, num_classes)
    if per_source:
        stats["success_rate_pairs"], stats["norm_pairs"] = files.floats(success), norms.tolist()
        # Per target over all sources: each pair's rate weighted by its number of images.
        counts = np.where(np.isfinite(success), np.bincount(y, minlength=num_classes)[:, None], 0)
        with np.errstate(invalid="ignore"):
            success = np.nansum(success * counts, 0, keepdims=True) / counts.sum(0)
        norms = norms.max(0, keepdims=True)
    else:
        full = full[0]
    stats["success_rate"], stats["norm"] = files.floats(success[0]), norms[0].tolist()
    return full, stats


def mean_success_rate(stats: dict) -> float:
    """The mean targeted success rate over the targets of a search's ``stats`` (0 if none)."""
    rates = [r for r in stats["success_rate"] if r is not None]
    return float(np.mean(rates)) if rates else 0.0


def untargeted_universal(model_fn: ModelFn, x, y, eps: float, *, norm: str = "linf",
                         max_passes: int = 5, step_size: float | None = None,
                         batch_size: int = 128, seed: int = 0,
                         strategy: tf.distribute.Strategy | None = None, progress: bool = False,
                         clip_values=ops.PIXEL_RANGE) -> tuple[np.ndarray, dict]:
    """Search one untargeted universal perturbation v [H,W,C] by projected sign-SGD on the CE.

    ``y``: labels whose cross-entropy is raised (None: the model's clean predictions).
    Returns (v, stats) with stats ``fooling_rate`` (on ``x``), ``norm``, ``passes``.
    """
    norm = ops.check_norm(norm)
    ops.check_radius(eps)
    max_passes = _check_positive_int(max_passes, "max_passes")
    batch_size = _check_positive_int(batch_size, "batch_size")
    if step_size is None:
        step_size = _default_step(eps, norm, "sgd")
    ops.check_radius(step_size, "step_size")
    clip_values = ops.check_clip_values(clip_values)
    ops.check_box_radius(eps, norm, clip_values)
    x, y = _check_images(x, y, clip_values)
    model_fn = models.as_model_fn(model_fn)
    _check_model(model_fn, x)
    strategy = strategy or tf.distribute.get_strategy()
    if y is None:
        y = _predict(model_fn, x, 500, strategy)
    start = time.perf_counter()
    search = UniversalSearch(model_fn, x.shape[1:], None, eps, norm, "sgd", step_size, 1,
                             batch_size, strategy, clip_values=clip_values)
    v, _, passes, history = search.run(x, y, max_passes=max_passes, delta=None, seed=seed,
                                       progress=progress)
    v = v[0]
    stats = {"fooling_rate": fooling_rate(model_fn, x, v, clip_values=clip_values,
                                          strategy=strategy), "norm":
             float(ops.batch_norms(v[None], norm)[0]), "passes": passes, "eps": float(eps),
             "norm_type": norm, "history": history, "seconds": time.perf_counter() - start}
    return v, stats


# ----------------------------------------------------------------------------- evaluation
def _batches(n: int, batch: int):
    for i in range(0, n, batch):
        yield i, min(i + batch, n)


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    if len(a) == size:
        return a
    return np.concatenate([a, np.zeros((size - len(a),) + a.shape[1:], a.dtype)])


class ReplicaStep:
    """``fn`` compiled once and run on fixed-size global batches, every replica of
    ``strategy`` (None: the current strategy) on its slice of each batch.

    ``fn(*local_batch, *args)`` maps one replica's slice of the batch arrays, and ``args``
    (the same on every replica), to per-row outputs: a tensor [b, ...] or a tuple of them, of
    bools, integers below 2**24 or floats. Called with a global batch of B rows (B a multiple
    of the R replicas), the step gives replica i rows [i * B/R, (i + 1) * B/R) and returns the
    outputs of the whole batch, in order, as numpy arrays. With R > 1 each replica places its
    rows in a batch of zeros and the batches are summed over the replicas (exact: every row
    has one nonzero term), so under MultiWorkerMirroredStrategy every worker gets the whole
    batch; every worker must then make the same calls on the same arrays.
    """

    def __init__(self, fn: Callable, strategy: tf.distribute.Strategy | None = None):
        self.fn = fn
        self.strategy = strategy or tf.distribute.get_strategy()
        self.replicas = int(self.strategy.num_replicas_in_sync)
        # A partial, not the bound method: TensorFlow keys its retracing warning on the code
        # object, which every step would share; each step traces once.
        self._compiled = tf.function(functools.partial(ReplicaStep._distributed, self))

    def check_batch(self, size: int, what: str = "batch size") -> int:
        """``size``, or ValueError unless it splits evenly over the replicas."""
        return check_split(size, self.strategy, what)

    def _distributed(self, batch: tuple, args: tuple):
        if self.replicas == 1:
            return self.strategy.run(self.fn, args=batch + args)
        dtypes = []  # of fn's outputs, known once traced

        def local(*inputs):
            out = self.fn(*inputs)
            i = tf.distribute.get_replica_context().replica_id_in_sync_group
            placed = []
            for t in tf.nest.flatten(out):
                dtypes.append(t.dtype)
                n = tf.shape(t)[0]
                rows = [[i * n, (self.replicas - 1 - i) * n]] + [[0, 0]] * (t.shape.rank - 1)
                placed.append(tf.pad(t if t.dtype.is_floating else tf.cast(t, tf.float32),
                                     rows))
            return tf.nest.pack_sequence_as(out, placed)

        out = self.strategy.run(local, args=batch + args)
        total = [self.strategy.reduce(tf.distribute.ReduceOp.SUM, t, axis=None)
                 for t in tf.nest.flatten(out)]
        return tf.nest.pack_sequence_as(out, [tf.cast(t, d) for t, d in zip(total, dtypes)])

    def __call__(self, batch: Sequence[np.ndarray], *args):
        """The outputs of ``fn`` for one global batch (arrays of B rows each)."""
        n = self.check_batch(len(batch[0])) // self.replicas

        def shard(a):
            return self.strategy.experimental_distribute_values_from_function(
                lambda ctx: tf.constant(a[ctx.replica_id_in_sync_group * n:
                                          (ctx.replica_id_in_sync_group + 1) * n]))

        out = self._compiled(tuple(shard(np.asarray(a)) for a in batch),
                             tuple(tf.convert_to_tensor(a) for a in args))
        return tf.nest.map_structure(lambda t: t.numpy(), out)

    def map_batches(self, arrays: Sequence[np.ndarray], batch_size: int, *args):
        """The outputs of ``fn`` for every row of ``arrays`` (N rows each), in global batches
        of ``batch_size``, the last one padded with zeros (its padding rows dropped)."""
        self.check_batch(batch_size)
        parts = [tf.nest.map_structure(lambda t, k=j - i: t[:k],
                                       self([_pad(a[i:j], batch_size) for a in arrays], *args))
                 for i, j in _batches(len(arrays[0]), batch_size)]
        if not parts:
            raise ValueError("no rows to run on")
        return tf.nest.map_structure(lambda *t: np.concatenate(t), *parts)


def check_split(size: int, strategy: tf.distribute.Strategy, what: str = "batch size") -> int:
    """``size``, or ValueError unless it is a multiple of the replicas of ``strategy``."""
    replicas = strategy.num_replicas_in_sync
    if size % replicas:
        raise ValueError(f"{what} {size} does not split evenly over the {replicas} replicas of "
                         f"{type(strategy).__name__}: use a multiple of {replicas}")
    return size


def _multiple(size: int, replicas: int) -> int:
    """``size`` rounded up to a multiple of ``replicas``."""
    return -(-size // replicas) * replicas


def _predict(model_fn: ModelFn, x: np.ndarray, batch_size: int,
             strategy: tf.distribute.Strategy | None = None) -> np.ndarray:
    """Predicted classes of ``x`` with one compiled fixed-shape step (the batch size rounded
    up to a multiple of the replicas)."""
    step = ReplicaStep(lambda xb: tf.argmax(model_fn(xb), -1, output_type=tf.int32), strategy)
    return step.map_batches([x], _multiple(batch_size, step.replicas))


def _target_counts(model_fn: ModelFn, xb, yb, vt, tt, *, per_source: bool, clip_values):
    """Per image [B, T]: sent to its target under V (weighted) and its weight (label != t)."""
    # [T,B,H,W,C] per source (V[y_b, t]) or [T,1,H,W,C]
    vb = tf.transpose(tf.gather(vt, yb), [1, 0, 2, 3, 4]) if per_source else vt[:, None]
    xt = ops.apply_perturbation(xb[None], vb, clip_values)
    pred = tf.argmax(model_fn(tf.reshape(xt, (-1,) + tuple(xb.shape[1:]))), -1,
                     output_type=tf.int32)
    pred = tf.reshape(pred, [tf.shape(tt)[0], -1])
    w = tf.cast(tf.not_equal(yb[None], tt[:, None]), tf.float32)
    return (tf.transpose(w * tf.cast(tf.equal(pred, tt[:, None]), tf.float32)),
            tf.transpose(w))


def targeted_success_rate(model_fn: ModelFn, x, y, V, *, targets: Sequence[int] | None = None,
                          batch_size: int = 500, clip_values=ops.PIXEL_RANGE,
                          strategy: tf.distribute.Strategy | None = None,
                          cache: dict | None = None) -> np.ndarray:
    """Per target t: fraction of images with label != t classified t after clip(x + V[t]).

    Per-source V [K,K,H,W,C] (see :func:`targeted_universal`): an image of label s gets
    V[s, t]. ``batch_size`` counts images per forward pass (a batch is tiled against the
    targets; images per batch rounded down to a multiple of the replicas of ``strategy``,
    None: the current strategy). Returns float64 [K]; NaN for targets not evaluated.
    ``cache``: a dict owned by the caller that keeps the compiled step for later calls with
    the same model and shapes (another V is no new trace, e.g. a monitor every epoch).
    """
    clip_values = ops.check_clip_values(clip_values)
    x, y = _check_images(x, y, clip_values)
    if y is None:
        raise ValueError("targeted_success_rate needs the labels y")
    model_fn = models.as_model_fn(model_fn)
    V = np.asarray(V, np.float32)
    k = V.shape[0] if V.ndim else 0
    per_source = V.ndim == 5 and V.shape[1] == k
    if V.ndim not in (4, 5) or V.shape[1 + per_source:] != x.shape[1:] or (
            V.ndim == 5 and not per_source):
        shape = ",".join(map(str, x.shape[1:]))
        raise ValueError(f"perturbations must be [K,{shape}] or per source [K,K,{shape}], got "
                         f"shape {V.shape}")
    targets = _check_targets(targets, k)
    _check_model(model_fn, x, k)
    batch_size = _check_positive_int(batch_size, "batch_size")
    if y.min() < 0 or y.max() >= k:
        raise ValueError(f"labels must be in [0, {k}), got range [{y.min()}, {y.max()}]")
    vt = V[:, targets] if per_source else V[targets]
    tt = np.asarray(targets, np.int32)
    strategy = strategy or tf.distribute.get_strategy()
    key = ("targeted_success_rate", getattr(model_fn, "classifier", model_fn),
           tuple(x.shape[1:]), per_source, len(targets), clip_values, strategy)
    step = cache.get(key) if cache is not None else None
    if step is None:
        step = ReplicaStep(functools.partial(_target_counts, model_fn, per_source=per_source,
                                             clip_values=clip_values), strategy)
        if cache is not None:
            cache.clear()  # keep one compiled step (and its model) alive
            cache[key] = step
    b = max(1, batch_size // len(targets) // step.replicas) * step.replicas
    hits, total = step.map_batches([x, y], b, vt, tt)
    out = np.full(k, np.nan)
    out[targets] = hits.sum(0, dtype=np.float64) / np.maximum(total.sum(0, dtype=np.float64),
                                                              1.0)
    return out


def fooling_rate(model_fn: ModelFn, x, v, *, batch_size: int = 500,
                 clip_values=ops.PIXEL_RANGE,
                 strategy: tf.distribute.Strategy | None = None) -> float:
    """Fraction of images whose predicted class changes under clip(x + v).

    Each batch (``batch_size`` rounded up to a multiple of the replicas) is split over the
    replicas of ``strategy`` (None: the current strategy).
    """
    clip_values = ops.check_clip_values(clip_values)
    x, _ = _check_images(x, None, clip_values)
    model_fn = models.as_model_fn(model_fn)
    v = np.asarray(v, np.float32)
    if v.shape != x.shape[1:]:
        raise ValueError(f"perturbation shape {v.shape} does not match images {x.shape[1:]}")
    batch_size = _check_positive_int(batch_size, "batch_size")
    clean = _predict(model_fn, x, batch_size, strategy)
    adv = _predict(model_fn, np.asarray(ops.apply_perturbation(x, v, clip_values)), batch_size,
                   strategy)
    return float(np.mean(clean != adv))


# ----------------------------------------------------------------------------- files
__all__ = ["fgsm", "pgd", "pgd_step_size", "UniversalSearch", "targeted_universal",
           "untargeted_universal", "targeted_success_rate", "fooling_rate", "ReplicaStep",
           "check_split", "enforce_bound", "mean_success_rate", "SearchSettings", "TU_METHODS"]
