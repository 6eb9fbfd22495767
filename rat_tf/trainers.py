"""The trainers: RAT and its baselines (standard, FGSM-AT, PGD-AT) as Keras models.

Every method is a small ``keras.Model`` that wraps a classifier and overrides ``train_step``,
so ``fit``, ``evaluate``, callbacks, checkpoints and ``tf.distribute`` strategies work as usual;
``call`` delegates to the classifier. They are registered Keras serialisables: a trainer saves
and loads as a ``.keras`` file with its classifier.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from rat_tf import models, ops, perturbation_files
from rat_tf.adversarial_trainer import ATTACK_OF, FGSM_RS_ALPHA, AdversarialTrainingModel
from rat_tf.standard_trainer import SERIALIZABLE, StandardModel, replicas

METHODS = ("standard", "rat", "fgsm_at", "pgd_at")
TARGET_MODES = ("one", "all", "worst")  # RAT targets per image per step
BATCH_MODES = ("append", "replace")

# RATModel's body (under concurrent change) keeps the names it used when StandardModel lived
# here (rat_tf/standard_trainer.py now; AdversarialTrainingModel: rat_tf/adversarial_trainer.py).
_replicas, _SERIALIZABLE = replicas, SERIALIZABLE


@_SERIALIZABLE
class RATModel(StandardModel):
    """Region adversarial training: fine-tune on clean images mixed with clip(x + V[t]).

    ``perturbations`` V [K,H,W,C] is a non-trainable variable (checkpointed, saved in the
    ``.keras`` file, identical on all replicas); ``eps`` (optional) is its radius, checked
    whenever V is set. Each step every image gets one random target t != label
    (``targets_per_image="one"``) or all K-1 targets (``"all"``); perturbed copies keep the
    TRUE label. ``"worst"`` (beyond the paper; worst-of-k as in Engstrom et al. 2019) gives each
    image the one target whose perturbed copy has the highest loss under the current weights
    (K-1 extra inference passes, no gradient through the choice). ``batch_mode="append"``
    trains on the clean batch plus its perturbed copies with the loss
    ``(1 - perturbed_fraction) * CE(clean) + perturbed_fraction * CE(perturbed)``;
    ``"replace"`` (one target per image) swaps each image for its perturbed copy with
    probability ``perturbed_fraction``, so a step costs what a standard step costs. Sample
    weights follow each image to its perturbed copies. ``per_source=True`` (beyond the paper)
    holds one perturbation per (source class, target), V [K,K,H,W,C]: an image of label s gets
    V[s, t] (see :func:`rat_tf.attacks.targeted_universal`).

    V stays fixed (static, the paper) unless a callback searches it again
    (:class:`rat_tf.callbacks.RefreshPerturbations`) or ``online=True`` (beyond the paper, in
    the spirit of universal adversarial training, Shafahi et al. 2020): then every step also
    moves the V rows used in the batch by one projected signed (L-inf) or normalised (L2)
    step of ``online_step_size`` (default eps / 10) that lowers the cross-entropy of each
    perturbed copy toward its target, computed from the training forward pass (one extra
    input gradient), summed over replicas so V stays identical on all of them; it needs
    ``eps``. ``fit`` refuses to start without a V unless V is learnt (online or by a callback).
    """

    method = "rat"

    def __init__(self, classifier: keras.Model, perturbations: np.ndarray | None = None, *,
                 targets_per_image: str = "one", perturbed_fraction: float = 0.5,
                 batch_mode: str = "append", per_source: bool = False,
                 eps: float | None = None, norm: str = "linf", online: bool = False,
                 online_step_size: float | None = None, **kwargs):
        super().__init__(classifier, **kwargs)
        self.check_settings(targets_per_image=targets_per_image,
                            perturbed_fraction=perturbed_fraction, batch_mode=batch_mode,
                            eps=eps, norm=norm, online=online,
                            online_step_size=online_step_size)
        self.targets_per_image = targets_per_image
        self.batch_mode = batch_mode
        self.perturbed_fraction = float(perturbed_fraction)
        self.per_source = bool(per_source)
        self.eps, self.norm = (None if eps is None else float(eps)), ops.check_norm(norm)
        self.online = bool(online)
        self.online_step_size = None if online_step_size is None else float(online_step_size)
        rows = (self.num_classes,) * (2 if self.per_source else 1)
        self.perturbations = self.add_weight(
            name="perturbations", shape=(*rows, *self.image_shape),
            initializer="zeros", trainable=False, aggregation="only_first_replica")
        self.perturbed_accuracy = keras.metrics.SparseCategoricalAccuracy(
            name="perturbed_accuracy")
        if perturbations is not None:
            self.set_perturbations(perturbations)

    @staticmethod
    def check_settings(*, targets_per_image: str = "one", perturbed_fraction: float = 0.5,
                       batch_mode: str = "append", per_source: bool = False,
                       eps: float | None = None, norm: str = "linf", online: bool = False,
                       online_step_size: float | None = None) -> None:
        """Raise ValueError naming the first bad RAT setting."""
        del per_source  # any bool
        if targets_per_image not in TARGET_MODES:
            raise ValueError(f"targets_per_image must be one of {TARGET_MODES}, got "
                             f"{targets_per_image!r}")
        if batch_mode not in BATCH_MODES:
            raise ValueError(f"batch_mode must be one of {BATCH_MODES}, got {batch_mode!r}")
        if batch_mode == "replace" and targets_per_image == "all":
            raise ValueError("batch_mode 'replace' swaps an image for ONE perturbed copy: use "
                             "targets_per_image 'one' or 'worst'")
        if not 0.0 <= float(perturbed_fraction) <= 1.0:
            raise ValueError(f"perturbed_fraction must be in [0, 1], got {perturbed_fraction}")
        if eps is not None:
            ops.check_radius(eps)
        ops.check_norm(norm)
        if online and eps is None:
            raise ValueError("online=True needs eps, the radius V is projected onto")
        if online and float(perturbed_fraction) == 0.0:
            raise ValueError("online=True with perturbed_fraction 0 never uses V: raise the "
                             "fraction or drop online")
        if online_step_size is not None and not (
                math.isfinite(float(online_step_size)) and float(online_step_size) > 0):
            raise ValueError(f"online_step_size must be positive, got {online_step_size}")

    def get_config(self) -> dict:
        return {**super().get_config(), **self._own_settings(), "eps": self.eps,
                "norm": self.norm}

    def _own_settings(self) -> dict:
        return {"targets_per_image": self.targets_per_image,
                "perturbed_fraction": self.perturbed_fraction, "batch_mode": self.batch_mode,
                "per_source": self.per_source, "online": self.online,
                "online_step_size": self.online_step_size}

    def set_perturbations(self, perturbations: np.ndarray) -> None:
        """Assign V (float [K,H,W,C]); call in cross-replica context (e.g. a callback).

        Refused if V is not finite, exceeds ``eps`` (when set) or spans more than the pixel
        range.
        """
        v = np.asarray(perturbations, np.float32)
        if v.shape != tuple(self.perturbations.shape):
            raise ValueError(f"perturbations have shape {v.shape}, the model needs "
                             f"{tuple(self.perturbations.shape)} ("
                             f"{'source, target' if self.per_source else 'num_classes'}, H, W, C)")
        lo, hi = self.clip_values
        perturbation_files.check_bound(v, hi - lo, "linf", what="perturbations (beyond the pixel range)")
        if self.eps is not None:
            perturbation_files.check_bound(v, self.eps, self.norm)
        self.perturbations.assign(v)

    def get_perturbations(self) -> np.ndarray:
        """The current V as a numpy array."""
        return np.asarray(keras.ops.convert_to_numpy(self.perturbations))

    def fit(self, *args, **kwargs):
        """``Model.fit``, refused if V is all zero once training begins (after callbacks such
        as ``BackupAndRestore`` restored theirs), unless V is learnt: ``online`` or a callback
        that searches it (:class:`rat_tf.callbacks.RefreshPerturbations`)."""
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if self.perturbed_fraction > 0 and not self.online and not any(
                getattr(c, "searches_perturbations", False) for c in callbacks):
            callbacks.append(_RequirePerturbations())
        return super().fit(*args, callbacks=callbacks, **kwargs)

    def perturbed_batch(self, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The perturbed copies clip(x + V[t]) for targets t != y, with their TRUE labels."""
        v = tf.convert_to_tensor(self.perturbations)
        targets = self._targets(x, y, v)
        y_p, _, _ = self._copy_index(y, targets)
        return self._copies(x, y, targets, v), y_p

    def _targets(self, x: tf.Tensor, y: tf.Tensor, v: tf.Tensor) -> tf.Tensor:
        """The targets of this step's copies: [B] (one per image) or [B, K-1] (``"all"``)."""
        k = self.num_classes
        if self.targets_per_image == "one":
            offset = self._global_draw(0, tf.shape(y), lambda shape, seed: (
                tf.random.stateless_uniform(shape, seed, minval=1, maxval=k, dtype=tf.int32)))
            return (y + offset) % k
        every = (y[:, None] + tf.range(1, k, dtype=y.dtype)[None, :]) % k  # [B, K-1]
        if self.targets_per_image == "all":
            return every
        # "worst": the copy with the highest loss under the current weights, one per image.
        logits = tf.stop_gradient(self.logits(self._copies(x, y, every, v), training=False))
        losses = keras.losses.sparse_categorical_crossentropy(
            tf.repeat(y, k - 1), logits, from_logits=True)
        worst = tf.argmax(tf.reshape(losses, (-1, k - 1)), axis=1, output_type=tf.int32)
        return tf.gather(every, worst, axis=1, batch_dims=1)

    def _copies(self, x: tf.Tensor, y: tf.Tensor, targets: tf.Tensor, v: tf.Tensor
                ) -> tf.Tensor:
        """The perturbed copies clip(x + V[t]) as one flat batch (source-major)."""
        k = self.num_classes
        if self.per_source:  # V[s, t] is row s * K + t
            v = tf.reshape(v, (k * k, *self.image_shape))
            rows = (y if targets.shape.rank == 1 else y[:, None]) * k + targets
        else:
            rows = targets
        images = x if targets.shape.rank == 1 else x[:, None]
        copies = ops.apply_perturbation(images, tf.gather(v, rows), self.clip_values)
        return tf.reshape(copies, tf.concat([[-1], tf.shape(x)[1:]], 0))

    @staticmethod
    def _copy_index(y: tf.Tensor, targets: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """(TRUE label, index in the batch of its source, target) of every copy, flat."""
        index = tf.range(tf.shape(y)[0])
        if targets.shape.rank == 1:
            return y, index, targets
        n = tf.shape(targets)[1]
        return tf.repeat(y, n), tf.repeat(index, n), tf.reshape(targets, [-1])

    def _toward(self, targets: tf.Tensor, outputs: tf.Tensor,
                weight: tf.Tensor | None = None) -> tf.Tensor:
        """Summed cross-entropy of perturbed copies toward their targets (what V lowers)."""
        losses = keras.losses.sparse_categorical_crossentropy(
            targets, tf.cast(outputs, tf.float32), from_logits=self.from_logits)
        return tf.reduce_sum(losses if weight is None else losses * weight)

    def _step(self, inputs: Callable[[tf.Tensor], tf.Tensor], y: tf.Tensor,
              weights: tf.Tensor | None, v: tf.Tensor,
              toward: Callable[[tf.Tensor], tf.Tensor]) -> tf.Tensor:
        """The weight update on ``inputs(v)`` and, when online, the V update; the outputs."""
        if not self.online:
            return self._fit_on(inputs(v), y, weights)
        outputs, grad = self._fit_on(inputs, y, weights, watched=v, side_loss=toward)
        self.learn_perturbations(v, grad)
        return outputs

    def _inputs(self, x: tf.Tensor, y: tf.Tensor, targets: tf.Tensor
                ) -> tuple[Callable[[tf.Tensor], tf.Tensor], tf.Tensor | None]:
        """(the images the step fits on, as a function of V; the replace-mode swap mask)."""
        if self.batch_mode == "replace":
            swap = self._global_draw(1, tf.shape(y), lambda shape, seed: (
                tf.random.stateless_uniform(shape, seed))) < self.perturbed_fraction
            return (lambda v: tf.where(swap[:, None, None, None],
                                       tf.cast(self._copies(x, y, targets, v), x.dtype), x)), swap
        return (lambda v: tf.concat([x, tf.cast(self._copies(x, y, targets, v), x.dtype)], 0),
                None)

    def training_batch(self, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(images, labels) a train step on (x, y) fits the classifier on: x and its perturbed
        copies (append mode) or x with some images swapped for them (replace), drawn as the
        step draws them."""
        x, y, _ = self._unpack((x, y))
        v = tf.convert_to_tensor(self.perturbations)
        targets = self._targets(x, y, v)
        inputs, swap = self._inputs(x, y, targets)
        if swap is not None:
            return inputs(v), y
        return inputs(v), tf.concat([y, self._copy_index(y, targets)[0]], 0)

    def learn_perturbations(self, v: tf.Tensor, grad: tf.Tensor) -> None:
        """One projected step of V (now ``v``) down the targeted loss whose gradient is
        ``grad``, summed over replicas: the online update of every train step."""
        grad = tf.convert_to_tensor(grad)  # IndexedSlices from the row gather -> dense
        ctx = tf.distribute.get_replica_context()
        if ctx is not None and _replicas() > 1:
            grad = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grad)
        shape = tf.shape(v)
        rows = (-1, *self.image_shape)
        size = self.online_step_size or self.eps / 10.0
        step = ops.normalized_step(tf.reshape(grad, rows), self.norm)
        lo, hi = self.clip_values
        moved = ops.project(tf.reshape(v, rows) - size * step, self.eps, self.norm)
        moved = tf.clip_by_value(moved, lo - hi, hi - lo)
        self.perturbations.assign(tf.reshape(moved, shape))

    def train_step(self, data):
        x, y, sw = self._unpack(data)
        f = self.perturbed_fraction
        if f == 0.0:
            return super().train_step(data)
        v = tf.convert_to_tensor(self.perturbations)
        targets = self._targets(x, y, v)
        y_p, source, t_p = self._copy_index(y, targets)
        inputs, swap = self._inputs(x, y, targets)
        if swap is not None:
            swapped = tf.cast(swap, tf.float32)
            outputs = self._step(inputs, y, sw, v,
                                 lambda outputs: self._toward(targets, outputs, swapped))
            w = tf.ones_like(swapped) if sw is None else sw
            self.compute_metrics(x, y, outputs, w * (1.0 - swapped))
            self.perturbed_accuracy.update_state(y, outputs, sample_weight=w * swapped)
            return self._results(self.perturbed_accuracy)
        n_clean, n_pert = tf.shape(x)[0], tf.shape(y_p)[0]
        n_all = tf.cast(n_clean + n_pert, tf.float32)
        weights = tf.concat([
            tf.fill([n_clean], (1.0 - f) * n_all / tf.cast(n_clean, tf.float32)),
            tf.fill([n_pert], f * n_all / tf.cast(n_pert, tf.float32))], 0)
        if sw is not None:
            weights *= tf.concat([sw, tf.gather(sw, source)], 0)
        outputs = self._step(inputs, tf.concat([y, y_p], 0), weights, v,
                             lambda outputs: self._toward(t_p, outputs[n_clean:]))
        self.compute_metrics(x, y, outputs[:n_clean], sw)
        self.perturbed_accuracy.update_state(
            y_p, outputs[n_clean:], sample_weight=None if sw is None else tf.gather(sw, source))
        return self._results(self.perturbed_accuracy)

    def settings(self) -> dict:
        return {**super().settings(), **self._own_settings()}


def make_trainer(method: str, classifier: keras.Model, **settings) -> StandardModel:
    """Wrap ``classifier`` in the trainer of ``method`` (standard|rat|fgsm_at|pgd_at)."""
    if method not in METHODS:
        raise ValueError(f"unknown training method {method!r}; choose one of {METHODS}")
    try:
        if method == "standard":
            return StandardModel(classifier, **settings)
        if method == "rat":
            return RATModel(classifier, **settings)
        return AdversarialTrainingModel(classifier, method, **settings)
    except TypeError as e:
        raise ValueError(f"bad settings for method {method!r}: {e}") from e


class _RequirePerturbations(keras.callbacks.Callback):
    """Stops a RAT fit before its first step if the trainer holds no V (all zero)."""

    def on_train_begin(self, logs: dict | None = None) -> None:
        if not np.any(self.model.get_perturbations()):
            raise ValueError(
                "RATModel has no perturbations (V is all zero): pass perturbations= (e.g. "
                "from rat_tf.attacks.targeted_universal) or call set_perturbations(V) first")


def load_classifier(path: str, image_shape: Sequence[int] | None = None,
                    num_classes: int | None = None) -> keras.Model:
    """The classifier in a ``.keras`` file (a classifier, or a trainer: its classifier), with
    its own architecture, checked against the data's image shape and number of classes."""
    try:
        loaded = keras.models.load_model(path, compile=False)
    except (ValueError, OSError, TypeError) as e:
        raise ValueError(f"{path}: not a loadable .keras classifier ({e})") from e
    classifier = loaded.classifier if isinstance(loaded, StandardModel) else loaded
    info = models.describe(classifier)
    if image_shape is not None and info.image_shape != tuple(image_shape):
        raise ValueError(f"{path}: the classifier takes images {info.image_shape}, the data "
                         f"has {tuple(image_shape)}")
    if num_classes is not None and info.num_classes != num_classes:
        raise ValueError(f"{path}: the classifier has {info.num_classes} classes, the data "
                         f"has {num_classes}")
    return classifier


__all__ = ["METHODS", "TARGET_MODES", "BATCH_MODES", "ATTACK_OF", "FGSM_RS_ALPHA",
           "StandardModel", "RATModel", "AdversarialTrainingModel", "make_trainer",
           "load_classifier"]
