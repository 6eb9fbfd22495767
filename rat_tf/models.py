"""Classifiers: the model zoo, and what rat_tf needs to know about any built Keras classifier.

Zoo models are built for a dataset of :data:`rat_tf.data.DATASETS` (its image shape, classes
and channel statistics): they take [0, 1] images, normalize inside and return float32 logits.
A user's own classifier (Sequential, functional or subclassed) is described by
:func:`describe` (image shape, number of classes, logits or probabilities) and turned into an
``x -> logits`` callable by :func:`logits_fn`, which every attack and trainer uses.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from keras import layers

from rat_tf import data

def _inputs_normalized(info: data.DatasetInfo):
    """The image input and its normalisation by the dataset's channel statistics."""
    inputs = keras.Input(shape=info.image_shape, name="image")
    x = layers.Normalization(mean=list(info.mean), variance=[s * s for s in info.std],
                             name="normalize")(inputs)
    return inputs, x


def _info(dataset: str | data.DatasetInfo) -> data.DatasetInfo:
    return dataset if isinstance(dataset, data.DatasetInfo) else data.get_info(dataset)


def _logits(x, info: data.DatasetInfo, num_classes: int | None):
    x = layers.Dense(num_classes or info.num_classes, name="logits_dense")(x)
    # float32 logits even under a mixed-precision policy.
    return layers.Activation("linear", dtype="float32", name="logits")(x)


