"""FGSM: the fast gradient (sign) method, FGSM-RS and N-FGSM (see :func:`fgsm`)."""

from __future__ import annotations

import tensorflow as tf

from rat_tf import ops
from rat_tf.attacks.core import ModelFn, as_labels, ascent_grad, random_start, setup_attack
from rat_tf.attacks.spec import Attack, RunSettings, register


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
    start does not depend on the split over replicas (see :mod:`rat_tf.attacks`). Returns x_adv in
    ``clip_values`` (gradient stopped).
    """
    model_fn, x, norm, clip = setup_attack(model_fn, x, norm, eps, step_size, clip_values)
    y = as_labels(model_fn, x, y)
    if not init_scale > 0:
        raise ValueError(f"init_scale must be positive, got {init_scale}")
    if step_size is None:
        step_size = 1.25 * eps if rand_init else eps
    delta = (random_start(x, eps * init_scale, norm, seed, init) if rand_init else tf.zeros_like(x))
    x0 = ops.apply_perturbation(x, delta, clip) if box_start else x + delta
    g = ascent_grad(model_fn, x0, y, targeted)
    delta = x0 - x + tf.cast(step_size, x.dtype) * ops.normalized_step(g, norm)
    if project:
        delta = ops.project(delta, eps, norm)
    return tf.stop_gradient(ops.apply_perturbation(x, delta, clip))


def _call(model_fn: ModelFn, x, y, eps, settings: RunSettings, seed: int,
          strategy: tf.distribute.Strategy | None = None) -> tf.Tensor:
    """FGSM-RS (a seeded uniform start) on one batch."""
    del strategy  # pure TensorFlow: runs per replica
    return fgsm(model_fn, x, y, eps, norm=settings.norm, rand_init=True, seed=seed,
                clip_values=settings.clip)


register(Attack("fgsm", fgsm, _call))
