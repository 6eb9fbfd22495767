"""Perturbation ops shared by attacks and training: norm-ball projections, clipping, steps.

All ops are pure TensorFlow (usable inside ``tf.function``, XLA and replica contexts) and act on
a batch of slices along axis 0 (``v[i]`` is one perturbation or one example). Norms and L2
rescaling are computed in float32 and cast back, so float16/bfloat16 inputs are safe.

Gradient of :func:`apply_perturbation`: we keep TensorFlow's own gradient of
``clip_by_value`` (the true gradient): it passes the upstream gradient where ``0 <= x + v <= 1``
(the bounds included, so a zero perturbation on a black pixel still gets a gradient) and is
zero where ``x + v`` is clipped, since moving ``v`` there does not change the input the model
sees. No straight-through estimator is used.
"""

from __future__ import annotations

import numbers
from typing import Callable

import numpy as np
import tensorflow as tf

NORMS = ("linf", "l2")
_NORM_ALIASES = {"linf": "linf", "inf": "linf", "l2": "l2", "2": "l2"}
PIXEL_RANGE = (0.0, 1.0)  # the default clip_values: images in [0, 1]


def check_norm(norm) -> str:
    """The norm's name, "linf" or "l2": also accepts ``np.inf`` / "inf" and ``2`` / "2"."""
    if isinstance(norm, numbers.Number) and not isinstance(norm, bool):
        name = "linf" if norm == np.inf else "l2" if norm == 2 else None
    else:
        name = _NORM_ALIASES.get(str(norm).lower())
    if name is None:
        raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS} (or np.inf, 2)")
    return name


def check_clip_values(clip_values) -> tuple[float, float]:
    """(lo, hi) pixel range with finite lo < hi, else ValueError."""
    try:
        lo, hi = (float(v) for v in clip_values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"clip_values must be a pair (lo, hi), got {clip_values!r}") from e
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError(f"clip_values must be finite with lo < hi, got {clip_values!r}")
    return lo, hi


def check_box_radius(eps, norm: str, clip_values=PIXEL_RANGE) -> None:
    """Refuse an L-inf radius (a Python number) larger than the pixel range itself."""
    lo, hi = check_clip_values(clip_values)
    if (check_norm(norm) == "linf" and isinstance(eps, numbers.Number)
            and float(eps) > hi - lo):
        raise ValueError(f"eps {eps:g} (L-inf) is larger than the whole pixel range "
                         f"[{lo:g}, {hi:g}]: every image could be turned into any other")


def check_pixel_range(x, clip_values=PIXEL_RANGE, what: str = "images") -> None:
    """Raise ValueError unless the values of a concrete array lie in ``clip_values``.

    Symbolic tensors (inside ``tf.function``) pass; trainers check those in the graph.
    """
    if isinstance(x, tf.Tensor) and not hasattr(x, "numpy"):
        return
    lo, hi = check_clip_values(clip_values)
    a = np.asarray(x)
    if a.size == 0:
        return
    finite = np.isfinite(a)
    if not finite.all():
        raise ValueError(f"{what} must be finite pixel values in [{lo:g}, {hi:g}], got "
                         f"{int(a.size - finite.sum())} NaN or infinite values")
    amin, amax = float(a.min()), float(a.max())
    if amin < lo or amax > hi:
        hint = ("; 0..255 images? divide them by 255, or pass clip_values=(0, 255)"
                if hi <= 1.0 and amax > 1.0 else "")
        raise ValueError(f"{what} must be finite pixel values in [{lo:g}, {hi:g}], got range "
                         f"[{amin:g}, {amax:g}] (the range is clip_values){hint}")


def check_radius(eps, name: str = "eps") -> None:
    """Raise ValueError if a Python/numpy radius is negative or not finite (tensors pass)."""
    if isinstance(eps, (numbers.Number, np.ndarray, np.generic)):
        arr = np.asarray(eps, np.float64)
        if not np.all(np.isfinite(arr)) or np.any(arr < 0):
            raise ValueError(f"{name} must be a finite non-negative radius, got {eps}")


def _per_slice(values: tf.Tensor, rank: int) -> tf.Tensor:
    """Reshape [N] (or a scalar) so that it broadcasts against a rank-``rank`` batch."""
    values = tf.convert_to_tensor(values)
    if values.shape.rank == 0:
        return values
    return tf.reshape(values, [-1] + [1] * (rank - 1))


def batch_norms(v: tf.Tensor, norm: str = "linf") -> tf.Tensor:
    """Norm of every slice ``v[i]`` as float32 [N] (L2 has a zero gradient at 0, not NaN)."""
    norm = check_norm(norm)
    v = tf.convert_to_tensor(v)
    flat = tf.reshape(tf.cast(v, tf.float32), [tf.shape(v)[0], -1])
    if norm == "linf":
        return tf.reduce_max(tf.abs(flat), axis=1)
    sq = tf.reduce_sum(tf.square(flat), axis=1)
    positive = sq > 0
    return tf.where(positive, tf.sqrt(tf.where(positive, sq, tf.ones_like(sq))),
                    tf.zeros_like(sq))


