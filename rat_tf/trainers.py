"""The trainers: RAT and its baselines (standard, FGSM-AT, PGD-AT) as Keras models.

Every method is a small ``keras.Model`` that wraps a classifier and overrides ``train_step``,
so ``fit``, ``evaluate``, callbacks, checkpoints and ``tf.distribute`` strategies work as usual;
``call`` delegates to the classifier. They are registered Keras serialisables: a trainer saves
and loads as a ``.keras`` file with its classifier.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from rat_tf import attacks, keras_compat, models, ops, perturbation_files

METHODS = ("standard", "rat", "fgsm_at", "pgd_at")
ATTACK_OF = {"fgsm_at": "fgsm", "pgd_at": "pgd"}  # the registered attack of each AT method
TARGET_MODES = ("one", "all", "worst")  # RAT targets per image per step
BATCH_MODES = ("append", "replace")
FGSM_RS_ALPHA = 1.25  # Wong et al. (2020): FGSM step = 1.25 eps from a uniform random start


def _replicas() -> int:
    return tf.distribute.get_strategy().num_replicas_in_sync


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
        """Build the compiled state from the known input signature (see keras_compat)."""
        del iterator, data_batch
        keras_compat.symbolic_build(
            self, (tf.zeros((1, *self.image_shape)), tf.zeros((1,), tf.int32)))

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
        loss = keras_compat.compiled_loss(self, x, y, outputs, sample_weight, training)
        keras_compat.track_loss(self, loss * tf.cast(_replicas(), loss.dtype), tf.shape(x)[0])
        return loss

    def _fit_on(self, x: tf.Tensor | Callable[[tf.Tensor], tf.Tensor], y: tf.Tensor,
                sample_weight: tf.Tensor | None = None, *, watched: tf.Tensor | None = None,
                side_loss: Callable[[tf.Tensor], tf.Tensor] | None = None):
        """One optimizer step on (x, y); returns the classifier's outputs (training mode).

        With ``watched``, ``x`` is a function of it and the step also returns the gradient of
        ``side_loss(outputs)`` with respect to ``watched``, from the same forward pass.
        """
        with tf.GradientTape(persistent=watched is not None) as tape:
            if watched is not None:
                tape.watch(watched)
                x = x(watched)
            outputs = self.classifier(x, training=True)
            loss = self._track_loss(x, y, outputs, sample_weight, training=True)
            scaled = self.optimizer.scale_loss(loss)
            side = side_loss(outputs) if watched is not None else None
        weights = self.trainable_weights
        grads = tape.gradient(scaled, weights)
        side_grad = None if watched is None else tape.gradient(side, watched)
        del tape
        self.optimizer.apply_gradients(zip(grads, weights))
        return outputs if watched is None else (outputs, side_grad)

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
        checks = [
            tf.debugging.assert_greater_equal(tf.reduce_min(pixels),
                                              tf.constant(lo, tf.float32), message=message),
            tf.debugging.assert_less_equal(tf.reduce_max(pixels), tf.constant(hi, tf.float32),
                                           message=message),
            tf.debugging.assert_non_negative(y, message="labels must be class ids >= 0"),
            tf.debugging.assert_less(y, self.num_classes,
                                     message=f"labels must be class ids < {self.num_classes}"),
        ]
        # The step's ops read x and y only after the checks ran, so a bad batch is named by
        # the check and never reaches the loss (whose own error would come first otherwise).
        with tf.control_dependencies([c for c in checks if c is not None]):
            x, y = tf.identity(x), tf.identity(y)
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
        return keras_compat.step_logs(results, self.distribute_strategy)

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


@_SERIALIZABLE
class AdversarialTrainingModel(StandardModel):
    """FGSM-AT with random init (Wong et al. 2020; N-FGSM, de Jorge et al. 2022) or PGD-AT
    (Madry et al. 2018).

    Each step replaces the batch by adversarial examples computed against the current
    weights and trains on them with their true labels: ``attacks.fgsm`` from a uniform start
    in the ball of radius ``init_scale * eps`` with step ``step_size`` (1.25 eps), its
    gradient taken at the unclipped start unless ``box_start`` (Wong et al.'s MNIST code) and
    the result projected to the eps ball unless ``project=False`` (N-FGSM: ``init_scale=2``,
    ``step_size=eps``, ``project=False``, ``box_start=True``); or ``attacks.pgd`` from a random
    start, each example frozen once misclassified with ``freeze_fooled`` (Wong et al.'s MNIST
    PGD training; ``init_scale``, ``box_start`` and ``project`` are FGSM-AT settings). The random
    starts
    are drawn per step from the seed for the global batch, so runs are reproducible and match
    across strategies. In the training logs the compiled metrics (and
    ``adversarial_accuracy``) are on the adversarial batch the step fits; validation is clean.
    """

    def __init__(self, classifier: keras.Model, method: str = "pgd_at", *, eps: float = 0.3,
                 norm: str = "linf", steps: int = 10, step_size: float | None = None,
                 init_scale: float = 1.0, box_start: bool = False, project: bool = True,
                 freeze_fooled: bool = False, name: str | None = None, **kwargs):
        checked = self.check_settings(method=method, eps=eps, norm=norm, steps=steps,
                                      step_size=step_size, init_scale=init_scale)
        super().__init__(classifier, name=name or f"{method}_trainer", **kwargs)
        self.eps, self.steps, self.step_size = checked
        self.method, self.norm = method, ops.check_norm(norm)
        self.init_scale, self.box_start = float(init_scale), bool(box_start)
        self.project, self.freeze_fooled = bool(project), bool(freeze_fooled)
        self.adversarial_accuracy = keras.metrics.SparseCategoricalAccuracy(
            name="adversarial_accuracy")

    @staticmethod
    def check_settings(*, method: str = "pgd_at", eps: float = 0.3, norm: str = "linf",
                       steps: int = 10, step_size: float | None = None,
                       init_scale: float = 1.0, box_start: bool = False, project: bool = True,
                       freeze_fooled: bool = False) -> tuple[float, int, float]:
        """(eps, steps, step size) of valid settings; ValueError naming the first bad one."""
        del box_start, project, freeze_fooled  # any bool is valid
        if method not in ("fgsm_at", "pgd_at"):
            raise ValueError(f"adversarial training method must be fgsm_at or pgd_at, got "
                             f"{method!r}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        if not (init_scale > 0 and math.isfinite(init_scale)):
            raise ValueError(f"init_scale must be positive, got {init_scale}")
        ops.check_norm(norm)
        if method == "fgsm_at":
            steps = 1
            step_size = step_size or FGSM_RS_ALPHA * eps
        if int(steps) < 1:
            raise ValueError(f"PGD steps must be >= 1, got {steps}")
        size = float(attacks.pgd_step_size(float(eps), int(steps), step_size or None))
        if not size > 0:
            raise ValueError(f"step_size must be positive, got {step_size}")
        return float(eps), int(steps), size

    def get_config(self) -> dict:
        return {**super().get_config(), "method": self.method, "eps": self.eps,
                "norm": self.norm, "steps": self.steps, "step_size": self.step_size,
                "init_scale": self.init_scale, "box_start": self.box_start,
                "project": self.project, "freeze_fooled": self.freeze_fooled}

    def adversarial_batch(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """Adversarial examples of (x, y) against the current weights (inference mode)."""
        model_fn = lambda z: self.logits(z, training=False)  # noqa: E731
        radius = self.eps * (self.init_scale if self.method == "fgsm_at" else 1.0)
        start = self._global_draw(2, tf.shape(x), lambda shape, seed: ops.random_in_ball(
            shape, radius, self.norm, seed, x.dtype))
        attack = attacks.get_attack(ATTACK_OF[self.method]).fn
        if self.method == "fgsm_at":
            x_adv = attack(model_fn, x, y, self.eps, norm=self.norm, rand_init=True,
                           step_size=self.step_size, init=start, init_scale=self.init_scale,
                           box_start=self.box_start, project=self.project,
                           clip_values=self.clip_values)
        else:
            x_adv = attack(model_fn, x, y, self.eps, step_size=self.step_size,
                           steps=self.steps, norm=self.norm, rand_init=True, restarts=1,
                           init=start, freeze_fooled=self.freeze_fooled,
                           clip_values=self.clip_values)
        return tf.stop_gradient(tf.cast(x_adv, x.dtype))

    def train_step(self, data):
        x, y, sw = self._unpack(data)
        x_adv = self.adversarial_batch(x, y)
        outputs = self._fit_on(x_adv, y, sw)
        self.compute_metrics(x_adv, y, outputs, sw)
        self.adversarial_accuracy.update_state(y, outputs, sample_weight=sw)
        return self._results(self.adversarial_accuracy)

    def settings(self) -> dict:
        out = {**super().settings(), "eps": self.eps, "norm": self.norm, "steps": self.steps,
               "step_size": self.step_size}
        if self.method == "fgsm_at":
            out.update(init_scale=self.init_scale, box_start=self.box_start,
                       project=self.project)
        else:
            out.update(freeze_fooled=self.freeze_fooled)
        return out


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
