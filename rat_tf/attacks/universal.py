"""Universal perturbations: targeted universal perturbations V (one per target class, the
perturbations RAT trains on), the untargeted universal perturbation, and their success rates.

Targeted universal perturbations (docs/method.md, section 1) are searched for all targets at
once as one tensor V [K,H,W,C]: every batch of B images is tiled against the K perturbations
(one [K*B] forward pass), and images whose label equals the target are left out of that
target's loss and statistics. Under a ``tf.distribute`` strategy every replica works on its
shard of each global batch and the update sums are all-reduced, so every replica holds the same
V; the search is deterministic for a given seed. The rates (:func:`targeted_success_rate`,
:func:`fooling_rate`) run a :class:`rat_tf.attacks.ReplicaStep`. Registered as ``uap`` (the
untargeted universal perturbation of a batch, added to its images).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from rat_tf import files, models, ops
from rat_tf.attacks.core import (ModelFn, ReplicaStep, check_images, check_model,
                                 check_positive_int, predict)
from rat_tf.attacks.spec import Attack, RunSettings, register
from rat_tf.attacks.universal_search import UniversalSearch, default_step

TU_METHODS = ("reference", "batched", "sgd")


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
        num_classes = check_positive_int(num_classes, "num_classes")
    clip_values = ops.check_clip_values(clip_values)
    ops.check_box_radius(eps, norm, clip_values)
    max_passes = check_positive_int(max_passes, "max_passes")
    batch_size = check_positive_int(batch_size, "batch_size")
    inner_steps = check_positive_int(inner_steps, "inner_steps")
    if not 0.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [0, 1], got {delta}")
    if step_size is None:
        step_size = default_step(eps, norm, method)
    ops.check_radius(step_size, "step_size")
    x, y = check_images(x, y, clip_values)
    if y is None:
        raise ValueError("targeted_universal needs the labels y of the search images")
    model_fn = models.as_model_fn(model_fn)
    num_classes = check_model(model_fn, x, num_classes)
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
    max_passes = check_positive_int(max_passes, "max_passes")
    batch_size = check_positive_int(batch_size, "batch_size")
    if step_size is None:
        step_size = default_step(eps, norm, "sgd")
    ops.check_radius(step_size, "step_size")
    clip_values = ops.check_clip_values(clip_values)
    ops.check_box_radius(eps, norm, clip_values)
    x, y = check_images(x, y, clip_values)
    model_fn = models.as_model_fn(model_fn)
    check_model(model_fn, x)
    strategy = strategy or tf.distribute.get_strategy()
    if y is None:
        y = predict(model_fn, x, 500, strategy)
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
    x, y = check_images(x, y, clip_values)
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
    check_model(model_fn, x, k)
    batch_size = check_positive_int(batch_size, "batch_size")
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
    x, _ = check_images(x, None, clip_values)
    model_fn = models.as_model_fn(model_fn)
    v = np.asarray(v, np.float32)
    if v.shape != x.shape[1:]:
        raise ValueError(f"perturbation shape {v.shape} does not match images {x.shape[1:]}")
    batch_size = check_positive_int(batch_size, "batch_size")
    clean = predict(model_fn, x, batch_size, strategy)
    adv = predict(model_fn, np.asarray(ops.apply_perturbation(x, v, clip_values)), batch_size,
                   strategy)
    return float(np.mean(clean != adv))


def _call(model_fn: ModelFn, x, y, eps, settings: RunSettings, seed: int,
          strategy: tf.distribute.Strategy | None = None) -> tf.Tensor:
    """clip(x + v) of the untargeted universal perturbation v of the batch (``settings.steps``
    passes)."""
    clip = ops.check_clip_values(settings.clip)
    v, _ = untargeted_universal(model_fn, x, y, eps, norm=settings.norm,
                                max_passes=settings.steps, seed=seed, strategy=strategy,
                                clip_values=clip)
    return ops.apply_perturbation(tf.convert_to_tensor(x), v, clip)


register(Attack("uap", untargeted_universal, _call, per_replica=False))
