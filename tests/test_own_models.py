"""The user's own Keras classifier, end to end: a zoo of user-style models written here (not
taken from rat_tf.models) through the search, every trainer's fit (numpy and tf.data, with
sample weights and a .keras ModelCheckpoint), save -> load_model, export -> plain
tf.saved_model.load; and a clear error for every bad input.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from rat_tf import attacks, export, models, perturbation_files, trainers, training

EPS = 0.3


@keras.saving.register_keras_serializable(package="rat_tf_tests")
class Net(keras.Model):
    """A subclassed classifier, as a user writes one."""

    def __init__(self, num_classes=10, **kwargs):
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.conv = keras.layers.Conv2D(8, 3, strides=2, activation="relu")
        self.flat = keras.layers.Flatten()
        self.out = keras.layers.Dense(num_classes)

    def call(self, x, training=False):
        return self.out(self.flat(self.conv(x)))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


def _conv_stack():
    return [keras.layers.Conv2D(8, 3, strides=2, activation="relu"), keras.layers.Flatten()]


def _build(kind: str, x: np.ndarray, y: np.ndarray) -> keras.Model:
    keras.utils.set_random_seed(1)
    if kind == "sequential_input":
        return keras.Sequential([keras.Input((28, 28, 1)), *_conv_stack(),
                                 keras.layers.Dense(10)], name="my_seq")
    if kind == "sequential_fit":  # no Input: built by its first fit
        m = keras.Sequential([*_conv_stack(), keras.layers.Dense(10)], name="my_seq_fit")
        m.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        m.fit(x[:64], y[:64], epochs=1, verbose=0)
        return m
    if kind == "functional_bn_dropout":
        inputs = keras.Input((28, 28, 1))
        h = keras.layers.Conv2D(8, 3, strides=2)(inputs)
        h = keras.layers.ReLU()(keras.layers.BatchNormalization()(h))
        h = keras.layers.Dropout(0.2)(keras.layers.Flatten()(h))
        return keras.Model(inputs, keras.layers.Dense(10)(h), name="my_func")
    if kind == "subclassed":
        m = Net(name="my_net")
        m(x[:2])
        return m
    if kind == "softmax":
        return keras.Sequential([keras.Input((28, 28, 1)), *_conv_stack(),
                                 keras.layers.Dense(10, activation="softmax")], name="my_soft")
    if kind == "uint8_range":  # takes 0..255 images
        return keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Rescaling(1 / 255),
                                 *_conv_stack(), keras.layers.Dense(10)], name="my_255")
    raise AssertionError(kind)


KINDS = ["sequential_input", "sequential_fit", "functional_bn_dropout", "subclassed", "softmax",
         "uint8_range"]


@pytest.fixture(scope="module")
def slices(mnist_arrays):
    x_train, y_train, x_test, y_test = mnist_arrays
    return x_train[:256], y_train[:256], x_test[:128], y_test[:128]


def _settings(method, clip):
    scale = clip[1]
    if method == "rat":
        return {"targets_per_image": "one", "eps": EPS * scale}
    if method in ("fgsm_at", "pgd_at"):
        return {"eps": EPS * scale, "steps": 2}
    return {}


@pytest.mark.parametrize("kind", KINDS)
def test_own_classifier_end_to_end(kind, slices, tmp_path):
    x, y, x_test, y_test = slices
    clip = (0.0, 255.0) if kind == "uint8_range" else (0.0, 1.0)
    x, x_test = x * clip[1], x_test * clip[1]
    model = _build(kind, x, y)
    info = models.describe(model)
    assert (info.image_shape, info.num_classes, info.from_logits) == (
        (28, 28, 1), 10, kind != "softmax")

    # The search: num_classes, shape and output kind all come from the model.
    V, stats = attacks.targeted_universal(model, x, y, EPS * clip[1], max_passes=1,
                                          clip_values=clip)
    assert V.shape == (10, 28, 28, 1) and np.abs(V).max() <= EPS * clip[1] + 1e-6
    assert stats["passes"] == 1 and all(r is not None for r in stats["success_rate"])

    w = np.linspace(0.5, 1.5, len(x)).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(64)
    for method in trainers.METHODS:
        trainer = trainers.make_trainer(method, model, clip_values=clip,
                                        **_settings(method, clip))
        if method == "rat":
            trainer.set_perturbations(V)
        trainer.compile(optimizer=keras.optimizers.Adam(1e-3))
        ckpt = str(tmp_path / f"{method}.keras")
        hist = trainer.fit(x, y, sample_weight=w, batch_size=64, epochs=1, verbose=0,
                           validation_data=(x_test, y_test), callbacks=[
                               keras.callbacks.ModelCheckpoint(ckpt, monitor="val_accuracy")])
        assert np.isfinite(hist.history["loss"][0]) and "val_accuracy" in hist.history
        hist = trainer.fit(ds, epochs=1, verbose=0)
        assert np.isfinite(hist.history["loss"][0]) and "accuracy" in hist.history
        restored = keras.models.load_model(ckpt)
        assert type(restored) is type(trainer) and restored.classifier.name == model.name
        assert restored.predict(x_test[:8], verbose=0).shape == (8, 10)

    # A RAT trainer round-trips through .keras with its classifier, V and predictions.
    rat = trainers.RATModel(model, V, eps=EPS * clip[1], clip_values=clip)
    rat.compile(optimizer="adam")
    rat.fit(x, y, batch_size=64, epochs=1, verbose=0)
    path = str(tmp_path / "rat.keras")
    rat.save(path)
    back = keras.models.load_model(path)
    np.testing.assert_allclose(back.predict(x_test, verbose=0), rat.predict(x_test, verbose=0),
                               rtol=0, atol=1e-6)
    np.testing.assert_array_equal(back.get_perturbations(), V)
    config, back_config = rat.get_config(), back.get_config()
    assert back_config.pop("classifier")["config"]["name"] == config.pop("classifier")[
        "config"]["name"] == model.name
    assert back_config == config
    assert back.optimizer.iterations.numpy() == rat.optimizer.iterations.numpy() > 0

    # The export of the trainer is its classifier; it serves without rat_tf.
    out_dir = export.export_saved_model(rat, str(tmp_path / "saved"))
    served = tf.saved_model.load(out_dir).signatures["serving_default"](
        images=tf.constant(x_test))
    outputs = model.predict(x_test, verbose=0)
    np.testing.assert_allclose(served["probabilities"].numpy(),
                               outputs if kind == "softmax" else tf.nn.softmax(outputs).numpy(),
                               atol=1e-5)
    np.testing.assert_allclose(served["logits"].numpy(), rat.logits(tf.constant(x_test)),
                               atol=1e-5)


def test_rat_fit_under_mirrored_strategy_matches_default(slices, mirrored_2cpu):
    """Same weights under both strategies for a model without per-replica state; the model
    with BatchNormalization and Dropout (per-replica batch statistics) trains too."""
    x, y, _, _ = slices
    w = np.linspace(0.5, 1.5, len(x)).astype(np.float32)
    results = []
    for kind, strategy in (("sequential_input", tf.distribute.get_strategy()),
                           ("sequential_input", mirrored_2cpu),
                           ("functional_bn_dropout", mirrored_2cpu)):
        with strategy.scope():
            model = _build(kind, x, y)
            V, _ = attacks.targeted_universal(model, x, y, EPS, max_passes=1, strategy=strategy)
            rat = trainers.RATModel(model, V, eps=EPS)
            rat.compile(optimizer=keras.optimizers.SGD(0.05))
        hist = rat.fit(tf.data.Dataset.from_tensor_slices((x, y, w)).batch(64), epochs=1,
                       verbose=0)
        assert np.isfinite(hist.history["loss"][0])
        results.append(np.concatenate([a.ravel() for a in model.get_weights()]))
    np.testing.assert_allclose(results[0], results[1], atol=2e-5)
    assert np.abs(results[0] - _initial("sequential_input", x, y)).max() > 1e-3  # it trained


def _initial(kind, x, y):
    return np.concatenate([a.ravel() for a in _build(kind, x, y).get_weights()])


def test_softmax_classifier_is_attacked_through_its_logits(slices):
    x, y, _, _ = slices
    soft = _build("softmax", x, y)
    twin = keras.Sequential([keras.Input((28, 28, 1)), *_conv_stack(), keras.layers.Dense(10)])
    twin.set_weights(soft.get_weights())  # the same network without the softmax
    for fn in (lambda m: attacks.fgsm(m, x[:64], y[:64], 0.1),
               lambda m: attacks.pgd(m, x[:64], y[:64], 0.1, steps=3, seed=0)):
        np.testing.assert_allclose(fn(soft).numpy(), fn(twin).numpy(), atol=1e-6)
    # "worst" targets are chosen on the logits, and the loss matches Keras on probabilities.
    rat = trainers.RATModel(soft, np.full((10, 28, 28, 1), 0.1, np.float32),
                            targets_per_image="worst")
    rat.compile(optimizer="adam")
    loss = rat.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    ref = keras.losses.SparseCategoricalCrossentropy()(y, soft.predict(x, verbose=0))
    assert loss == pytest.approx(float(ref), rel=1e-4)
    logits = rat.logits(tf.constant(x[:8])).numpy()
    np.testing.assert_allclose(tf.nn.softmax(logits).numpy(), soft.predict(x[:8], verbose=0),
                               atol=1e-6)
    assert logits.max() > 0  # the pre-softmax values, not log-probabilities


@pytest.mark.parametrize("method", trainers.METHODS)
def test_sample_and_class_weights_are_honoured(method, slices):
    x, y, _, _ = slices
    model = _build("sequential_input", x, y)
    before = [a.copy() for a in model.get_weights()]
    trainer = trainers.make_trainer(method, model, **_settings(method, (0, 1)))
    if method == "rat":
        trainer.set_perturbations(np.full((10, 28, 28, 1), 0.2, np.float32))
    trainer.compile(optimizer=keras.optimizers.Adam(1e-2))
    # Zero weights for every image: zero loss, zero gradients, unchanged weights.
    hist = trainer.fit(x, y, sample_weight=np.zeros(len(x)), batch_size=64, epochs=1, verbose=0)
    assert hist.history["loss"][0] == 0.0
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    trainer.fit(x, y, class_weight={c: 0.0 for c in range(10)}, batch_size=64, verbose=0)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    one = trainer.evaluate(x, y, verbose=0, return_dict=True)["loss"]
    two = trainer.evaluate(x, y, sample_weight=np.full(len(x), 2.0), verbose=0,
                           return_dict=True)["loss"]
    assert two == pytest.approx(2 * one, rel=1e-5)
    trainer.fit(x, y, class_weight={c: 1.0 for c in range(10)}, batch_size=64, verbose=0)
    assert any(not np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def test_compiled_metrics_and_one_hot_labels(slices):
    x, y, x_test, y_test = slices
    model = _build("sequential_input", x, y)
    rat = trainers.RATModel(model, np.full((10, 28, 28, 1), 0.2, np.float32))
    rat.compile(optimizer="adam", metrics=["accuracy",
                                           keras.metrics.SparseTopKCategoricalAccuracy(k=3)])
    onehot = np.eye(10, dtype=np.float32)[y]
    hist = rat.fit(x, onehot, batch_size=64, epochs=1, verbose=0,
                   validation_data=(x_test, y_test))
    assert {"accuracy", "sparse_top_k_categorical_accuracy", "perturbed_accuracy",
            "val_sparse_top_k_categorical_accuracy"} <= set(hist.history)
    assert "val_perturbed_accuracy" not in hist.history  # not measured by evaluate
    V, _ = attacks.targeted_universal(model, x, onehot, EPS, max_passes=1)
    assert V.shape == (10, 28, 28, 1)


def test_init_from_takes_the_users_architecture(slices, tmp_path):
    x, y, _, _ = slices
    model = _build("functional_bn_dropout", x, y)
    path = str(tmp_path / "own.keras")
    model.save(path)
    config = training.TrainConfig(dataset="mnist", method="standard", init_from=path,
                                  epochs=1, batch_size=64, steps_per_epoch=2, train_subset=200,
                                  test_subset=100, model_dir=str(tmp_path / "run"), verbose=0)
    metrics = training.train(config)
    out = keras.models.load_model(os.path.join(config.model_dir, "model.keras"))
    assert out.name == "my_func" and len(out.get_weights()) == len(model.get_weights())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    with pytest.raises(ValueError, match="takes images"):
        training.train(training.TrainConfig(**{**config.__dict__, "dataset": "cifar10",
                                               "model_dir": str(tmp_path / "c")}))


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs_give_clear_errors(slices, tmp_path):
    x, y, _, _ = slices
    model = _build("sequential_input", x, y)
    V = np.full((10, 28, 28, 1), 0.2, np.float32)

    # 0..255 images: refused by the trainers (in the graph) and by the attacks.
    rat = trainers.RATModel(model, V)
    rat.compile(optimizer="adam")
    with pytest.raises(tf.errors.InvalidArgumentError, match="clip_values"):
        rat.fit(x * 255, y, batch_size=64, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"pixel values in \[0, 1\].*255"):
        attacks.targeted_universal(model, x * 255, y, EPS)
    with pytest.raises(ValueError, match="pixel values in"):
        attacks.fgsm(model, x * 255, y, 0.1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="labels must be class ids < 10"):
        rat.fit(x, y + 10, batch_size=64, epochs=1, verbose=0)

    # A RATModel without V, and V outside its radius or the pixel range.
    bare = trainers.RATModel(model)
    bare.compile(optimizer="adam")
    with pytest.raises(ValueError, match="no perturbations"):
        bare.fit(x, y, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="outside their radius eps 0.3"):
        trainers.RATModel(model, V * 2, eps=0.3)
    with pytest.raises(ValueError, match="pixel range"):
        trainers.RATModel(model, V * 10)
    with pytest.raises(ValueError, match="outside their radius"):
        perturbation_files.save(str(tmp_path / "v.npz"), V * 25, eps=0.3, norm="linf")
    path = str(tmp_path / "v.npz")  # written by hand: load() refuses it too
    np.savez(path, perturbations=V * 25, meta=np.array('{"eps": 0.3, "norm_type": "linf"}'))
    with pytest.raises(ValueError, match="outside their radius"):
        perturbation_files.load(path)
    (tmp_path / "junk.npz").write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="junk.npz: not a readable .npz") as err:
        perturbation_files.load(str(tmp_path / "junk.npz"))
    assert "allow_pickle" not in str(err.value)

    # Unbuilt models, outputs that look like probabilities with no softmax.
    with pytest.raises(ValueError, match="not built"):
        trainers.StandardModel(Net())

    class Normalized(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(10, activation="relu")

        def call(self, z):
            h = self.dense(keras.layers.Flatten()(z)) + 1e-3
            return h / tf.reduce_sum(h, -1, keepdims=True)

    odd = Normalized()
    odd(x[:1])
    with pytest.raises(ValueError, match="from_logits"):
        models.describe(odd)
    assert not models.describe(odd, from_logits=False).from_logits

    # Attack API: norm aliases, inferred classes, keyword-only settings.
    np.testing.assert_array_equal(attacks.fgsm(model, x[:16], y[:16], 0.1, norm=np.inf),
                                  attacks.fgsm(model, x[:16], y[:16], 0.1, norm="linf"))
    np.testing.assert_array_equal(attacks.fgsm(model, x[:16], y[:16], 1.0, norm=2),
                                  attacks.fgsm(model, x[:16], y[:16], 1.0, norm="l2"))
    with pytest.raises(TypeError):
        attacks.pgd(model, x[:16], 0.3, 0.01, 40, np.inf)
    with pytest.raises(TypeError):
        attacks.targeted_universal(model, x, y, 10, 0.3)
    with pytest.raises(ValueError, match="unknown norm"):
        attacks.fgsm(model, x[:16], y[:16], 0.1, norm=1)
    with pytest.raises(ValueError, match="larger than the whole pixel range"):
        attacks.targeted_universal(model, x, y, 5.0)  # L-inf 5 on [0, 1] images
    attacks.fgsm(model, x[:16] * 255, y[:16], 5.0, clip_values=(0, 255))  # fine in 0..255


def test_served_model_refuses_inputs_it_was_not_trained_on(slices, tmp_path):
    x, y, x_test, _ = slices
    model = _build("uint8_range", x * 255, y)
    trainer = trainers.StandardModel(model, clip_values=(0, 255))
    path = export.export_saved_model(trainer, str(tmp_path / "m"))
    assert export.verify_export(path, trainer) <= 1e-4  # both signatures, 0..255 range
    loaded = tf.saved_model.load(path)
    serve, serve_u8 = loaded.signatures["serving_default"], loaded.signatures["serving_uint8"]
    np.testing.assert_allclose(
        serve(images=tf.constant(np.round(x_test[:4] * 255)))["logits"],
        serve_u8(images=tf.constant(np.round(x_test[:4] * 255), tf.uint8))["logits"], atol=1e-4)
    bad = np.round(x_test[:4] * 255)
    for value, match in ((np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"),
                         (300.0, r"must be in \[0, 255\]"), (-1.0, r"must be in \[0, 255\]")):
        images = bad.copy()
        images[0, 0, 0, 0] = value
        with pytest.raises(tf.errors.InvalidArgumentError, match=match):
            serve(images=tf.constant(images))
    for fn, dtype in ((serve, tf.float32), (serve_u8, tf.uint8)):
        with pytest.raises(tf.errors.InvalidArgumentError, match="empty batch"):
            fn(images=tf.zeros((0, 28, 28, 1), dtype))
