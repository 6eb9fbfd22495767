"""SavedModel export: round trip, serving without rat_tf, input checks, gradients, atomic writes."""

import gc
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from rat_tf import export, models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def x_test(mnist_arrays):
    _, _, x, y = mnist_arrays
    return x[:300], y[:300]


@pytest.fixture(scope="module")
def exported(mnist_model, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("export") / "saved_model")
    assert export.export_saved_model(mnist_model, path) == path
    return path


def _subprocess_env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def test_round_trip_matches_keras(exported, mnist_model, x_test):
    x, _ = x_test
    diff = export.verify_export(exported, mnist_model, x)
    assert diff <= 1e-5
    loaded = tf.saved_model.load(exported)
    assert set(loaded.signatures) == set(export.SIGNATURES)
    for name, dtype in (("serving_default", tf.float32), ("serving_uint8", tf.uint8)):
        sig = loaded.signatures[name]
        spec = sig.structured_input_signature[1]["images"]
        assert spec.dtype == dtype and spec.shape.as_list() == [None, 28, 28, 1]
        outs = sig.structured_outputs
        assert outs["logits"].dtype == tf.float32 and outs["logits"].shape.as_list() == [None, 10]
        assert outs["probabilities"].dtype == tf.float32
        assert outs["classes"].dtype == tf.int32
    ref = mnist_model(x, training=False).numpy()
    out = loaded.signatures["serving_default"](images=tf.constant(x))
    np.testing.assert_allclose(out["logits"].numpy(), ref, atol=1e-5)
    np.testing.assert_array_equal(out["classes"].numpy(), ref.argmax(-1))
    np.testing.assert_allclose(out["probabilities"].numpy().sum(-1), 1.0, atol=1e-5)
    x_u8 = np.round(x * 255).astype(np.uint8)
    np.testing.assert_array_equal(x_u8.astype(np.float32) / 255.0, x)  # MNIST is k/255 exactly
    out8 = loaded.signatures["serving_uint8"](images=tf.constant(x_u8))
    np.testing.assert_allclose(out8["logits"].numpy(), ref, atol=1e-5)


_SERVE_SCRIPT = r"""
import json, sys
import numpy as np
import tensorflow as tf
path, data_path, out_path = sys.argv[1:4]
x = np.load(data_path)["x"]
loaded = tf.saved_model.load(path)
f = loaded.signatures["serving_default"](images=tf.constant(x))
u = loaded.signatures["serving_uint8"](images=tf.constant(np.round(x * 255).astype(np.uint8)))
np.savez(out_path, logits=f["logits"].numpy(), classes=f["classes"].numpy(),
         logits_u8=u["logits"].numpy())
print(json.dumps({"rat_tf_loaded": any(m.split(".")[0] == "rat_tf" for m in sys.modules)}))
"""


def test_serves_in_subprocess_without_rat_tf(exported, mnist_model, x_test, tmp_path):
    x, y = x_test
    np.savez(tmp_path / "x.npz", x=x)
    script = tmp_path / "serve.py"
    script.write_text(_SERVE_SCRIPT)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("PYTHONPATH", None)
    res = subprocess.run([sys.executable, str(script), exported, str(tmp_path / "x.npz"),
                          str(tmp_path / "out.npz")], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"rat_tf_loaded": False}
    with np.load(tmp_path / "out.npz", allow_pickle=False) as out:
        ref = mnist_model(x, training=False).numpy()
        np.testing.assert_allclose(out["logits"], ref, atol=1e-5)
        np.testing.assert_allclose(out["logits_u8"], ref, atol=1e-5)
        assert np.mean(out["classes"] == y) > 0.9


def test_signatures_reject_wrong_shape_and_dtype(exported):
    loaded = tf.saved_model.load(exported)
    sig, sig8 = loaded.signatures["serving_default"], loaded.signatures["serving_uint8"]
    for bad in (np.zeros((2, 32, 32, 3), np.float32), np.zeros((2, 28, 28), np.float32)):
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"expected shape \[\?,28,28,1\]"):
            sig(images=tf.constant(bad))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"expected shape \[\?,28,28,1\]"):
        sig8(images=tf.zeros((1, 14, 14, 1), tf.uint8))
    with pytest.raises(tf.errors.InvalidArgumentError, match="float tensor but is a double"):
        sig(images=tf.zeros((1, 28, 28, 1), tf.float64))
    with pytest.raises(tf.errors.InvalidArgumentError, match="uint8 tensor but is a float"):
        sig8(images=tf.zeros((1, 28, 28, 1), tf.float32))
    # The endpoint methods check the signature before running.
    with pytest.raises(TypeError, match=r"TensorSpec\(shape=\(None, 28, 28, 1\)"):
        loaded.serving_default(tf.zeros((1, 32, 32, 3)))


def test_signatures_reject_bad_values_before_the_model_runs(exported):
    sig = tf.saved_model.load(exported).signatures["serving_default"]
    nan = np.full((2, 28, 28, 1), 0.5, np.float32)
    nan[1, 3, 3, 0] = np.nan
    for _ in range(3):  # each check runs before the next and before the model
        with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or infinite"):
            sig(images=tf.constant(nan))
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"images must be in \[0, 1\]"):
            sig(images=tf.fill((2, 28, 28, 1), 255.0))
        with pytest.raises(tf.errors.InvalidArgumentError, match="an empty batch"):
            sig(images=tf.zeros((0, 28, 28, 1)))


