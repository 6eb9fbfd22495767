"""Region adversarial training (RAT) and its baselines (standard, FGSM-AT, PGD-AT) as Keras models.

Every method is a small ``keras.Model`` that wraps a classifier and overrides ``train_step``,
so ``fit``, ``evaluate``, callbacks, checkpoints and ``tf.distribute`` strategies work as usual;
``call`` delegates to the classifier. :func:`train` is the end-to-end driver behind
``bin/train.py``: data, strategy, resumable fit, final ``model.keras`` and ``metrics.json``.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Callable, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from rat_tf import attacks, distribute, files, models, ops
from rat_tf import data as data_lib

METHODS = ("standard", "rat", "fgsm_at", "pgd_at")
TARGET_MODES = ("one", "all", "worst")  # RAT targets per image per step
BATCH_MODES = ("append", "replace")
LR_SCHEDULES = ("constant", "cosine", "step")
OPTIMIZERS = ("adam", "sgd", "momentum")
SEARCH_METHODS = ("sgd", "batched", "reference")
DEFAULT_EPS = {"mnist": 0.3, "fashion_mnist": 0.1, "cifar10": 8 / 255}  # radius of V (RAT)
DEFAULT_ADV_EPS = {"mnist": 0.3, "fashion_mnist": 0.1, "cifar10": 8 / 255}  # FGSM-AT / PGD-AT
DEFAULT_RAT_SUBSET = 1000
FGSM_RS_ALPHA = 1.25  # Wong et al. (2020): FGSM step = 1.25 eps from a uniform random start


def _replicas() -> int:
    return tf.distribute.get_strategy().num_replicas_in_sync


def _multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """Whether ``strategy`` is a MultiWorkerMirroredStrategy running with several workers."""
    extended = getattr(strategy, "extended", None)
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and bool(getattr(extended, "_in_multi_worker_mode", lambda: False)()))


class WorkerLostError(RuntimeError):
    """A multi-worker run stopped because a peer died or became unreachable (resumable)."""


# --------------------------------------------------------------------------- trainer models
_SERIALIZABLE = keras.saving.register_keras_serializable(package="rat_tf")


@_SERIALIZABLE
class StandardModel(keras.Model):
    """Wraps a built classifier and trains it on clean examples (the baseline; base of the
    others).

    Any Keras classifier works (Sequential, functional, subclassed): its image shape and
    number of classes are read off it (:func:`rat_tf.models.describe`) and it is never
    rebuilt. ``from_logits`` (None: detected) says whether it returns logits or ends in a
    softmax; ``clip_values`` is its pixel range ([0, 1]), checked on every batch. Compile with
    just an optimizer: the loss defaults to sparse categorical cross-entropy (on logits or
    probabilities, as the classifier returns) and the metrics to ``["accuracy"]``; compiled
    losses, metrics, ``sample_weight`` and ``class_weight`` are honoured. Labels are class ids
    or one-hot rows. The trainer saves and loads as a ``.keras`` file with its classifier.
    """

    method = "standard"

    def __init__(self, classifier: keras.Model, *, from_logits: bool | None = None,
                 clip_values: Sequence[float] = ops.PIXEL_RANGE,
                 input_shape: Sequence[int] | None = None, seed: int = 0,
                 name: str | None = None):
        super().__init__(name=name or f"{self.method}_trainer")
        info = models.describe(classifier, input_shape=input_shape, from_logits=from_logits)
        self.classifier = classifier
        self.seed = int(seed)
        self.num_classes, self.image_shape = info.num_classes, info.image_shape
        self.from_logits = info.from_logits
        self.clip_values = ops.check_clip_values(clip_values)
        self._rat_tf_logits = models.logits_fn(classifier, self.from_logits)

    def call(self, inputs, training: bool = False):
        return self.classifier(inputs, training=training)

    def logits(self, x: tf.Tensor, training: bool = False) -> tf.Tensor:
        """float32 logits of the classifier (the input of its softmax if it ends in one)."""
        return self._rat_tf_logits(x, training=training)

    def compile(self, optimizer: Any = "adam", loss: Any = None, metrics: Any = None,
                **kwargs) -> None:
        """``Model.compile`` with defaults: sparse cross-entropy on the classifier's outputs
        and ``["accuracy"]``."""
        if loss is None:
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=self.from_logits)
        if metrics is None:
            metrics = ["accuracy"]
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)

    def compile_from_config(self, config: dict) -> None:
        """Compile a loaded trainer as it was saved (optimizer state included)."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def build(self, input_shape=None) -> None:
        super().build(input_shape or (None, *self.image_shape))

    def get_config(self) -> dict:
        return {"name": self.name, "classifier": keras.saving.serialize_keras_object(
                    self.classifier), "from_logits": self.from_logits,
                "clip_values": list(self.clip_values), "input_shape": list(self.image_shape),
                "seed": self.seed}

    @classmethod
    def from_config(cls, config: dict, custom_objects=None):
        config = dict(config)
        config["classifier"] = keras.saving.deserialize_keras_object(
            config["classifier"], custom_objects=custom_objects)
        return cls(**config)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras 3 (TF backend) builds the compiled state by pulling a batch from the
        # distributed iterator and reducing it with strategy.reduce, which fails under
        # MultiWorkerMirroredStrategy (PerReplica -> Tensor). The input signature is known:
        # build from it instead (nothing is pulled from the data).
        del iterator, data_batch
        batch = (tf.zeros((1, *self.image_shape)), tf.zeros((1,), tf.int32))
        with self.distribute_strategy.scope():
            self._symbolic_build(data_batch=batch)

    def _global_draw(self, salt: int, shape: tf.Tensor,
                     draw: Callable[[tf.Tensor, tf.Tensor], tf.Tensor]) -> tf.Tensor:
        """This replica's slice of ``draw(global_shape, seed)``, drawn for the whole global batch.

        ``shape`` is the local batch shape. The stateless seed is (seed, step) folded with
        ``salt``, so random choices depend neither on how a batch is split over replicas and
        workers nor on global RNG state: runs match across strategies.
        """
        ctx = tf.distribute.get_replica_context()
        replica = ctx.replica_id_in_sync_group if ctx is not None else 0
        n = shape[0]
        seed = tf.stack([tf.constant(self.seed, tf.int64),
                         tf.cast(self.optimizer.iterations, tf.int64)])
        if salt:
            seed = tf.random.experimental.stateless_fold_in(seed, salt)
        full = draw(tf.concat([[n * _replicas()], shape[1:]], 0), seed)
        return full[replica * n:(replica + 1) * n]

    def _track_loss(self, x: tf.Tensor, y: tf.Tensor, outputs: tf.Tensor,
                    sample_weight: tf.Tensor | None, training: bool) -> tf.Tensor:
        """The compiled loss of a batch (scaled by 1/replicas), its real value tracked."""
        loss = self._compute_loss(x=x, y=y, y_pred=outputs, sample_weight=sample_weight,
                                  training=training)
        self._loss_tracker.update_state(loss * tf.cast(_replicas(), loss.dtype),
                                        sample_weight=tf.shape(x)[0])
        return loss

    def _fit_on(self, x: tf.Tensor, y: tf.Tensor, sample_weight: tf.Tensor | None = None
                ) -> tf.Tensor:
        """One optimizer step on (x, y); returns the classifier's outputs (training mode)."""
        with tf.GradientTape() as tape:
            outputs = self.classifier(x, training=True)
            loss = self._track_loss(x, y, outputs, sample_weight, training=True)
            scaled = self.optimizer.scale_loss(loss)
        weights = self.trainable_weights
        grads = tape.gradient(scaled, weights)
        self.optimizer.apply_gradients(zip(grads, weights))
        return outputs

    def _unpack(self, data) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor | None]:
        """(images, int32 labels [B], float32 sample weights [B] or None), checked in-graph:
        images in ``clip_values``, labels in [0, K) (one-hot rows become class ids)."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x, y = tf.convert_to_tensor(x), tf.convert_to_tensor(y)
        if y.shape.rank == 2 and y.shape[-1] == self.num_classes and self.num_classes > 1:
            y = tf.argmax(y, axis=-1)
        elif y.shape.rank == 2 and y.shape[-1] == 1:
            y = y[:, 0]
        if y.shape.rank != 1:
            raise ValueError(f"labels must be class ids [B] or one-hot rows [B, "
                             f"{self.num_classes}], got shape {y.shape}")
        y = tf.cast(y, tf.int32)
        lo, hi = self.clip_values
        message = (f"images must be finite and in [{lo:g}, {hi:g}] (clip_values); for 0..255 "
                   f"images divide by 255 or pass clip_values=(0, 255)")
        pixels = tf.cast(x, tf.float32)
        tf.debugging.assert_greater_equal(tf.reduce_min(pixels), tf.constant(lo, tf.float32),
                                          message=message)
        tf.debugging.assert_less_equal(tf.reduce_max(pixels), tf.constant(hi, tf.float32),
                                       message=message)
        tf.debugging.assert_non_negative(y, message="labels must be class ids >= 0")
        tf.debugging.assert_less(y, self.num_classes,
                                 message=f"labels must be class ids < {self.num_classes}")
        if sample_weight is not None:
            sample_weight = tf.reshape(tf.cast(sample_weight, tf.float32), [-1])
        return x, y, sample_weight

    def _results(self, *extra: keras.metrics.Metric) -> dict:
        """Logs of a step: the loss, the compiled metrics and the given extra metrics (the
        trainer's other own metrics are not meaningful here)."""
        own = [m for m in self._metrics if not any(m is e for e in extra)]
        results = {}
        for m in self.metrics:
            if any(m is o for o in own):
                continue
            r = m.result()
            results.update(r if isinstance(r, dict) else {m.name: r})
        if _multi_worker(self.distribute_strategy):
            # Keras 3 reduces step logs across workers with strategy.reduce(MEAN, axis=0),
            # which rejects scalars (tensorflow/tensorflow#72388): hand it shape-[1] values.
            results = {k: tf.reshape(v, [1]) for k, v in results.items()}
        return results

    def train_step(self, data):
        x, y, sw = self._unpack(data)
        outputs = self._fit_on(x, y, sw)
        self.compute_metrics(x, y, outputs, sw)
        return self._results()

    def test_step(self, data):
        """Clean loss and compiled metrics (the same for every method)."""
        x, y, sw = self._unpack(data)
        outputs = self.classifier(x, training=False)
        self._track_loss(x, y, outputs, sw, training=False)
        self.compute_metrics(x, y, outputs, sw)
        return self._results()

    def settings(self) -> dict:
        """The method settings (for logs and metrics.json)."""
        return {"method": self.method, "seed": self.seed, "from_logits": self.from_logits,
                "clip_values": list(self.clip_values)}


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
    weights follow each image to its perturbed copies. V stays fixed (static, the paper)
    unless a :class:`RefreshPerturbations` callback searches it again; ``fit`` refuses to start
    without a V. ``per_source=True`` (beyond the paper) holds one perturbation per (source
    class, target), V [K,K,H,W,C]: an image of label s gets V[s, t] (see
    :func:`attacks.targeted_universal`).
    """

    method = "rat"

    def __init__(self, classifier: keras.Model, perturbations: np.ndarray | None = None, *,
                 targets_per_image: str = "one", perturbed_fraction: float = 0.5,
                 batch_mode: str = "append", per_source: bool = False,
                 eps: float | None = None, norm: str = "linf", **kwargs):
        super().__init__(classifier, **kwargs)
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
        self.targets_per_image = targets_per_image
        self.batch_mode = batch_mode
        self.perturbed_fraction = float(perturbed_fraction)
        self.per_source = bool(per_source)
        self.eps, self.norm = (None if eps is None else float(eps)), ops.check_norm(norm)
        rows = (self.num_classes,) * (2 if self.per_source else 1)
        self.perturbations = self.add_weight(
            name="perturbations", shape=(*rows, *self.image_shape),
            initializer="zeros", trainable=False, aggregation="only_first_replica")
        self.perturbed_accuracy = keras.metrics.SparseCategoricalAccuracy(
            name="perturbed_accuracy")
        if perturbations is not None:
            self.set_perturbations(perturbations)

    def get_config(self) -> dict:
        return {**super().get_config(), "targets_per_image": self.targets_per_image,
                "perturbed_fraction": self.perturbed_fraction, "batch_mode": self.batch_mode,
                "per_source": self.per_source, "eps": self.eps, "norm": self.norm}

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
        attacks.check_bound(v, hi - lo, "linf", what="perturbations (beyond the pixel range)")
        if self.eps is not None:
            attacks.check_bound(v, self.eps, self.norm)
        self.perturbations.assign(v)

    def get_perturbations(self) -> np.ndarray:
        """The current V as a numpy array."""
        return np.asarray(keras.ops.convert_to_numpy(self.perturbations))

    def fit(self, *args, **kwargs):
        """``Model.fit``, refused if V is all zero once training begins (after callbacks such
        as ``BackupAndRestore`` restored theirs), unless a :class:`RefreshPerturbations`
        callback will search one."""
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if self.perturbed_fraction > 0 and not any(
                isinstance(c, RefreshPerturbations) for c in callbacks):
            callbacks.append(_RequirePerturbations())
        return super().fit(*args, callbacks=callbacks, **kwargs)

    def perturbed_batch(self, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The perturbed copies clip(x + V[t]) for targets t != y, with their TRUE labels."""
        x_p, y_p, _ = self._perturbed(x, y)
        return x_p, y_p

    def _perturbed(self, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """:meth:`perturbed_batch` and the index in the batch of the source of each copy."""
        k = self.num_classes
        v = tf.convert_to_tensor(self.perturbations)
        if self.per_source:  # V[s, t] is row s * K + t
            v = tf.reshape(v, (k * k, *self.image_shape))

        def rows(labels, targets):
            return labels * k + targets if self.per_source else targets

        index = tf.range(tf.shape(y)[0])
        if self.targets_per_image == "one":
            offset = self._global_draw(0, tf.shape(y), lambda shape, seed: (
                tf.random.stateless_uniform(shape, seed, minval=1, maxval=k, dtype=tf.int32)))
            targets = (y + offset) % k
            return (ops.apply_perturbation(x, tf.gather(v, rows(y, targets)), self.clip_values),
                    y, index)
        targets = (y[:, None] + tf.range(1, k, dtype=y.dtype)[None, :]) % k  # [B, K-1]
        copies = ops.apply_perturbation(x[:, None], tf.gather(v, rows(y[:, None], targets)),
                                        self.clip_values)
        flat, y_p = tf.reshape(copies, tf.concat([[-1], tf.shape(x)[1:]], 0)), tf.repeat(y, k - 1)
        if self.targets_per_image == "all":
            return flat, y_p, tf.repeat(index, k - 1)
        # "worst": the copy with the highest loss under the current weights, one per image.
        logits = tf.stop_gradient(self.logits(flat, training=False))
        losses = keras.losses.sparse_categorical_crossentropy(y_p, logits, from_logits=True)
        worst = tf.argmax(tf.reshape(losses, (-1, k - 1)), axis=1, output_type=tf.int32)
        return tf.gather(copies, worst, axis=1, batch_dims=1), y, index

    def train_step(self, data):
        x, y, sw = self._unpack(data)
        f = self.perturbed_fraction
        if f == 0.0:
            return super().train_step(data)
        x_p, y_p, source = self._perturbed(x, y)
        if self.batch_mode == "replace":
            swap = self._global_draw(1, tf.shape(y), lambda shape, seed: (
                tf.random.stateless_uniform(shape, seed))) < f
            outputs = self._fit_on(
                tf.where(swap[:, None, None, None], tf.cast(x_p, x.dtype), x), y, sw)
            swapped = tf.cast(swap, tf.float32)
            w = tf.ones_like(swapped) if sw is None else sw
            self.compute_metrics(x, y, outputs, w * (1.0 - swapped))
            self.perturbed_accuracy.update_state(y, outputs, sample_weight=w * swapped)
            return self._results(self.perturbed_accuracy)
        n_clean, n_pert = tf.shape(x)[0], tf.shape(x_p)[0]
        n_all = tf.cast(n_clean + n_pert, tf.float32)
        weights = tf.concat([
            tf.fill([n_clean], (1.0 - f) * n_all / tf.cast(n_clean, tf.float32)),
            tf.fill([n_pert], f * n_all / tf.cast(n_pert, tf.float32))], 0)
        if sw is not None:
            weights *= tf.concat([sw, tf.gather(sw, source)], 0)
        outputs = self._fit_on(tf.concat([x, tf.cast(x_p, x.dtype)], 0),
                               tf.concat([y, y_p], 0), weights)
        self.compute_metrics(x, y, outputs[:n_clean], sw)
        self.perturbed_accuracy.update_state(
            y_p, outputs[n_clean:], sample_weight=None if sw is None else tf.gather(sw, source))
        return self._results(self.perturbed_accuracy)

    def settings(self) -> dict:
        return {**super().settings(), "targets_per_image": self.targets_per_image,
                "perturbed_fraction": self.perturbed_fraction, "batch_mode": self.batch_mode,
                "per_source": self.per_source}


@_SERIALIZABLE
class AdversarialTrainingModel(StandardModel):
    """FGSM-AT with random init (Wong et al. 2020) or PGD-AT (Madry et al. 2018).

    Each step replaces the batch by adversarial examples computed against the current
    weights (``attacks.fgsm`` from a uniform random start with step 1.25 eps, or
    ``attacks.pgd`` from a random start) and trains on them with their true labels. The random
    starts are drawn per step from the seed for the global batch, so runs are reproducible and
    match across strategies.
    """

    def __init__(self, classifier: keras.Model, method: str = "pgd_at", *, eps: float = 0.3,
                 norm: str = "linf", steps: int = 10, step_size: float | None = None,
                 name: str | None = None, **kwargs):
        if method not in ("fgsm_at", "pgd_at"):
            raise ValueError(f"adversarial training method must be fgsm_at or pgd_at, got "
                             f"{method!r}")
        super().__init__(classifier, name=name or f"{method}_trainer", **kwargs)
        self.method = method
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        norm = ops.check_norm(norm)
        if method == "fgsm_at":
            steps = 1
            step_size = step_size or FGSM_RS_ALPHA * eps
        if int(steps) < 1:
            raise ValueError(f"PGD steps must be >= 1, got {steps}")
        self.eps, self.norm, self.steps = float(eps), norm, int(steps)
        self.step_size = float(attacks.pgd_step_size(self.eps, self.steps, step_size or None))
        if not self.step_size > 0:
            raise ValueError(f"step_size must be positive, got {step_size}")
        self.adversarial_accuracy = keras.metrics.SparseCategoricalAccuracy(
            name="adversarial_accuracy")

    def get_config(self) -> dict:
        return {**super().get_config(), "method": self.method, "eps": self.eps,
                "norm": self.norm, "steps": self.steps, "step_size": self.step_size}

    def adversarial_batch(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """Adversarial examples of (x, y) against the current weights (inference mode)."""
        model_fn = lambda z: self.logits(z, training=False)  # noqa: E731
        start = self._global_draw(2, tf.shape(x), lambda shape, seed: ops.random_in_ball(
            shape, self.eps, self.norm, seed, x.dtype))
        if self.method == "fgsm_at":
            x_adv = attacks.fgsm(model_fn, x, y, self.eps, norm=self.norm, rand_init=True,
                                 step_size=self.step_size, init=start,
                                 clip_values=self.clip_values)
        else:
            x_adv = attacks.pgd(model_fn, x, y, self.eps, step_size=self.step_size,
                                steps=self.steps, norm=self.norm, rand_init=True, restarts=1,
                                init=start, clip_values=self.clip_values)
        return tf.stop_gradient(tf.cast(x_adv, x.dtype))

    def train_step(self, data):
        x, y, sw = self._unpack(data)
        outputs = self._fit_on(self.adversarial_batch(x, y), y, sw)
        self.adversarial_accuracy.update_state(y, outputs, sample_weight=sw)
        return self._results(self.adversarial_accuracy)

    def settings(self) -> dict:
        return {**super().settings(), "eps": self.eps, "norm": self.norm, "steps": self.steps,
                "step_size": self.step_size}


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

# --------------------------------------------------------------------------- callbacks
class RefreshPerturbations(keras.callbacks.Callback):
    """Every ``every`` epochs, search V afresh against the current weights (RAT refresh mode).

    Place it before ``BackupAndRestore`` in the callback list so the backup holds the new V.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, every: int, *, eps: float,
                 norm: str = "linf", method: str = "sgd", max_passes: int = 10,
                 delta: float = 0.2, step_size: float | None = None, batch_size: int = 128,
                 seed: int = 0, progress: bool = False):
        super().__init__()
        if int(every) < 1:
            raise ValueError(f"refresh interval must be >= 1 epoch, got {every}")
        self.x, self.y, self.every = x, y, int(every)
        self.kwargs = dict(eps=eps, norm=norm, method=method, max_passes=max_passes,
                           delta=delta, step_size=step_size, batch_size=batch_size)
        self.seed, self.progress = seed, progress
        self.history: list[dict] = []
        self._cache: dict = {}  # the compiled search, traced once and reused every refresh

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if (epoch + 1) % self.every:
            return
        if not isinstance(self.model, RATModel):
            raise ValueError("RefreshPerturbations needs a RATModel")
        start = time.time()
        logging.info("epoch %d: refreshing V against the current weights (%d images)",
                     epoch + 1, len(self.x))
        v, stats = attacks.targeted_universal(
            self.model, self.x, self.y, num_classes=self.model.num_classes,
            progress=self.progress,
            seed=self.seed + epoch + 1, strategy=self.model.distribute_strategy,
            cache=self._cache, per_source=self.model.per_source,
            clip_values=self.model.clip_values, **self.kwargs)
        self.model.set_perturbations(v)
        rate = _mean_rate(stats)
        self.history.append({"epoch": epoch + 1, "success_rate": rate,
                             "seconds": time.time() - start})
        logging.info("epoch %d: refreshed V (mean targeted success %.3f, %.1fs)", epoch + 1,
                     rate, time.time() - start)
        if logs is not None:
            logs["refresh_success_rate"] = rate


class _RequirePerturbations(keras.callbacks.Callback):
    """Stops a RAT fit before its first step if the trainer holds no V (all zero)."""

    def on_train_begin(self, logs: dict | None = None) -> None:
        if not np.any(self.model.get_perturbations()):
            raise ValueError(
                "RATModel has no perturbations (V is all zero): pass perturbations= (e.g. "
                "from rat_tf.attacks.targeted_universal) or call set_perturbations(V) first")


def _mean_rate(stats: dict) -> float:
    rates = [r for r in stats["success_rate"] if r is not None]
    return float(np.mean(rates)) if rates else 0.0


class RaiseOnNaN(keras.callbacks.Callback):
    """Stop training with a clear ``FloatingPointError`` as soon as the loss is NaN or inf."""

    def __init__(self):
        super().__init__()
        self._epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise FloatingPointError(
                f"NaN loss: training loss became {float(loss)} at epoch {self._epoch + 1}, "
                f"batch {batch + 1}; training diverged (lower the learning rate, check the "
                f"data and the precision policy)")


class RobustnessMonitor(keras.callbacks.Callback):
    """After every epoch, FGSM accuracy of the classifier on held-out images (logged).

    Stops training once it reaches ``target`` or when ``time_limit`` seconds of training
    (evaluation time excluded) have passed; ``records`` holds (epoch, train seconds, acc).
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, eps: float, *, norm: str = "linf",
                 target: float | None = None, time_limit: float | None = None,
                 batch_size: int = 500):
        super().__init__()
        self.x, self.y, self.eps, self.norm = x, y, float(eps), norm
        self.target, self.time_limit, self.batch_size = target, time_limit, batch_size
        self.records: list[dict] = []
        self.time_to_target: float | None = None
        self._train_seconds = 0.0
        self._t0 = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._t0 = time.time()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._train_seconds += time.time() - self._t0
        model = getattr(self.model, "classifier", self.model)
        acc = adversarial_accuracy(model, self.x, self.y, self.eps, norm=self.norm,
                                   batch_size=self.batch_size)
        self.records.append({"epoch": epoch + 1, "train_seconds": self._train_seconds,
                             "fgsm_accuracy": acc})
        logging.info("epoch %d: FGSM(%s, %g) accuracy %.4f after %.1fs of training",
                     epoch + 1, self.norm, self.eps, acc, self._train_seconds)
        if logs is not None:
            logs["fgsm_accuracy"] = acc
        if self.target is not None and acc >= self.target and self.time_to_target is None:
            self.time_to_target = self._train_seconds
            self.model.stop_training = True
        if self.time_limit is not None and self._train_seconds >= self.time_limit:
            self.model.stop_training = True


# --------------------------------------------------------------------------- evaluation helpers
def accuracy(model_fn: Callable, x: np.ndarray, y: np.ndarray, batch_size: int = 500) -> float:
    """Clean accuracy of ``model_fn`` (x -> logits) on arrays, computed locally (eagerly)."""
    if len(x) == 0:
        raise ValueError("accuracy of an empty set")
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")
    correct = 0
    for i in range(0, len(x), batch_size):
        logits = keras.ops.convert_to_numpy(model_fn(tf.constant(x[i:i + batch_size])))
        correct += int(np.sum(np.argmax(logits, axis=-1) == y[i:i + batch_size]))
    return correct / len(x)


def adversarial_accuracy(model_fn: Callable, x: np.ndarray, y: np.ndarray, eps: float, *,
                         norm: str = "linf", batch_size: int = 500) -> float:
    """Accuracy under the (untargeted, no random init) FGSM attack of radius ``eps``."""
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"need as many labels as images (and some), got {len(x)} / {len(y)}")
    model_fn = models.as_model_fn(model_fn)
    correct = 0
    for i in range(0, len(x), batch_size):
        yb = y[i:i + batch_size]
        x_adv = attacks.fgsm(model_fn, tf.constant(x[i:i + batch_size]),
                             tf.constant(yb, tf.int32), eps, norm=norm)
        logits = keras.ops.convert_to_numpy(model_fn(x_adv))
        correct += int(np.sum(np.argmax(logits, axis=-1) == yb))
    return correct / len(x)


# --------------------------------------------------------------------------- end-to-end driver
@dataclasses.dataclass
class TrainConfig:
    """Everything :func:`train` needs; ``bin/train.py`` flags mirror these fields."""

    dataset: str = "mnist"
    data_dir: str | None = None
    data_source: str = "auto"
    model: str = "mnist_cnn"
    method: str = "standard"
    epochs: int = 1
    batch_size: int = 128  # GLOBAL batch size (split over replicas)
    steps_per_epoch: int = 0  # 0: one pass over the training set
    lr: float = 1e-3
    lr_schedule: str = "constant"
    optimizer: str = "adam"
    train_subset: int | None = None  # balanced subset size; None: 1000 for rat, all otherwise
    test_subset: int = 0  # first N test images for the final accuracy (0: all)
    seed: int = 0
    model_dir: str = "runs/default"
    init_from: str = ""  # .keras classifier to fine-tune from
    # RAT
    perturbations_path: str = ""  # .npz from bin/perturb.py; empty: search at start
    eps: float | None = None  # L-inf/L2 radius of V; None: dataset default (MNIST 0.3)
    norm: str = "linf"
    search_method: str = "sgd"
    search_passes: int = 10
    search_delta: float = 0.2
    refresh_every: int = 0  # 0: static V (the paper)
    targets_per_image: str = "one"
    perturbed_fraction: float = 0.5
    batch_mode: str = "append"  # or "replace": the cost of a standard step
    per_source: bool = False  # one V per (source class, target) instead of per target
    # FGSM-AT / PGD-AT
    adv_eps: float | None = None  # attack radius; None: dataset default (MNIST 0.3)
    pgd_steps: int = 10
    pgd_step_size: float | None = None  # None: 2.5 eps / steps
    # performance
    precision: str = "float32"
    jit_compile: bool = False
    verbose: int | None = None  # None: progress bar when interactive, one line per epoch if not
    restart: bool = False  # drop a backup in model_dir and start over (else it is resumed)

    # Fields that do not change what is trained: a resume may differ in these.
    RESUME_FREE = ("data_dir", "data_source", "verbose", "restart", "model_dir")

    def run_settings(self) -> dict:
        """The settings a resumed run must share with the run that wrote the backup."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RESUME_FREE}

    def resolved_eps(self) -> float:
        """``eps`` (radius of V), or the dataset's default."""
        return float(self.eps) if self.eps is not None else DEFAULT_EPS.get(self.dataset, 0.1)

    def resolved_adv_eps(self) -> float:
        """``adv_eps`` (FGSM-AT / PGD-AT radius), or the dataset's default."""
        if self.adv_eps is not None:
            return float(self.adv_eps)
        return DEFAULT_ADV_EPS.get(self.dataset, 0.1)

    def resolved_subset(self) -> int:
        """Number of training images (0 = all)."""
        if self.train_subset is None:
            return DEFAULT_RAT_SUBSET if self.method == "rat" else 0
        return int(self.train_subset)

    def validate(self, num_replicas: int = 1) -> None:
        """Raise ValueError naming the first bad value."""
        info = data_lib.get_info(self.dataset)
        if self.model not in models.MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {sorted(models.MODELS)}")
        checks = [
            (self.method in METHODS, f"unknown method {self.method!r}; choose one of {METHODS}"),
            (int(self.epochs) >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (int(self.batch_size) >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (int(self.batch_size) % num_replicas == 0,
             f"global batch_size {self.batch_size} is not divisible by the {num_replicas} "
             f"replicas of the strategy"),
            (int(self.steps_per_epoch) >= 0,
             f"steps_per_epoch must be >= 0, got {self.steps_per_epoch}"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be positive, got {self.lr}"),
            (self.lr_schedule in LR_SCHEDULES,
             f"unknown lr_schedule {self.lr_schedule!r}; choose one of {LR_SCHEDULES}"),
            (self.optimizer in OPTIMIZERS,
             f"unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}"),
            (self.train_subset is None or int(self.train_subset) >= 0,
             f"train_subset must be >= 0, got {self.train_subset}"),
            (self.resolved_subset() % info.num_classes == 0,
             f"train_subset {self.resolved_subset()} must be a multiple of the "
             f"{info.num_classes} classes (balanced subset)"),
            (int(self.test_subset) >= 0, f"test_subset must be >= 0, got {self.test_subset}"),
            (self.resolved_eps() > 0, f"eps must be positive, got {self.eps}"),
            (self.resolved_adv_eps() > 0, f"adv_eps must be positive, got {self.adv_eps}"),
            (self.norm in ops.NORMS, f"unknown norm {self.norm!r}; choose one of {ops.NORMS}"),
            (self.search_method in SEARCH_METHODS,
             f"unknown search_method {self.search_method!r}; choose one of {SEARCH_METHODS}"),
            (int(self.search_passes) >= 1,
             f"search_passes must be >= 1, got {self.search_passes}"),
            (0 <= self.search_delta < 1, f"search_delta must be in [0, 1), got "
                                         f"{self.search_delta}"),
            (int(self.refresh_every) >= 0,
             f"refresh_every must be >= 0, got {self.refresh_every}"),
            (self.targets_per_image in TARGET_MODES,
             f"targets_per_image must be one of {TARGET_MODES}, got {self.targets_per_image!r}"),
            (0 <= self.perturbed_fraction <= 1,
             f"perturbed_fraction must be in [0, 1], got {self.perturbed_fraction}"),
            (self.batch_mode in BATCH_MODES,
             f"batch_mode must be one of {BATCH_MODES}, got {self.batch_mode!r}"),
            (self.batch_mode == "append" or self.targets_per_image != "all",
             "batch_mode 'replace' needs targets_per_image 'one' or 'worst'"),
            (int(self.pgd_steps) >= 1, f"pgd_steps must be >= 1, got {self.pgd_steps}"),
            (self.pgd_step_size is None or self.pgd_step_size > 0,
             f"pgd_step_size must be positive, got {self.pgd_step_size}"),
            (self.precision in distribute.PRECISIONS,
             f"unknown precision {self.precision!r}; choose one of {distribute.PRECISIONS}"),
            (bool(self.model_dir), "model_dir must be set"),
            (not self.init_from or os.path.isfile(self.init_from),
             f"init_from {self.init_from!r}: no such file"),
            (not self.perturbations_path or os.path.isfile(self.perturbations_path),
             f"perturbations_path {self.perturbations_path!r}: no such file"),
            (self.method == "rat" or not (self.perturbations_path or self.refresh_every
                                          or self.per_source),
             "perturbations_path, refresh_every and per_source are RAT settings (method=rat)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def trainer_settings(self) -> dict:
        """The keyword settings of :func:`make_trainer` for this config."""
        if self.method == "rat":
            return {"targets_per_image": self.targets_per_image,
                    "perturbed_fraction": self.perturbed_fraction,
                    "batch_mode": self.batch_mode, "per_source": bool(self.per_source),
                    "seed": self.seed}
        if self.method in ("fgsm_at", "pgd_at"):
            return {"eps": self.resolved_adv_eps(), "norm": self.norm, "steps": self.pgd_steps,
                    "step_size": self.pgd_step_size, "seed": self.seed}
        return {"seed": self.seed}


def make_optimizer(config: TrainConfig, total_steps: int) -> keras.optimizers.Optimizer:
    """The optimizer and learning-rate schedule of ``config`` over ``total_steps`` steps."""
    lr: Any = config.lr
    if config.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(config.lr, decay_steps=max(1, total_steps))
    elif config.lr_schedule == "step":
        bounds = [max(1, total_steps // 2), max(2, (3 * total_steps) // 4)]
        lr = keras.optimizers.schedules.PiecewiseConstantDecay(
            bounds, [config.lr, config.lr * 0.1, config.lr * 0.01])
    if config.optimizer == "adam":
        return keras.optimizers.Adam(lr)
    if config.optimizer == "momentum":
        return keras.optimizers.SGD(lr, momentum=0.9, nesterov=True)
    return keras.optimizers.SGD(lr)


def read_history(path: str) -> dict[str, list[float]]:
    """Per-epoch history from a CSVLogger file (last row wins when an epoch was re-run)."""
    if not os.path.isfile(path):
        return {}
    rows: dict[int, dict] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows[int(row["epoch"])] = row
    history: dict[str, list] = {}
    for epoch in sorted(rows):
        for key, value in rows[epoch].items():
            value = None if value in ("NA", "", None) else (
                int(value) if key == "epoch" else float(value))
            history.setdefault(key, []).append(value)
    return {k: v for k, v in history.items() if any(x is not None for x in v)}


def train_stream(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int = 0,
                 start: int = 0) -> tf.data.Dataset:
    """Endless batches of a fresh seeded permutation per pass, from example ``start`` on.

    The order is a pure function of (seed, pass), so it is the same under every strategy
    (however often the dataset is iterated) and a resumed run continues where it stopped.
    Batches are global (``drop_remainder``); the pipeline is auto-sharded by DATA.
    """
    n = len(x)
    if n < batch_size:
        raise ValueError(f"{n} training images make no full batch of {batch_size}")
    images, labels = tf.constant(np.asarray(x, np.float32)), tf.constant(np.asarray(y, np.int32))

    def one_pass(p):
        perm = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), p]))
        return tf.data.Dataset.from_tensor_slices(perm)

    ds = tf.data.Dataset.counter(dtype=tf.int64).flat_map(one_pass).skip(start)
    ds = ds.batch(batch_size, drop_remainder=True).map(
        lambda i: (tf.gather(images, i), tf.gather(labels, i)))
    opts = tf.data.Options()
    opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    opts.deterministic = True
    return ds.with_options(opts).prefetch(tf.data.AUTOTUNE)


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


def _verbose(config: TrainConfig) -> int:
    if config.verbose is not None:
        return config.verbose
    return 1 if sys.stdout.isatty() else 2


def train(config: TrainConfig, strategy: tf.distribute.Strategy | None = None,
          callbacks: Sequence[keras.callbacks.Callback] = ()) -> dict:
    """Train per ``config`` (resuming from ``model_dir/backup`` if present) and write outputs.

    Writes ``model_dir/model.keras`` (the classifier), ``metrics.json``, ``history.csv``,
    TensorBoard logs and, for RAT, ``perturbations.npz``; under multi-worker only the chief
    writes them. Returns the metrics dict.
    """
    strategy = strategy or tf.distribute.get_strategy()
    config.validate(strategy.num_replicas_in_sync)
    previous_policy = keras.mixed_precision.global_policy().name
    distribute.set_precision(config.precision)
    try:
        return _train(config, strategy, list(callbacks))
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def _train(config: TrainConfig, strategy: tf.distribute.Strategy,
           extra_callbacks: list) -> dict:
    start = time.time()
    chief = distribute.is_chief(strategy)
    model_dir = os.path.abspath(config.model_dir)
    work_dir = distribute.worker_dir(model_dir, strategy)
    os.makedirs(work_dir, exist_ok=True)
    backup_dir = os.path.join(work_dir, "backup")
    chief_backup = os.path.join(model_dir, "backup")  # what every worker restores from
    history_path = os.path.join(work_dir, "history.csv")
    settings_path = os.path.join(chief_backup, SETTINGS_FILE)
    if config.restart and chief:
        shutil.rmtree(chief_backup, ignore_errors=True)
    if chief:
        _remove_stale_temporaries(model_dir, chief_backup)
    resuming = os.path.exists(os.path.join(chief_backup, "training_metadata.json"))
    if resuming:
        _check_resume(settings_path, config)
    elif os.path.exists(history_path):
        os.remove(history_path)  # a fresh run: drop the history of an earlier finished run
    keras.utils.set_random_seed(config.seed)

    info = data_lib.get_info(config.dataset)
    x_train, y_train = data_lib.load_arrays(config.dataset, "train", config.data_source,
                                            config.data_dir)
    x_test, y_test = data_lib.load_arrays(config.dataset, "test", config.data_source,
                                          config.data_dir)
    subset = config.resolved_subset()
    if subset:
        x_train, y_train = data_lib.balanced_subset(x_train, y_train,
                                                    subset // info.num_classes, config.seed)
    if config.test_subset:
        x_test, y_test = x_test[:config.test_subset], y_test[:config.test_subset]
    steps_per_epoch = config.steps_per_epoch or len(x_train) // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{len(x_train)} training images make no full batch of "
                         f"{config.batch_size}; lower batch_size or enlarge train_subset")
    logging.info("%s on %s/%s: %d training images, %d steps/epoch x %d epochs, global batch "
                 "%d over %d replicas%s", config.method, config.dataset,
                 config.init_from or config.model,
                 len(x_train), steps_per_epoch, config.epochs, config.batch_size,
                 strategy.num_replicas_in_sync, " (resuming)" if resuming else "")

    eps, given_v = config.resolved_eps(), None
    if config.method == "rat" and config.perturbations_path:
        given_v, given_meta = attacks.load_perturbations(config.perturbations_path)
        eps = float(given_meta.get("eps", eps))  # V is checked against its own radius
        logging.info("loaded V %s from %s (eps %g)", given_v.shape, config.perturbations_path,
                     eps)
    search_kwargs = dict(eps=eps, norm=config.norm, method=config.search_method,
                         max_passes=config.search_passes, delta=config.search_delta,
                         batch_size=min(128, len(x_train)))
    with strategy.scope():
        if config.init_from:
            classifier = load_classifier(config.init_from, info.image_shape, info.num_classes)
        else:
            classifier = models.build_model(config.model, info.image_shape, info.num_classes)
        settings = config.trainer_settings()
        if config.method == "rat":
            settings["eps"] = eps
        trainer = make_trainer(config.method, classifier, **settings)
        trainer.build((None, *info.image_shape))
        trainer.compile(optimizer=make_optimizer(config, steps_per_epoch * config.epochs),
                        jit_compile=config.jit_compile)

    search_seconds, search_stats = 0.0, None
    if config.method == "rat" and not resuming:  # a resumed run restores V from the backup
        t = time.time()
        if given_v is not None:
            v = given_v
        else:
            logging.info("searching targeted universal perturbations (%s, eps %g, %s)",
                         config.norm, eps, config.search_method)
            v, search_stats = attacks.targeted_universal(
                trainer, x_train, y_train, num_classes=info.num_classes, seed=config.seed,
                strategy=strategy, per_source=config.per_source,
                progress=_verbose(config) == 1, **search_kwargs)
            logging.info("V found in %.1fs: mean targeted success %.3f on the training subset",
                         time.time() - t, _mean_rate(search_stats))
        trainer.set_perturbations(v)
        search_seconds = time.time() - t

    cbs: list = [RaiseOnNaN()]
    if config.method == "rat" and config.refresh_every:
        cbs.append(RefreshPerturbations(x_train, y_train, config.refresh_every,
                                        seed=config.seed, progress=_verbose(config) == 1,
                                        **search_kwargs))
    timer = _EpochTimer()
    cbs += extra_callbacks + [
        timer,
        # History before backup: a kill between the two re-runs the epoch (its row is written
        # again; read_history keeps the last) instead of losing the row of a backed-up epoch.
        HistoryCSV(history_path),
        ClusterBackupAndRestore(backup_dir, restore_dir=chief_backup,
                                settings=config.run_settings()),
    ]
    if importlib.util.find_spec("tensorboard") is not None:
        cbs.append(keras.callbacks.TensorBoard(os.path.join(work_dir, "logs")))
    else:
        logging.warning("tensorboard is not installed: no TensorBoard logs "
                        "(pip install tensorboard); history.csv has the per-epoch metrics")
    initial_epoch = 0
    if resuming:
        with open(os.path.join(chief_backup, "training_metadata.json")) as f:
            initial_epoch = int(json.load(f).get("epoch", 0))
    ds = train_stream(x_train, y_train, config.batch_size, config.seed,
                      start=initial_epoch * steps_per_epoch * config.batch_size)
    fit_start = time.time()
    try:
        trainer.fit(ds, epochs=config.epochs, steps_per_epoch=steps_per_epoch, callbacks=cbs,
                    shuffle=False, verbose=_verbose(config))
    except (tf.errors.UnavailableError, tf.errors.AbortedError,
            tf.errors.DeadlineExceededError) as e:
        if not _multi_worker(strategy):
            raise
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        cause = next((line for line in lines if "unhealthy" in line or "abort" in line.lower()),
                     lines[0] if lines else "")
        raise WorkerLostError(
            f"multi-worker training lost a worker or its connection ({type(e).__name__}: "
            f"{cause}). Finished epochs "
            f"are in {chief_backup}: restart every worker with the same command to "
            f"resume.") from e
    fit_seconds = time.time() - fit_start
    epochs_run = len(timer.seconds)

    test_accuracy = accuracy(lambda z: classifier(z, training=False), x_test, y_test)
    images = epochs_run * steps_per_epoch * config.batch_size
    steady = timer.seconds[1:]
    metrics = {
        "config": dataclasses.asdict(config),
        "settings": trainer.settings(),
        "strategy": type(strategy).__name__,
        "num_replicas": strategy.num_replicas_in_sync,
        "train_images": len(x_train),
        "steps_per_epoch": steps_per_epoch,
        "epochs_run_this_session": epochs_run,
        "resumed": resuming,
        "history": read_history(history_path),
        "test_accuracy": test_accuracy,
        "test_images": len(x_test),
        "fit_seconds": fit_seconds,
        "search_seconds": search_seconds,
        "wall_seconds": time.time() - start,
        "epoch_seconds": timer.seconds,
        "images_per_sec": images / fit_seconds if epochs_run else None,
        "images_per_sec_steady": (len(steady) * steps_per_epoch * config.batch_size
                                  / sum(steady)) if steady else None,
    }
    if search_stats is not None:
        metrics["search_success_rate"] = search_stats["success_rate"]
    logging.info("done: test accuracy %.4f, %.1f images/s, %.1fs", test_accuracy,
                 metrics["images_per_sec"] or 0.0, metrics["wall_seconds"])
    if chief:
        os.makedirs(model_dir, exist_ok=True)
        files.atomic_write(os.path.join(model_dir, "model.keras"), classifier.save, ".keras")
        if config.method == "rat":
            v = trainer.get_perturbations()
            # Fingerprints of the images V was searched on, so evaluation refuses them.
            meta = {"search_images": x_train}
            if config.perturbations_path and not config.refresh_every:  # V searched elsewhere
                _, given = attacks.load_perturbations(config.perturbations_path)
                meta = {attacks.FINGERPRINT_KEY: given.get(attacks.FINGERPRINT_KEY, [])}
            attacks.save_perturbations(os.path.join(model_dir, "perturbations.npz"), v, eps=eps,
                                       norm_type=config.norm, **meta)
        files.write_json(os.path.join(model_dir, "metrics.json"), metrics)
        shutil.rmtree(chief_backup, ignore_errors=True)  # every output is written
    else:
        shutil.rmtree(work_dir, ignore_errors=True)
    return metrics


def _remove_stale_temporaries(*folders: str) -> None:
    """Delete the temporary files of atomic writes a killed run left in ``folders``."""
    for folder in folders:
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if name.startswith(".tmp_"):
                    os.remove(os.path.join(folder, name))


SETTINGS_FILE = "run_settings.json"  # in a backup: the settings of the run that wrote it


def _check_resume(settings_path: str, config: TrainConfig) -> None:
    """Refuse to resume a backup written by a run with other settings, naming each one."""
    if not os.path.isfile(settings_path):
        logging.warning("resuming a backup with no %s: its settings cannot be checked",
                        SETTINGS_FILE)
        return
    with open(settings_path) as f:
        saved = json.load(f)
    now = json.loads(json.dumps(config.run_settings(), default=files.jsonable))
    diffs = [f"{k}: backup {saved.get(k)!r}, now {now.get(k)!r}"
             for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diffs:
        raise ValueError(
            f"{os.path.dirname(settings_path)} holds the backup of a run with other settings "
            f"({'; '.join(diffs)}): rerun with the same settings to resume it, or start over "
            f"with --restart (restart=True) or another --model_dir")


class HistoryCSV(keras.callbacks.Callback):
    """Per-epoch logs in a CSV file, one row per epoch, rewritten atomically every epoch.

    Columns are the union of every epoch's keys (a key missing in an epoch is empty), and a
    re-run epoch replaces its row, so a resumed run whose logs gain or lose a key (e.g. an
    epoch that refreshes V) never shifts a column.
    """

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        rows: dict[int, dict] = {}
        if os.path.isfile(self.path):
            with open(self.path, newline="") as f:
                rows = {int(r["epoch"]): r for r in csv.DictReader(f)}
        rows[epoch] = {"epoch": epoch, **{k: float(np.mean(v)) for k, v in
                                          (logs or {}).items()}}
        keys = ["epoch"] + sorted({k for r in rows.values() for k in r} - {"epoch"})

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                out = csv.DictWriter(f, fieldnames=keys, restval="")
                out.writeheader()
                for e in sorted(rows):
                    out.writerow(rows[e])
        files.atomic_write(self.path, write, ".csv")


class ClusterBackupAndRestore(keras.callbacks.BackupAndRestore):
    """``BackupAndRestore`` where every worker restores from the chief's backup, saved atomically.

    Each worker saves to its own ``backup_dir`` (no two processes write one file) but all
    restore ``restore_dir`` (the chief's), so a restarted cluster resumes at one epoch even if
    a worker died between the chief's save and its own. ``settings`` (the run's settings) are
    stored beside the first backup. The backup is NOT deleted at the end of training: the
    driver deletes it once the final outputs are written, so a kill in between resumes with
    nothing to re-train.
    """

    def __init__(self, backup_dir: str, restore_dir: str | None = None,
                 settings: dict | None = None):
        super().__init__(backup_dir)
        self.restore_dir = restore_dir or backup_dir
        self.settings = settings

    def on_train_end(self, logs: dict | None = None) -> None:
        pass  # keep the backup until the outputs are written (see the class docstring)

    def _save_model(self) -> None:
        """Save weights, then the epoch, each atomically: a kill never leaves half a file.

        A kill between the two re-runs the last epoch on resume; nothing is lost.
        """
        if self.settings is not None:
            files.write_json(os.path.join(os.path.dirname(self._weights_path), SETTINGS_FILE),
                             self.settings)
        files.atomic_write(self._weights_path,
                           lambda p: self.model.save_weights(p, overwrite=True), ".weights.h5")
        files.write_json(self._training_metadata_path,
                         {"epoch": self._current_epoch, "batch": self._last_batch_seen})

    def on_train_begin(self, logs: dict | None = None) -> None:
        own = (self._weights_path, self._training_metadata_path)
        self._weights_path = os.path.join(self.restore_dir, "latest.weights.h5")
        self._training_metadata_path = os.path.join(self.restore_dir, "training_metadata.json")
        try:
            super().on_train_begin(logs)
        finally:
            self._weights_path, self._training_metadata_path = own


class _EpochTimer(keras.callbacks.Callback):
    """Wall seconds of every epoch run in this session."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []
        self._t0 = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.time()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.time() - self._t0)
