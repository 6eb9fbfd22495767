"""Model zoo: classifiers that take [0, 1] images, normalize inside and return float32 logits."""

from __future__ import annotations

from typing import Callable

import keras
from keras import layers

# Per-dataset channel statistics, used by the in-model normalization.
_STATS = {
    1: ((0.1307,), (0.3081,)),  # MNIST-like grayscale
    3: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),  # CIFAR-10
}


def _inputs_normalized(input_shape: tuple[int, int, int]):
    inputs = keras.Input(shape=input_shape, name="image")
    mean, std = _STATS.get(input_shape[-1], ((0.5,) * input_shape[-1], (0.5,) * input_shape[-1]))
    x = layers.Normalization(mean=list(mean), variance=[s * s for s in std], name="normalize")(
        inputs)
    return inputs, x


def _logits(x, num_classes: int):
    x = layers.Dense(num_classes, name="logits_dense")(x)
    # float32 logits even under a mixed-precision policy.
    return layers.Activation("linear", dtype="float32", name="logits")(x)


def _mnist_convnet(input_shape, num_classes: int, widths: tuple[int, int, int, int], name: str
                   ) -> keras.Model:
    """conv3x3 - conv3x3 - pool - conv3x3 - pool - dense, with ``widths`` units in that order."""
    inputs, x = _inputs_normalized(input_shape)
    x = layers.Conv2D(widths[0], 3, activation="relu", name="conv1")(x)
    x = layers.Conv2D(widths[1], 3, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(widths[2], 3, activation="relu", name="conv3")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(widths[3], activation="relu", name="fc1")(x)
    return keras.Model(inputs, _logits(x, num_classes), name=name)


def mnist_cnn(input_shape=(28, 28, 1), num_classes: int = 10) -> keras.Model:
    """Small convnet of the kind used for MNIST in adversarial-robustness papers (0.26M)."""
    return _mnist_convnet(input_shape, num_classes, (32, 64, 64, 128), "mnist_cnn")


def wide_mnist_cnn(input_shape=(28, 28, 1), num_classes: int = 10) -> keras.Model:
    """``mnist_cnn`` with 64-128-256 channels and 1,024 dense units (6.9M, ~5x its compute).

    The MNIST model of the experiment's small/full budgets: with the same RAT budget it ends
    more robust than ``mnist_cnn`` (capacity matters, as for adversarial training; measured in
    ``rat_tf.experiment``).
    """
    return _mnist_convnet(input_shape, num_classes, (64, 128, 256, 1024), "wide_mnist_cnn")


def _resnet_v1(input_shape, num_classes: int, depth: int, width: int, name: str) -> keras.Model:
    if (depth - 2) % 6:
        raise ValueError(f"ResNet v1 depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    inputs, x = _inputs_normalized(input_shape)

    def conv(x, filters, stride=1):
        return layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                             kernel_initializer="he_normal",
                             kernel_regularizer=keras.regularizers.L2(1e-4))(x)

    x = conv(x, width)
    x = layers.ReLU()(layers.BatchNormalization()(x))
    for stage in range(3):
        filters = width * 2 ** stage
        for block in range(n):
            stride = 2 if stage > 0 and block == 0 else 1
            y = layers.ReLU()(layers.BatchNormalization()(conv(x, filters, stride)))
            y = layers.BatchNormalization()(conv(y, filters))
            if stride != 1 or x.shape[-1] != filters:
                x = layers.Conv2D(filters, 1, strides=stride, use_bias=False)(x)
                x = layers.BatchNormalization()(x)
            x = layers.ReLU()(layers.Add()([x, y]))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, _logits(x, num_classes), name=name)


def resnet20(input_shape=(32, 32, 3), num_classes: int = 10) -> keras.Model:
    """CIFAR ResNet-20 v1 (He et al. 2016), 0.27M parameters."""
    return _resnet_v1(input_shape, num_classes, 20, 16, "resnet20")


def wide_resnet20(input_shape=(32, 32, 3), num_classes: int = 10) -> keras.Model:
    """ResNet-20 v1 with 4x wider stages (64-128-256 channels): the wider CIFAR model."""
    return _resnet_v1(input_shape, num_classes, 20, 64, "wide_resnet20")


def tiny_cnn(input_shape=(28, 28, 1), num_classes: int = 10) -> keras.Model:
    """A very small convnet for fast tests on any dataset."""
    inputs, x = _inputs_normalized(input_shape)
    x = layers.Conv2D(16, 3, strides=2, activation="relu", name="conv1")(x)
    x = layers.Conv2D(32, 3, strides=2, activation="relu", name="conv2")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(64, activation="relu", name="fc1")(x)
    return keras.Model(inputs, _logits(x, num_classes), name="tiny_cnn")


MODELS: dict[str, Callable[..., keras.Model]] = {
    "mnist_cnn": mnist_cnn,
    "wide_mnist_cnn": wide_mnist_cnn,
    "resnet20": resnet20,
    "wide_resnet20": wide_resnet20,
    "tiny_cnn": tiny_cnn,
}


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int = 10
                ) -> keras.Model:
    """Build a registered model by name; call inside the strategy scope."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](tuple(input_shape), num_classes)
