"""What the attacks share: checks of their arguments, labels, gradient steps, random starts,
and :class:`ReplicaStep`, a function compiled once and run on fixed-size global batches split
over the replicas of a ``tf.distribute`` strategy.
"""

from __future__ import annotations

import functools
import numbers
from typing import Callable, Sequence

import numpy as np
import tensorflow as tf

from rat_tf import models, ops

ModelFn = Callable[[tf.Tensor], tf.Tensor]


# ----------------------------------------------------------------------------- checks
def check_positive_int(value, name: str) -> int:
    """``value`` as an int, or ValueError naming ``name`` unless it is a positive integer."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_seed(seed) -> int:
    """``seed`` as an int, or ValueError unless it is an integer."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    return int(seed)


def check_fraction(value, name: str, upper_open: bool = False) -> float:
    """``value`` as a float in (0, 1] ((0, 1) if ``upper_open``), else ValueError."""
    ok = isinstance(value, numbers.Real) and 0 < value and (value < 1 if upper_open
                                                            else value <= 1)
    if not ok:
        raise ValueError(f"{name} must be in (0, 1{')' if upper_open else ']'}, got {value!r}")
    return float(value)


def check_linf(norm, attack: str) -> str:
    """``norm`` checked, or ValueError unless it is linf (``attack`` supports no other)."""
    norm = ops.check_norm(norm)
    if norm != "linf":
        raise ValueError(f"{attack} supports norm 'linf' only, got {norm!r}")
    return norm


def check_classes(logits: tf.Tensor, need: int, what: str) -> None:
    """ValueError unless ``logits`` have at least ``need`` classes (``what`` needs them)."""
    k = logits.shape[-1]
    if k is not None and k < need:
        raise ValueError(f"{what} needs a classifier of at least {need} classes, got {k}")


def check_target_count(logits: tf.Tensor, n_target_classes) -> int:
    """``n_target_classes`` checked against the classes of ``logits``."""
    n = check_positive_int(n_target_classes, "n_target_classes")
    k = logits.shape[-1]
    if k is not None and n > k - 1:
        raise ValueError(f"n_target_classes {n} must be at most the number of classes - 1 "
                         f"({k - 1})")
    return n


def check_model(model_fn: ModelFn, x: np.ndarray, num_classes: int | None = None) -> int:
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


def check_images(x, y, clip_values=ops.PIXEL_RANGE) -> tuple[np.ndarray, np.ndarray]:
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


# ----------------------------------------------------------------------------- pieces of attacks
def xent(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Per-example sparse softmax cross-entropy in float32."""
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=tf.cast(labels, tf.int32), logits=tf.cast(logits, tf.float32))


def as_labels(model_fn: ModelFn, x: tf.Tensor, y) -> tf.Tensor:
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


def setup_attack(model_fn, x, norm, eps, step_size, clip_values):
    """The common checks of an attack: (model_fn as x -> logits, x tensor, norm name, range)."""
    norm = ops.check_norm(norm)
    ops.check_radius(eps)
    ops.check_radius(step_size, "step_size")
    clip_values = ops.check_clip_values(clip_values)
    ops.check_box_radius(eps, norm, clip_values)
    ops.check_pixel_range(x, clip_values)
    return models.as_model_fn(model_fn), tf.convert_to_tensor(x), norm, clip_values


def ascent_grad(model_fn: ModelFn, x_adv: tf.Tensor, y: tf.Tensor, targeted: bool,
                 with_logits: bool = False):
    """Gradient of the attack objective (CE, or -CE toward ``y`` if targeted) w.r.t. ``x_adv``
    (and the logits at ``x_adv`` with ``with_logits``)."""
    with tf.GradientTape() as tape:
        tape.watch(x_adv)
        logits = model_fn(x_adv)
        loss = xent(y, logits)
        total = -tf.reduce_sum(loss) if targeted else tf.reduce_sum(loss)
    grad = tape.gradient(total, x_adv)
    return (grad, logits) if with_logits else grad


def bcast(mask: tf.Tensor, rank: int) -> tf.Tensor:
    """``mask`` [N] reshaped to broadcast against a tensor of rank ``rank``."""
    return tf.reshape(mask, tf.concat([tf.shape(mask), tf.ones([rank - 1], tf.int32)], 0))


def random_start(x: tf.Tensor, eps, norm: str, seed, init: tf.Tensor | None) -> tf.Tensor:
    """A random start in the ball: ``init`` (checked, projected) or a fresh uniform draw; with
    a ``seed``, this replica's rows of the draw for the whole global batch."""
    if init is None:
        if seed is None:
            return ops.random_in_ball(tf.shape(x), eps, norm, None, x.dtype)
        unit = ops.replica_rows(lambda shape: ops.random_in_ball(shape, 1.0, norm, seed),
                                tf.shape(x))
        radius = tf.cast(eps, tf.float32)
        if radius.shape.rank:
            radius = bcast(radius, x.shape.rank)
        return tf.cast(unit * radius, x.dtype)
    init = tf.convert_to_tensor(init, x.dtype)
    if init.shape.is_fully_defined() and x.shape.is_fully_defined() and init.shape != x.shape:
        raise ValueError(f"init must have the shape of x {x.shape}, got {init.shape}")
    return ops.project(init, eps, norm)


# ----------------------------------------------------------------------------- batches
def _batches(n: int, batch: int):
    for i in range(0, n, batch):
        yield i, min(i + batch, n)


def pad_rows(a: np.ndarray, size: int) -> np.ndarray:
    """``a`` padded with zero rows to ``size`` rows."""
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
                                       self([pad_rows(a[i:j], batch_size) for a in arrays], *args))
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


def round_up(size: int, replicas: int) -> int:
    """``size`` rounded up to a multiple of ``replicas``."""
    return -(-size // replicas) * replicas


def predict(model_fn: ModelFn, x: np.ndarray, batch_size: int,
             strategy: tf.distribute.Strategy | None = None) -> np.ndarray:
    """Predicted classes of ``x`` with one compiled fixed-shape step (the batch size rounded
    up to a multiple of the replicas)."""
    step = ReplicaStep(lambda xb: tf.argmax(model_fn(xb), -1, output_type=tf.int32), strategy)
    return step.map_batches([x], round_up(batch_size, step.replicas))
