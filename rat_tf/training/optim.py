"""The optimizer of a run: learning-rate schedules (:class:`OneCycle`), optimizers and the
label-smoothed loss."""

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf

from rat_tf.training.config import TrainConfig


@keras.saving.register_keras_serializable("rat_tf")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then linear decay to 0 at
    ``total_steps``."""

    def __init__(self, peak: float, total_steps: int, warmup_steps: int = 0):
        self.peak, self.total_steps = float(peak), max(1, int(total_steps))
        self.warmup_steps = min(max(0, int(warmup_steps)), self.total_steps - 1)

    def __call__(self, step: tf.Tensor) -> tf.Tensor:
        step = tf.cast(step, tf.float32)
        up = step / float(max(1, self.warmup_steps))
        down = (self.total_steps - step) / float(self.total_steps - self.warmup_steps)
        return self.peak * tf.clip_by_value(tf.minimum(up, down), 0.0, 1.0)

    def get_config(self) -> dict:
        return {"peak": self.peak, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps}


def make_schedule(config: TrainConfig, total_steps: int, steps_per_epoch: int = 1) -> Any:
    """The learning rate of ``config`` over ``total_steps`` steps: a float or a Keras schedule
    (``steps_per_epoch`` turns ``warmup_epochs`` into steps)."""
    lr: Any = config.lr
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    if config.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(
            0.0 if warmup else config.lr, decay_steps=max(1, total_steps - warmup),
            warmup_target=config.lr if warmup else None, warmup_steps=warmup)
    elif config.lr_schedule == "onecycle":
        lr = OneCycle(config.lr, total_steps, warmup)
    elif config.lr_schedule == "step":
        bounds = [max(1, total_steps // 2), max(2, (3 * total_steps) // 4)]
        lr = keras.optimizers.schedules.PiecewiseConstantDecay(
            bounds, [config.lr, config.lr * 0.1, config.lr * 0.01])
    return lr


def make_optimizer(config: TrainConfig, total_steps: int, steps_per_epoch: int = 1
                   ) -> keras.optimizers.Optimizer:
    """The optimizer of ``config`` with its learning-rate schedule (:func:`make_schedule`)
    and, with ``ema_momentum``, Keras' moving average of the trainable weights (it replaces
    them when ``fit`` ends; batch-norm statistics are not averaged)."""
    lr = make_schedule(config, total_steps, steps_per_epoch)
    decay = {"weight_decay": config.weight_decay} if config.weight_decay else {}
    options = dict(decay, **({"use_ema": True, "ema_momentum": config.ema_momentum}
                             if config.ema_momentum else {}))
    if config.optimizer == "adam":
        optimizer = keras.optimizers.Adam(lr, **options)
    elif config.optimizer == "momentum":
        optimizer = keras.optimizers.SGD(lr, momentum=0.9, nesterov=True, **options)
    else:
        optimizer = keras.optimizers.SGD(lr, **options)
    if decay:  # decay the weights of convolutions and dense layers only
        optimizer.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    return optimizer


@keras.saving.register_keras_serializable("rat_tf")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy of class-id (or one-hot) labels smoothed by ``label_smoothing``."""

    def __init__(self, label_smoothing: float = 0.0, from_logits: bool = True,
                 num_classes: int = 10, name: str = "smoothed_sparse_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing, self.from_logits = float(label_smoothing), bool(from_logits)
        self.num_classes = int(num_classes)

    def call(self, y_true, y_pred):
        if y_true.shape.rank == 2 and y_true.shape[-1] == self.num_classes:
            onehot = tf.cast(y_true, y_pred.dtype)
        else:
            onehot = tf.one_hot(tf.cast(tf.reshape(y_true, [-1]), tf.int32), self.num_classes,
                                dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(
            onehot, y_pred, from_logits=self.from_logits, label_smoothing=self.label_smoothing)

    def get_config(self) -> dict:
        return {**super().get_config(), "label_smoothing": self.label_smoothing,
                "from_logits": self.from_logits, "num_classes": self.num_classes}
