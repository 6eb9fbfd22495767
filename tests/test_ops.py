"""rat_tf.ops against numpy references (values and gradients), dtypes and XLA."""

import numpy as np
import pytest
import tensorflow as tf

from rat_tf import ops


def np_project(v, eps, norm):
    v = np.asarray(v, np.float64)
    if norm == "linf":
        return np.clip(v, -eps, eps)
    n = np.sqrt((v.reshape(len(v), -1) ** 2).sum(1))
    f = np.where(n > eps, eps / np.maximum(n, 1e-300), 1.0)
    return v * f.reshape([-1] + [1] * (v.ndim - 1))


def np_norms(v, norm):
    flat = np.asarray(v, np.float64).reshape(len(v), -1)
    return np.abs(flat).max(1) if norm == "linf" else np.sqrt((flat ** 2).sum(1))


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    v = rng.normal(0, 0.3, (6, 5, 4, 3)).astype(np.float32)
    v[2] *= 0.01  # a slice well inside every ball
    v[4] = 0.0  # a zero slice
    return v


@pytest.mark.parametrize("norm", ops.NORMS)
def test_batch_norms_match_numpy(batch, norm):
    np.testing.assert_allclose(ops.batch_norms(batch, norm).numpy(), np_norms(batch, norm),
                               rtol=1e-5)


@pytest.mark.parametrize("norm,eps", [("linf", 0.2), ("l2", 1.0), ("l2", 0.0), ("linf", 0.0)])
def test_project_matches_numpy(batch, norm, eps):
    out = ops.project(batch, eps, norm).numpy()
    np.testing.assert_allclose(out, np_project(batch, eps, norm), rtol=1e-5, atol=1e-7)
    assert np.all(np_norms(out, norm) <= eps * (1 + 1e-6) + 1e-12)


def test_l2_projection_clips_and_never_scales_up(batch):
    norms = np_norms(batch, "l2")
    eps = float(np.median(norms))
    out = ops.project(batch, eps, "l2").numpy()
    inside = norms <= eps
    assert inside.any() and (~inside).any()
    np.testing.assert_array_equal(out[inside], batch[inside])  # unchanged, not scaled to eps
    np.testing.assert_allclose(np_norms(out[~inside], "l2"), eps, rtol=1e-5)


def test_project_per_slice_radius(batch):
    eps = np.linspace(0.05, 0.5, len(batch)).astype(np.float32)
    for norm in ops.NORMS:
        out = ops.project(batch, eps, norm).numpy()
        want = np.stack([np_project(batch[i:i + 1], eps[i], norm)[0] for i in range(len(eps))])
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("norm,eps", [("linf", 0.2), ("l2", 1.0)])
def test_project_gradient_matches_numpy(batch, norm, eps):
    v = tf.constant(batch)
    w = np.random.default_rng(1).normal(size=batch.shape).astype(np.float32)
    with tf.GradientTape() as tape:
        tape.watch(v)
        loss = tf.reduce_sum(ops.project(v, eps, norm) * w)
    grad = tape.gradient(loss, v).numpy()
    # numerical gradient by central differences (in float64 on the numpy reference)
    num = np.zeros_like(batch, np.float64)
    h = 1e-5
    flat = batch.astype(np.float64).reshape(-1)
    for i in np.random.default_rng(2).choice(flat.size, 60, replace=False):
        d = np.zeros_like(flat)
        d[i] = h
        up = (np_project((flat + d).reshape(batch.shape), eps, norm) * w).sum()
        dn = (np_project((flat - d).reshape(batch.shape), eps, norm) * w).sum()
        num.reshape(-1)[i] = (up - dn) / (2 * h)
        np.testing.assert_allclose(grad.reshape(-1)[i], num.reshape(-1)[i], rtol=1e-3, atol=1e-3)


def test_l2_norm_gradient_at_zero_is_finite():
    v = tf.zeros([2, 3])
    with tf.GradientTape() as tape:
        tape.watch(v)
        loss = tf.reduce_sum(ops.batch_norms(v, "l2")) + tf.reduce_sum(ops.project(v, 1.0, "l2"))
    assert np.all(np.isfinite(tape.gradient(loss, v).numpy()))


