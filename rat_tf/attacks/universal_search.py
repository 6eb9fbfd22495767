"""The engine of the universal perturbation searches: :class:`UniversalSearch`, a compiled,
reusable search of P perturbations at once over padded, masked batches of a distributed
dataset (see :mod:`rat_tf.attacks.universal` for the functions that run it).
"""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from rat_tf import ops
from rat_tf.attacks.core import ModelFn, ascent_grad, bcast, xent


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
        self.step_size = float(default_step(eps, norm, method) if step_size is None
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
            ce = tf.reshape(xent(tf.reshape(self._row_labels(yb), [-1]), logits), tf.shape(w))
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
            g = ascent_grad(self.model_fn, xa, rows, targeted=True)
            xa = ops.apply_perturbation(
                xa, alpha * ops.normalized_step(g, self.norm) * bcast(still, rank),
                self.clip_values)
            p = tf.argmax(self.model_fn(xa), -1, output_type=tf.int32)
            return i + 1, xa, still * tf.cast(p != rows, tf.float32)

        _, xa, _ = tf.while_loop(cond, body, [tf.constant(0), x0, need])
        d = tf.reshape((xa - x0) * bcast(need, rank), (self.num, -1) + self.shape)
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
            new = v + total / bcast(tf.maximum(count, 1.0), rank=len(self.shape) + 1)
        new = ops.project(new, self.eps, self.norm)
        self.v.assign(tf.where(bcast(active, len(self.shape) + 1), new, v))
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


def default_step(eps: float, norm: str, method: str) -> float:
    """The default step size of a universal search by ``method``."""
    return eps / 10.0 if method == "sgd" else eps / 5.0