def project(v: tf.Tensor, eps, norm: str = "linf") -> tf.Tensor:
    """Project every slice ``v[i]`` onto the ``norm`` ball of radius ``eps`` (scalar or [N]).

    L-inf clips each coordinate; L2 CLIPS the norm (scales down slices with norm > eps and
    leaves the others unchanged; it never scales a vector up to the sphere).
    """
    norm = check_norm(norm)
    check_radius(eps)
    v = tf.convert_to_tensor(v)
    rank = v.shape.rank
    if norm == "linf":
        e = tf.cast(_per_slice(eps, rank), v.dtype)
        return tf.clip_by_value(v, -e, e) if e.shape.rank == 0 else tf.minimum(
            tf.maximum(v, -e), e)
    e = tf.cast(_per_slice(eps, 1), tf.float32)
    norms = batch_norms(v, "l2")
    factor = tf.where(norms > e, e / tf.where(norms > 0, norms, tf.ones_like(norms)),
                      tf.ones_like(norms))
    out = tf.cast(v, tf.float32) * _per_slice(factor, rank)
    return tf.cast(out, v.dtype)


def apply_perturbation(x: tf.Tensor, v: tf.Tensor, clip_values=PIXEL_RANGE) -> tf.Tensor:
    """The perturbed input clip(x + v, lo, hi), in the dtype of ``x`` (true gradient, see
    module); ``clip_values`` (lo, hi) is the pixel range, [0, 1] by default."""
    x = tf.convert_to_tensor(x)
    v = tf.cast(v, x.dtype)
    lo, hi = clip_values
    return tf.clip_by_value(x + v, tf.constant(lo, x.dtype), tf.constant(hi, x.dtype))


def sign_step(g: tf.Tensor) -> tf.Tensor:
    """The L-inf steepest-ascent direction sign(g) (0 where g == 0), in the dtype of ``g``."""
    return tf.sign(g)


def normalized_step(g: tf.Tensor, norm: str = "linf") -> tf.Tensor:
    """Unit steepest-ascent direction of every slice: sign(g) for L-inf, g/||g||_2 for L2.

    A zero slice gives a zero step. Computed in float32, returned in the dtype of ``g``.
    """
    norm = check_norm(norm)
    g = tf.convert_to_tensor(g)
    if norm == "linf":
        return sign_step(g)
    norms = batch_norms(g, "l2")
    inv = tf.where(norms > 0, 1.0 / tf.where(norms > 0, norms, tf.ones_like(norms)),
                   tf.zeros_like(norms))
    return tf.cast(tf.cast(g, tf.float32) * _per_slice(inv, g.shape.rank), g.dtype)


def _seed_pair(seed) -> tf.Tensor:
    """A stateless-RNG seed [2] from an int or an int tensor of shape [2]."""
    if isinstance(seed, numbers.Integral):
        return tf.constant([int(seed), 0], tf.int64)
    return tf.cast(seed, tf.int64)


def replica_rows(draw: Callable[[tf.Tensor], tf.Tensor], shape) -> tf.Tensor:
    """This replica's rows of ``draw(global shape)``, so a seeded draw does not depend on the
    split of a batch over replicas.

    ``shape`` is the local batch shape. In a replica context of R > 1 replicas (inside
    ``strategy.run``), each holding ``shape[0]`` rows of a global batch in replica order,
    ``draw`` makes the rows of the whole global batch and replica i keeps rows
    [i * shape[0], (i + 1) * shape[0]); with one replica this is ``draw(shape)`` itself.
    """
    ctx = tf.distribute.get_replica_context()
    replicas = 1 if ctx is None else ctx.num_replicas_in_sync
    if replicas == 1:
        return draw(shape)
    shape = tf.convert_to_tensor(shape, tf.int32)
    full = draw(tf.concat([[shape[0] * replicas], shape[1:]], 0))
    return tf.reshape(full, tf.concat([[replicas], shape], 0))[ctx.replica_id_in_sync_group]


def random_in_ball(shape, eps, norm: str = "linf", seed=None, dtype=tf.float32) -> tf.Tensor:
    """Random slices drawn uniformly from the ``norm`` ball of radius ``eps`` (scalar or [N]).

    ``seed``: None (stateful RNG), an int, or an int tensor [2] (stateless, reproducible).
    """
    norm = check_norm(norm)
    check_radius(eps)
    shape = tf.convert_to_tensor(shape, tf.int32)

    def uniform(s, lo, hi, salt):
        if seed is None:
            return tf.random.uniform(s, lo, hi, tf.float32)
        return tf.random.stateless_uniform(s, _seed_pair(seed) + [0, salt], lo, hi, tf.float32)

    rank = int(shape.shape[0])
    if norm == "linf":
        u = uniform(shape, -1.0, 1.0, 0)
    else:
        if seed is None:
            direction = tf.random.normal(shape)
        else:
            direction = tf.random.stateless_normal(shape, _seed_pair(seed) + [0, 1])
        dim = tf.cast(tf.reduce_prod(shape[1:]), tf.float32)
        radius = uniform(shape[:1], 0.0, 1.0, 2) ** (1.0 / dim)
        u = normalized_step(direction, "l2") * _per_slice(radius, rank)
    return tf.cast(u * tf.cast(_per_slice(eps, rank), tf.float32), dtype)