def test_load_serving_fn_checks_inputs(exported):
    fn = export.load_serving_fn(exported)
    gc.collect()  # the callable keeps the loaded SavedModel (and its variables) alive
    assert fn(np.zeros((2, 28, 28, 1), np.float64)).shape == (2, 10)  # floats are cast
    with pytest.raises(ValueError, match=r"expects images of shape \(None, 28, 28, 1\)"):
        fn(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="expects float32 images"):
        fn(np.zeros((2, 28, 28, 1), np.int32))
    fn8 = export.load_serving_fn(exported, "serving_uint8")
    with pytest.raises(ValueError, match="expects uint8"):
        fn8(np.zeros((2, 28, 28, 1), np.float32))
    with pytest.raises(export.ExportError, match="no signature 'serving_int'"):
        export.load_serving_fn(exported, "serving_int")


def test_gradients_flow_through_loaded_fn(exported, mnist_model, x_test):
    x, y = x_test
    x, y = tf.constant(x[:32]), tf.constant(y[:32])
    fn = export.load_serving_fn(exported)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def grad(model_fn):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = loss_fn(y, model_fn(x))
        return tape.gradient(loss, x)

    g_served, g_keras = grad(fn), grad(lambda v: mnist_model(v, training=False))
    assert g_served is not None and float(tf.reduce_max(tf.abs(g_served))) > 0
    np.testing.assert_allclose(g_served.numpy(), g_keras.numpy(), atol=1e-6)

    @tf.function
    def fgsm(v):  # inside tf.function too, as the attacks use it
        with tf.GradientTape() as tape:
            tape.watch(v)
            loss = loss_fn(y, fn(v))
        return tf.clip_by_value(v + 0.3 * tf.sign(tape.gradient(loss, v)), 0.0, 1.0)

    x_adv = fgsm(x)
    acc_clean = np.mean(np.argmax(fn(x).numpy(), -1) == y.numpy())
    acc_adv = np.mean(np.argmax(fn(x_adv).numpy(), -1) == y.numpy())
    assert acc_clean > 0.85 and acc_adv < acc_clean - 0.3


def test_verify_detects_a_different_model(exported, mnist_model, x_test):
    keras.utils.set_random_seed(1)
    other = keras.models.clone_model(mnist_model)  # fresh weights; mnist_model untouched
    with pytest.raises(export.ExportError, match="differ from the classifier"):
        export.verify_export(exported, other, x_test[0][:64])
    assert export.verify_export(exported, mnist_model) <= 1e-5  # default: random images
    with pytest.raises(ValueError, match=r"x must be a non-empty batch \[N, 28, 28, 1\]"):
        export.verify_export(exported, mnist_model, np.zeros((4, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"pixel values in \[0, 1\]"):
        export.verify_export(exported, mnist_model, np.full((4, 28, 28, 1), 255.0))
    with pytest.raises(ValueError, match="finite"):
        export.verify_export(exported, mnist_model, np.full((4, 28, 28, 1), np.nan))
    broken = keras.models.clone_model(mnist_model)
    broken.set_weights([np.full_like(w, np.nan) for w in mnist_model.get_weights()])
    with pytest.raises(export.ExportError, match="non-finite"):  # NaN is never "close enough"
        export.verify_export(exported, broken, x_test[0][:8])


def test_atomic_write_and_overwrite(mnist_model, tmp_path, monkeypatch):
    path = str(tmp_path / "out" / "sm")
    export.export_saved_model(mnist_model, path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export.export_saved_model(mnist_model, path)
    marker = os.path.join(path, "old_marker")
    open(marker, "w").close()
    export.export_saved_model(mnist_model, path, overwrite=True)
    assert not os.path.exists(marker)  # replaced, not merged
    assert sorted(os.listdir(tmp_path / "out")) == ["sm"]  # no temporary siblings left
    assert export.verify_export(path, mnist_model) <= 1e-5

    archive_cls = type(keras.export.ExportArchive())

    def broken_write(self, filepath, options=None, verbose=True):
        os.makedirs(os.path.join(filepath, "variables"))
        raise OSError("disk full")

    monkeypatch.setattr(archive_cls, "write_out", broken_write)
    with pytest.raises(OSError, match="disk full"):
        export.export_saved_model(mnist_model, str(tmp_path / "out" / "sm2"))
    with pytest.raises(OSError, match="disk full"):
        export.export_saved_model(mnist_model, path, overwrite=True)
    assert sorted(os.listdir(tmp_path / "out")) == ["sm"]  # the old export is intact
    assert export.verify_export(path, mnist_model) <= 1e-5


def test_mixed_precision_model_exports_float32_logits(tmp_path):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        model = models.build_model("tiny_cnn", "cifar10")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    path = export.export_saved_model(model, str(tmp_path / "sm"))
    assert export.verify_export(path, model, atol=1e-3) <= 1e-3
    out = tf.saved_model.load(path).signatures["serving_default"](images=tf.zeros((2, 32, 32, 3)))
    assert out["logits"].dtype == tf.float32 and out["logits"].shape == (2, 10)


def test_export_needs_an_image_classifier(tmp_path):
    inputs = keras.Input((None, None, 1))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))
    with pytest.raises(ValueError, match="known H, W, C"):
        export.export_saved_model(model, str(tmp_path / "sm"))


def test_export_binary(mnist_model_path, mnist_model, tmp_path):
    out_dir = str(tmp_path / "sm")
    res = subprocess.run([sys.executable, os.path.join(REPO, "bin", "export.py"),
                          f"--model_path={mnist_model_path}", f"--export_dir={out_dir}",
                          "--dataset=mnist", "--data_source=files", "--n_test=200"],
                         env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "max_abs_logit_diff=" in res.stdout
    assert float(res.stdout.split("max_abs_logit_diff=")[1].split()[0]) <= 1e-4
    assert export.verify_export(out_dir, mnist_model) <= 1e-5
