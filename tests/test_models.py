"""Model zoo: every model builds for every dataset, normalizes inside and returns float32 logits."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from rat_tf import data, models

DATASETS = ("mnist", "fashion_mnist", "cifar10")


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_global_policy("mixed_float16")
    yield
    keras.mixed_precision.set_global_policy("float32")


def _images(shape, n=3, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, *shape)).astype(np.float32)


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_model_builds_and_returns_float32_logits(name, dataset):
    info = data.get_info(dataset)
    keras.utils.set_random_seed(0)
    model = models.build_model(name, dataset)
    assert model.input_shape == (None, *info.image_shape)
    assert model.output_shape == (None, info.num_classes)
    logits = model(_images(info.image_shape), training=False)
    assert logits.dtype == tf.float32 and tuple(logits.shape) == (3, info.num_classes)
    assert np.all(np.isfinite(logits.numpy()))
    # Gradients wrt the input exist (attacks need them).
    x = tf.constant(_images(info.image_shape, 2, seed=1))
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(model(x, training=False)[:, 0])
    grad = tape.gradient(loss, x)
    assert grad is not None and float(tf.reduce_max(tf.abs(grad))) > 0


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_mixed_float16_logits_stay_float32(mixed_float16, name, dataset):
    shape = data.get_info(dataset).image_shape
    model = models.build_model(name, dataset)
    assert model.get_layer("logits_dense").compute_dtype == "float16"
    logits = model(_images(shape), training=False)
    assert logits.dtype == tf.float32 and tuple(logits.shape) == (3, 10)
    assert np.all(np.isfinite(logits.numpy()))


def test_policy_is_float32_outside_fixture():
    assert keras.mixed_precision.global_policy().name == "float32"
    assert models.build_model("tiny_cnn", "mnist").get_layer("logits_dense").compute_dtype \
        == "float32"


@pytest.mark.parametrize("dataset,mean,std", [
    ("mnist", (0.1307,), (0.3081,)),
    ("fashion_mnist", (0.2860,), (0.3530,)),
    ("cifar10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
])
@pytest.mark.parametrize("name", ["mnist_cnn", "resnet20"])
def test_normalization_inside_model(name, dataset, mean, std):
    """Inputs are [0, 1] images; the model standardizes them with the dataset statistics."""
    shape = data.get_info(dataset).image_shape
    model = models.build_model(name, dataset)
    norm = keras.Model(model.input, model.get_layer("normalize").output)
    x = np.broadcast_to(np.asarray(mean, np.float32), (2, *shape)).copy()
    np.testing.assert_allclose(norm(x).numpy(), 0.0, atol=1e-5)
    out = norm(np.ones((1, *shape), np.float32)).numpy()
    expected = (1.0 - np.asarray(mean)) / np.asarray(std)
    np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-4)
    assert not any(v.trainable for v in model.get_layer("normalize").weights)


def test_same_seed_same_model():
    outs = []
    for _ in range(2):
        keras.utils.set_random_seed(7)
        outs.append(models.build_model("tiny_cnn", "mnist")(_images((28, 28, 1))).numpy())
    np.testing.assert_array_equal(outs[0], outs[1])


def test_parameter_counts():
    assert 0.26e6 < models.build_model("resnet20", "cifar10").count_params() < 0.28e6
    assert models.build_model("wide_resnet20", "cifar10").count_params() > 4e6
    mnist = models.build_model("mnist_cnn", "mnist").count_params()
    assert 0.25e6 < mnist < 0.27e6
    assert 6.5e6 < models.build_model("wide_mnist_cnn", "mnist").count_params() < 7.5e6


def test_build_under_mirrored_strategy():
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = models.build_model("tiny_cnn", "mnist")
    x = _images((28, 28, 1), 4)
    dist = strategy.experimental_distribute_dataset(
        data.make_dataset(x, np.zeros(4, np.int32), 4))
    batch = next(iter(dist))
    out = strategy.run(lambda b: model(b[0], training=False), args=(batch,))
    got = np.concatenate([t.numpy() for t in strategy.experimental_local_results(out)])
    np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-5, atol=1e-5)


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        models.build_model("vgg", "mnist")
