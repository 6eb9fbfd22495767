"""APGD: Auto-PGD on the cross-entropy or the DLR loss, and APGD-T (Croce & Hein 2020).

The step size starts at 2 eps and is halved at checkpoints (after 22%, then ever shorter
intervals of at least 6% of the steps) where too few steps raised the loss, or where the step
was not halved at the last checkpoint and the best loss did not grow since; a halving restarts
from the best point. Momentum 0.75. Registered as ``apgd-ce``, ``apgd-dlr`` and ``apgd-t``.
"""

from __future__ import annotations

import tensorflow as tf

from rat_tf import ops
from rat_tf.attacks import core, runs
from rat_tf.attacks.core import ModelFn, xent
from rat_tf.attacks.spec import Attack, RunSettings, register

LOSSES = ("ce", "dlr")


# The bodies of _apgd_run and apgd are those of rat_tf/autoattack.py before the attacks moved
# here, verbatim, so a change to them there re-applies as is: they keep the names they called.
_bcast, _check_positive_int, _check_fraction = core.bcast, core.check_positive_int, \
    core.check_fraction
_check_classes, _check_targets = core.check_classes, core.check_target_count
_seed, _pred, _targets, _over_runs = runs.run_seed, runs.predicted, runs.top_targets, \
    runs.over_runs
_in_graph, _prepare = runs.in_graph, runs.prepare_run


def _check_loss(loss) -> str:
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")
    return loss


def _loss(logits: tf.Tensor, y: tf.Tensor, loss: str, target: tf.Tensor | None) -> tf.Tensor:
    """Per-example objective APGD maximises: CE / DLR (untargeted), -CE(target) / targeted
    DLR -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2) with ``target``."""
    logits = tf.cast(logits, tf.float32)
    if loss == "ce":
        return xent(y, logits) if target is None else -xent(target, logits)
    z_y = runs.true_logit(logits, y)
    top = tf.math.top_k(logits, 3 if target is None else 4).values
    if target is None:
        return -(z_y - runs.best_other(logits, y)) / (top[:, 0] - top[:, 2] + 1e-12)
    return -(z_y - runs.true_logit(logits, target)) / (
        top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


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


def _run(loss: str, targeted: bool):
    """The AutoAttack run of APGD on ``loss`` (APGD-T if ``targeted``)."""

    def run(model_fn: ModelFn, x, y, todo, logits, r, seed, settings: RunSettings) -> tuple:
        target = None
        if targeted:
            target = tf.gather(runs.top_targets(logits, y, settings.n_target_classes), r, axis=1)
        return _apgd_run(model_fn, x, y, target, todo, settings.eps, settings.norm, loss,
                         settings.steps, settings.rho, settings.clip, seed)

    return run


def _call(loss: str, targeted: bool):
    """APGD on ``loss`` (APGD-T if ``targeted``) on one batch with the budgets of settings."""

    def call(model_fn: ModelFn, x, y, eps, settings: RunSettings, seed: int,
             strategy: tf.distribute.Strategy | None = None) -> tf.Tensor:
        del strategy  # pure TensorFlow: runs per replica
        return apgd(model_fn, x, y, eps, norm=settings.norm, loss=loss, targeted=targeted,
                    steps=settings.steps, restarts=settings.restarts,
                    n_target_classes=settings.n_target_classes, seed=seed, rho=settings.rho,
                    clip_values=settings.clip)

    return call


def _restarts(settings: RunSettings) -> int:
    """APGD-CE and APGD-DLR run ``restarts`` times."""
    return settings.restarts


def _per_target(settings: RunSettings) -> int:
    """APGD-T runs once per target class."""
    return settings.n_target_classes


register(Attack("apgd-ce", apgd, _call("ce", False), run=_run("ce", False), runs=_restarts,
                passes_per_step=2.0))
register(Attack("apgd-dlr", apgd, _call("dlr", False), run=_run("dlr", False),
                runs=_restarts, passes_per_step=2.0, min_classes=3))
register(Attack("apgd-t", apgd, _call("dlr", True), run=_run("dlr", True), runs=_per_target,
                passes_per_step=2.0, targeted=True, min_classes=4))