def test_apply_perturbation_value_and_gradient():
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, (4, 6, 6, 1)).astype(np.float32)
    x[:, 0] = 0.0  # black pixels: a zero perturbation must still get a gradient there
    x[:, 1] = 1.0
    v = rng.uniform(-0.4, 0.4, x.shape).astype(np.float32)
    v[:, :2] = 0.0
    xt, vt = tf.constant(x), tf.constant(v)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([xt, vt])
        out = ops.apply_perturbation(xt, vt)
        loss = tf.reduce_sum(out * 2.0)
    np.testing.assert_allclose(out.numpy(), np.clip(x + v, 0, 1), atol=1e-7)
    inside = ((x + v) >= 0) & ((x + v) <= 1)
    np.testing.assert_array_equal(tape.gradient(loss, vt).numpy(), 2.0 * inside)
    np.testing.assert_array_equal(tape.gradient(loss, xt).numpy(), 2.0 * inside)
    assert inside[:, :2].all()


def test_apply_perturbation_broadcasts_one_perturbation():
    x = tf.random.stateless_uniform([3, 4, 4, 1], [0, 0])
    v = tf.fill([4, 4, 1], 0.5)
    np.testing.assert_allclose(ops.apply_perturbation(x, v).numpy(),
                               np.clip(x.numpy() + 0.5, 0, 1))


def test_steps_match_numpy(batch):
    np.testing.assert_array_equal(ops.sign_step(batch).numpy(), np.sign(batch))
    np.testing.assert_array_equal(ops.normalized_step(batch, "linf").numpy(), np.sign(batch))
    out = ops.normalized_step(batch, "l2").numpy()
    n = np_norms(batch, "l2")
    want = batch / np.where(n > 0, n, 1).reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(out[4], 0.0)
    np.testing.assert_allclose(np_norms(np.delete(out, 4, 0), "l2"), 1.0, rtol=1e-5)


@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_low_precision_is_safe(dtype):
    # 2000 entries of 10: sum of squares 2e5 overflows float16 (max 65504) unless done in f32
    v = tf.cast(tf.fill([2, 2000], 10.0), dtype)
    n = ops.batch_norms(v, "l2")
    assert n.dtype == tf.float32
    np.testing.assert_allclose(n.numpy(), np.sqrt(2000) * 10, rtol=1e-2)
    out = ops.project(v, 1.0, "l2")
    assert out.dtype == dtype
    np.testing.assert_allclose(ops.batch_norms(out, "l2").numpy(), 1.0, rtol=2e-2)
    step = ops.normalized_step(v, "l2")
    assert step.dtype == dtype and np.all(np.isfinite(tf.cast(step, tf.float32).numpy()))
    lin = ops.project(v, 0.5, "linf")
    assert lin.dtype == dtype
    np.testing.assert_array_equal(tf.cast(lin, tf.float32).numpy(), 0.5)
    x = tf.cast(tf.fill([2, 2000], 0.75), dtype)
    np.testing.assert_array_equal(tf.cast(ops.apply_perturbation(x, out), tf.float32).numpy()
                                  <= 1.0, True)


def test_xla_compiled_matches_eager(batch):
    @tf.function(jit_compile=True)
    def f(v, x):
        return (ops.project(v, 0.5, "l2"), ops.project(v, 0.1, "linf"),
                ops.apply_perturbation(x, v), ops.normalized_step(v, "l2"),
                ops.batch_norms(v, "l2"))

    x = np.random.default_rng(4).uniform(0, 1, batch.shape).astype(np.float32)
    got = f(tf.constant(batch), tf.constant(x))
    want = (np_project(batch, 0.5, "l2"), np_project(batch, 0.1, "linf"), np.clip(x + batch, 0, 1),
            ops.normalized_step(batch, "l2").numpy(), np_norms(batch, "l2"))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm,eps", [("linf", 0.3), ("l2", 2.0)])
def test_random_in_ball(norm, eps):
    r = ops.random_in_ball([500, 8, 8, 1], eps, norm, seed=7).numpy()
    n = np_norms(r, norm)
    assert np.all(n <= eps * (1 + 1e-6))
    assert n.mean() > 0.8 * eps  # uniform in a 64-dim ball concentrates near the sphere
    np.testing.assert_array_equal(r, ops.random_in_ball([500, 8, 8, 1], eps, norm, seed=7).numpy())
    assert not np.array_equal(r, ops.random_in_ball([500, 8, 8, 1], eps, norm, seed=8).numpy())


def test_bad_input_errors(batch):
    with pytest.raises(ValueError, match="norm"):
        ops.project(batch, 0.1, "l1")
    with pytest.raises(ValueError, match="norm"):
        ops.batch_norms(batch, "linfinity")
    with pytest.raises(ValueError, match="eps"):
        ops.project(batch, -0.1)
    with pytest.raises(ValueError, match="eps"):
        ops.random_in_ball([2, 3], float("nan"))