def _mnist_convnet(info: data.DatasetInfo, num_classes: int | None,
                   widths: tuple[int, int, int, int], name: str) -> keras.Model:
    """conv3x3 - conv3x3 - pool - conv3x3 - pool - dense, with ``widths`` units in that order."""
    inputs, x = _inputs_normalized(info)
    x = layers.Conv2D(widths[0], 3, activation="relu", name="conv1")(x)
    x = layers.Conv2D(widths[1], 3, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(widths[2], 3, activation="relu", name="conv3")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(widths[3], activation="relu", name="fc1")(x)
    return keras.Model(inputs, _logits(x, info, num_classes), name=name)


def mnist_cnn(dataset: str | data.DatasetInfo = "mnist", num_classes: int | None = None
              ) -> keras.Model:
    """Small convnet of the kind used for MNIST in adversarial-robustness papers (0.26M)."""
    return _mnist_convnet(_info(dataset), num_classes, (32, 64, 64, 128), "mnist_cnn")


def wide_mnist_cnn(dataset: str | data.DatasetInfo = "mnist", num_classes: int | None = None
                   ) -> keras.Model:
    """``mnist_cnn`` with 64-128-256 channels and 1,024 dense units (6.9M, ~5x its compute).

    The MNIST model of the experiment's small/full budgets: with the same RAT budget it ends
    more robust than ``mnist_cnn`` (capacity matters, as for adversarial training; see
    docs/experiments.md).
    """
    return _mnist_convnet(_info(dataset), num_classes, (64, 128, 256, 1024), "wide_mnist_cnn")


def _resnet_v1(info: data.DatasetInfo, num_classes: int | None, depth: int, width: int,
               name: str) -> keras.Model:
    if (depth - 2) % 6:
        raise ValueError(f"ResNet v1 depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    inputs, x = _inputs_normalized(info)

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
    return keras.Model(inputs, _logits(x, info, num_classes), name=name)


def resnet20(dataset: str | data.DatasetInfo = "cifar10", num_classes: int | None = None
             ) -> keras.Model:
    """CIFAR ResNet-20 v1 (He et al. 2016), 0.27M parameters."""
    return _resnet_v1(_info(dataset), num_classes, 20, 16, "resnet20")


def wide_resnet20(dataset: str | data.DatasetInfo = "cifar10", num_classes: int | None = None
                  ) -> keras.Model:
    """ResNet-20 v1 with 4x wider stages (64-128-256 channels): the wider CIFAR model."""
    return _resnet_v1(_info(dataset), num_classes, 20, 64, "wide_resnet20")


def _fast_cifar_net(info: data.DatasetInfo, num_classes: int | None,
                    widths: tuple[int, int, int], name: str) -> keras.Model:
    """A 2x2 stem conv, then per width: conv3x3 - maxpool - BN - ReLU - conv3x3 - BN - ReLU;
    global max pooling and the logits."""
    inputs, x = _inputs_normalized(info)
    x = layers.Conv2D(24, 2, name="stem")(x)
    x = layers.ReLU()(x)
    for i, width in enumerate(widths):
        for j in range(2):
            x = layers.Conv2D(width, 3, padding="same", use_bias=False,
                              kernel_initializer="he_normal", name=f"block{i + 1}_conv{j + 1}")(x)
            if j == 0:
                x = layers.MaxPooling2D(2)(x)
            x = layers.ReLU()(layers.BatchNormalization(momentum=0.9)(x))
    x = layers.GlobalMaxPooling2D()(x)
    return keras.Model(inputs, _logits(x, info, num_classes), name=name)


def fast_cifar_net(dataset: str | data.DatasetInfo = "cifar10", num_classes: int | None = None
                   ) -> keras.Model:
    """A small fast CIFAR net in the style of the airbench / DAWNBench nets: no residuals,
    32-64-128 channels, 0.3M parameters, about half the compute of ``resnet20``."""
    return _fast_cifar_net(_info(dataset), num_classes, (32, 64, 128), "fast_cifar_net")


def tiny_cnn(dataset: str | data.DatasetInfo = "mnist", num_classes: int | None = None
             ) -> keras.Model:
    """A very small convnet for fast tests on any dataset."""
    info = _info(dataset)
    inputs, x = _inputs_normalized(info)
    x = layers.Conv2D(16, 3, strides=2, activation="relu", name="conv1")(x)
    x = layers.Conv2D(32, 3, strides=2, activation="relu", name="conv2")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(64, activation="relu", name="fc1")(x)
    return keras.Model(inputs, _logits(x, info, num_classes), name="tiny_cnn")


def _torch_init(fan_in: int) -> dict:
    """PyTorch's default initialisation of a layer with ``fan_in`` inputs: weights and biases
    uniform in +-1/sqrt(fan_in) (kaiming_uniform with a = sqrt(5))."""
    bound = 1.0 / float(np.sqrt(fan_in))
    return {"kernel_initializer": keras.initializers.RandomUniform(-bound, bound),
            "bias_initializer": keras.initializers.RandomUniform(-bound, bound)}


def wong_mnist_net(dataset: str | data.DatasetInfo = "mnist", num_classes: int | None = None
                   ) -> keras.Model:
    """The MNIST net of Wong et al. (2020) for FGSM-RS: conv4x4/2 (16) - conv4x4/2 (32) - dense
    100, on raw [0, 1] pixels (no normalisation layer) with PyTorch's default initialisation,
    as published; 0.17M parameters."""
    info = _info(dataset)
    k = num_classes or info.num_classes
    channels = info.image_shape[-1]
    inputs = keras.Input(shape=info.image_shape, name="image")
    x = layers.ZeroPadding2D(1)(inputs)
    x = layers.Conv2D(16, 4, strides=2, activation="relu", name="conv1",
                      **_torch_init(16 * channels))(x)
    x = layers.ZeroPadding2D(1)(x)
    x = layers.Conv2D(32, 4, strides=2, activation="relu", name="conv2",
                      **_torch_init(16 * 16))(x)
    x = layers.Flatten()(x)
    x = layers.Dense(100, activation="relu", name="fc1", **_torch_init(int(x.shape[-1])))(x)
    x = layers.Dense(k, name="logits_dense", **_torch_init(100))(x)
    return keras.Model(inputs, layers.Activation("linear", dtype="float32", name="logits")(x),
                       name="wong_mnist_net")


def madry_mnist_cnn(dataset: str | data.DatasetInfo = "mnist", num_classes: int | None = None
                    ) -> keras.Model:
    """The MNIST challenge CNN of Madry et al. (2018): conv5x5 (32) - pool - conv5x5 (64) -
    pool - dense 1024, on raw [0, 1] pixels, initialised as its TensorFlow code; 3.3M
    parameters."""
    info = _info(dataset)
    init = {"kernel_initializer": keras.initializers.TruncatedNormal(stddev=0.1),
            "bias_initializer": keras.initializers.Constant(0.1)}  # as the challenge code
    inputs = keras.Input(shape=info.image_shape, name="image")
    x = layers.Conv2D(32, 5, padding="same", activation="relu", name="conv1", **init)(inputs)
    x = layers.MaxPooling2D(2, padding="same")(x)
    x = layers.Conv2D(64, 5, padding="same", activation="relu", name="conv2", **init)(x)
    x = layers.MaxPooling2D(2, padding="same")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(1024, activation="relu", name="fc1", **init)(x)
    x = layers.Dense(num_classes or info.num_classes, name="logits_dense", **init)(x)
    return keras.Model(inputs, layers.Activation("linear", dtype="float32", name="logits")(x),
                       name="madry_mnist_cnn")


def preact_resnet18(dataset: str | data.DatasetInfo = "cifar10", num_classes: int | None = None
                    ) -> keras.Model:
    """PreAct ResNet-18 (He et al. 2016), the CIFAR-10 model of the FGSM-RS, N-FGSM and PGD-AT
    papers (11.2M parameters; a GPU model)."""
    info = _info(dataset)
    inputs, x = _inputs_normalized(info)

    def conv(x, filters, kernel=3, stride=1):
        return layers.Conv2D(filters, kernel, strides=stride, padding="same",
                             use_bias=False)(x)

    x = conv(x, 64)
    for stage, filters in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            out = layers.ReLU()(layers.BatchNormalization()(x))
            shortcut = x
            if stride != 1 or x.shape[-1] != filters:
                shortcut = conv(out, filters, 1, stride)
            y = conv(out, filters, 3, stride)
            y = conv(layers.ReLU()(layers.BatchNormalization()(y)), filters)
            x = layers.Add()([y, shortcut])
    x = layers.ReLU()(layers.BatchNormalization()(x))
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, _logits(x, info, num_classes), name="preact_resnet18")


MODELS: dict[str, Callable[..., keras.Model]] = {
    "mnist_cnn": mnist_cnn,
    "wide_mnist_cnn": wide_mnist_cnn,
    "resnet20": resnet20,
    "wide_resnet20": wide_resnet20,
    "fast_cifar_net": fast_cifar_net,
    "tiny_cnn": tiny_cnn,
    "wong_mnist_net": wong_mnist_net,
    "madry_mnist_cnn": madry_mnist_cnn,
    "preact_resnet18": preact_resnet18,
}


def build_model(name: str, dataset: str | data.DatasetInfo, num_classes: int | None = None
                ) -> keras.Model:
    """A zoo model by name for the images, classes and channel statistics of ``dataset``
    (``num_classes`` overrides its class count); call inside the strategy scope."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](_info(dataset), num_classes)


# --------------------------------------------------------------------------- any classifier
@dataclasses.dataclass(frozen=True)
class ClassifierInfo:
    """What rat_tf reads off a built classifier: its input image shape, classes and outputs."""

    image_shape: tuple[int, ...]
    num_classes: int
    from_logits: bool


def input_image_shape(classifier: keras.Model, input_shape: Sequence[int] | None = None
                      ) -> tuple[int, ...]:
    """(H, W, C) of a built single-input classifier (from its inputs or its first build call).

    ``input_shape`` ((H, W, C), or with a leading batch dimension) is used only when the
    classifier does not say it: an unbuilt classifier is built by one call on zeros of that
    shape. A built classifier is never rebuilt.
    """
    if not isinstance(classifier, keras.Model):
        raise ValueError(f"classifier must be a keras.Model, got {type(classifier).__name__}")
    shape = None
    try:
        shape = classifier.input_shape
    except (AttributeError, ValueError):
        built = getattr(classifier, "_build_shapes_dict", None) or {}
        if len(built) == 1:
            shape = next(iter(built.values()))
    if shape is None:
        if input_shape is None:
            raise ValueError(f"classifier {classifier.name!r} is not built and has no input "
                             f"shape: call it once on a batch of images, or pass input_shape="
                             f"(H, W, C)")
        shape = tuple(input_shape)
        shape = (None, *shape) if len(shape) == 3 else shape
        classifier(tf.zeros((1, *shape[1:])), training=False)
    if isinstance(shape, list) and all(d is None or isinstance(d, int) for d in shape):
        shape = tuple(shape)
    if isinstance(shape, (list, dict)) or len(shape) != 4 or any(d is None for d in shape[1:]):
        raise ValueError(f"classifier {classifier.name!r} must take one batch of images "
                         f"[N, H, W, C] with known H, W, C; its input shape is {shape}")
    return tuple(int(d) for d in shape[1:])


def _softmax_input(t: tf.Tensor) -> tf.Tensor | None:
    """The logits a graph tensor was computed from by a final softmax, or None."""
    logits = getattr(t, "_keras_logits", None)
    if logits is not None:
        return logits
    op = getattr(t, "op", None)
    while op is not None and op.type in ("Identity", "Cast") and op.inputs:
        op = op.inputs[0].op
    if op is not None and op.type == "Softmax":
        return op.inputs[0]
    return None


def _traced_output(classifier: keras.Model, image_shape: tuple[int, ...]) -> tf.Tensor:
    fn = tf.function(lambda x: classifier(x, training=False))
    return fn.get_concrete_function(tf.TensorSpec((None, *image_shape))).structured_outputs


def describe(classifier: keras.Model, *, input_shape: Sequence[int] | None = None,
             from_logits: bool | None = None) -> ClassifierInfo:
    """Image shape, number of classes and output kind of a built image classifier.

    ``from_logits=None`` detects a final softmax in the traced graph (any model kind); a
    classifier whose outputs look like probabilities without one is an error asking for an
    explicit ``from_logits``.
    """
    image_shape = input_image_shape(classifier, input_shape)
    out = _traced_output(classifier, image_shape)
    if not isinstance(out, tf.Tensor) or out.shape.rank != 2 or out.shape[-1] is None:
        raise ValueError(f"classifier {classifier.name!r} must return one tensor [N, K] of "
                         f"class scores, got {out}")
    num_classes = int(out.shape[-1])
    if num_classes < 2:
        raise ValueError(f"classifier {classifier.name!r} returns {num_classes} score(s) per "
                         f"image: a classifier of K >= 2 classes is needed")
    if from_logits is None:
        from_logits = _softmax_input(out) is None
        if not from_logits:
            logging.info("classifier %s ends in a softmax: its probabilities are used as "
                         "from_logits=False (the logits before the softmax feed the attacks)",
                         classifier.name)
        elif tf.executing_eagerly():
            probe = np.random.default_rng(0).uniform(0, 1, (8, *image_shape)).astype(np.float32)
            p = np.asarray(classifier(probe, training=False), np.float64)
            if np.all(p >= 0) and np.allclose(p.sum(-1), 1.0, atol=1e-4):
                raise ValueError(
                    f"classifier {classifier.name!r} returns rows that sum to 1, like "
                    f"probabilities, but no final softmax was found: pass from_logits=False "
                    f"if they are probabilities, from_logits=True if they are logits")
    return ClassifierInfo(image_shape, num_classes, bool(from_logits))


def logits_fn(classifier: keras.Model, from_logits: bool = True
              ) -> Callable[..., tf.Tensor]:
    """``(x, training=False) -> float32 logits`` of a classifier that returns logits or
    probabilities.

    For probabilities the logits are the input of the final softmax, read off the graph
    (eager calls run through a ``tf.function`` to have one), so attack gradients do not vanish
    where the softmax saturates; log-probabilities where no softmax op is found.
    """
    if from_logits:
        return lambda x, training=False: tf.cast(classifier(x, training=training), tf.float32)

    def from_graph(x, training=False):
        p = classifier(x, training=training)
        z = _softmax_input(p)
        if z is None:
            z = tf.math.log(tf.maximum(tf.cast(p, tf.float32), 1e-30))
        return tf.cast(z, tf.float32)

    traced = {True: tf.function(lambda x: from_graph(x, True), reduce_retracing=True),
              False: tf.function(lambda x: from_graph(x, False), reduce_retracing=True)}

    def fn(x, training=False):
        if tf.executing_eagerly():
            return traced[bool(training)](x)
        return from_graph(x, training)

    return fn


def as_model_fn(model: keras.Model | Callable[[tf.Tensor], tf.Tensor]
                ) -> Callable[[tf.Tensor], tf.Tensor]:
    """An inference ``x -> logits`` callable: a Keras classifier (logits or softmax, detected
    by :func:`describe`) or a trainer wrapping one; any other callable is taken as it is."""
    if not isinstance(model, keras.Model):
        return model  # a callable (e.g. one this function returned) is taken as it is
    fn = getattr(model, "_rat_tf_logits", None)  # a trainer's
    classifier = model.classifier if fn is not None else model
    if fn is None:
        fn = logits_fn(classifier, describe(classifier).from_logits)
    wrapped = lambda x: fn(x, training=False)  # noqa: E731
    wrapped.classifier = classifier
    return wrapped
