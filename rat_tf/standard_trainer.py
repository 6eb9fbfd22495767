"""The base trainer :class:`StandardModel` (clean training), which every trainer of
:mod:`rat_tf.trainers` extends, and what trainers share."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import keras
import tensorflow as tf

from rat_tf import keras_compat, models, ops

SERIALIZABLE = keras.saving.register_keras_serializable(package="rat_tf")


def replicas() -> int:
    """The replicas of the current strategy."""
    return tf.distribute.get_strategy().num_replicas_in_sync


@SERIALIZABLE
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
        full = draw(tf.concat([[n * replicas()], shape[1:]], 0), seed)
        return full[replica * n:(replica + 1) * n]

    def _track_loss(self, x: tf.Tensor, y: tf.Tensor, outputs: tf.Tensor,
                    sample_weight: tf.Tensor | None, training: bool) -> tf.Tensor:
        """The compiled loss of a batch (scaled by 1/replicas), its real value tracked."""
        loss = keras_compat.compiled_loss(self, x, y, outputs, sample_weight, training)
        keras_compat.track_loss(self, loss * tf.cast(replicas(), loss.dtype), tf.shape(x)[0])
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
