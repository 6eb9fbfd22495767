"""PGD: projected gradient descent with restarts (see :func:`pgd`)."""

from __future__ import annotations

import tensorflow as tf

from rat_tf import ops
from rat_tf.attacks.core import (ModelFn, as_labels, ascent_grad, bcast, check_positive_int,
                                 random_start, setup_attack, xent)
from rat_tf.attacks.spec import Attack, RunSettings, register


def pgd_step_size(eps, steps: int, step_size=None):
    """``step_size`` if given, else the PGD default 2.5 * eps / steps (Madry et al. 2018)."""
    return 2.5 * eps / steps if step_size is None else step_size


def _objective(model_fn: ModelFn, x_adv: tf.Tensor, y: tf.Tensor, targeted: bool):
    """(success [N] bool, objective [N]) of adversarial examples, for picking the worst case."""
    logits = model_fn(x_adv)
    pred = tf.argmax(logits, axis=-1, output_type=tf.int32)
    loss = xent(y, logits)
    if targeted:
        return tf.equal(pred, y), -loss
    return tf.not_equal(pred, y), loss


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
    (``seed``, r), which does not depend on the split over replicas (see :mod:`rat_tf.attacks`).
    Returns x_adv in ``clip_values`` (gradient stopped).
    """
    model_fn, x, norm, clip = setup_attack(model_fn, x, norm, eps, step_size, clip_values)
    steps = check_positive_int(steps, "steps")
    restarts = check_positive_int(restarts, "restarts")
    y = as_labels(model_fn, x, y)
    step_size = tf.cast(pgd_step_size(eps, steps, step_size), x.dtype)
    rank = x.shape.rank

    def body(i, delta):
        x_adv = ops.apply_perturbation(x, delta, clip)
        g, logits = ascent_grad(model_fn, x_adv, y, targeted, with_logits=True)
        moved = ops.project(x_adv - x + step_size * ops.normalized_step(g, norm), eps, norm)
        if freeze_fooled:
            hit = tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), y)
            moved = tf.where(bcast(hit if not targeted else ~hit, rank), moved, delta)
        return i + 1, moved

    best_x = best_ok = best_obj = None
    for r in range(restarts):
        if rand_init:
            rseed = None if seed is None else tf.constant([int(seed), r], tf.int64)
            delta = random_start(x, eps, norm, rseed, init if r == 0 else None)
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
        best_x = tf.where(bcast(better, rank), x_adv, best_x)
        best_ok, best_obj = best_ok | ok, tf.where(better, obj, best_obj)
    return tf.stop_gradient(best_x)


def _call(model_fn: ModelFn, x, y, eps, settings: RunSettings, seed: int,
          strategy: tf.distribute.Strategy | None = None) -> tf.Tensor:
    """PGD with ``settings.steps`` steps and ``settings.restarts`` seeded restarts."""
    del strategy  # pure TensorFlow: runs per replica
    return pgd(model_fn, x, y, eps, steps=settings.steps, norm=settings.norm,
               restarts=settings.restarts, seed=seed, clip_values=settings.clip)


register(Attack("pgd", pgd, _call, passes_per_step=2.0))
