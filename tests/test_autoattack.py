"""AutoAttack on a small real MNIST model: APGD against PGD, two gradient-masking traps,
FAB-T and its projection, the ensemble's breakdown, determinism and bad settings."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from rat_tf import attacks, crosscheck, models
from rat_tf import autoattack as aa
from rat_tf.attacks.fab import project_linf_hyperplane


@pytest.fixture(scope="module")
def model_fn(mnist_arrays):
    """A tiny_cnn trained 300 steps on real MNIST (about 97% on the images below)."""
    x_train, y_train, _, _ = mnist_arrays
    keras.utils.set_random_seed(0)
    model = models.tiny_cnn()
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train[:19200], y_train[:19200], batch_size=64, epochs=1, verbose=0)
    return lambda x: model(x, training=False)


@pytest.fixture(scope="module")
def images(mnist_arrays):
    _, _, x_test, y_test = mnist_arrays
    return x_test[:200], y_test[:200]


def correct(fn, x, y):
    return np.argmax(np.asarray(fn(tf.constant(x))), -1) == y


def accuracy(fn, x, y):
    return float(np.mean(correct(fn, x, y)))


def linf(a, b):
    return np.abs(np.asarray(a, np.float64) - b).reshape(len(b), -1).max(1)


def saturated(model_fn):
    """The same classifier with logits x 1e4: its softmax saturates, CE gradients vanish."""
    return lambda x: model_fn(x) * 1e4


def quantised(model_fn):
    """The same classifier on inputs rounded to quarters, with a zero input gradient."""
    return lambda x: model_fn(x * 0 + tf.stop_gradient(tf.round(x * 4) / 4))


# ----------------------------------------------------------------------------- APGD
@pytest.mark.parametrize("eps", [0.1, 0.15])
def test_apgd_ce_at_least_as_strong_as_pgd(model_fn, images, eps):
    x, y = images
    clean = accuracy(model_fn, x, y)
    x_pgd = attacks.pgd(model_fn, x, y, eps, steps=20, restarts=1, seed=0)
    x_apgd = aa.apgd(model_fn, x, y, eps, steps=20, seed=0).numpy()
    assert clean > 0.9
    assert crosscheck.not_weaker(correct(model_fn, x_apgd, y), correct(model_fn, x_pgd, y))["ok"]
    assert accuracy(model_fn, x_apgd, y) < clean - 0.3
    assert linf(x_apgd, x).max() <= eps + 1e-6 and x_apgd.min() >= 0 and x_apgd.max() <= 1


def test_apgd_l2_stays_in_its_ball(model_fn, images):
    x, y = images[0][:100], images[1][:100]
    x_adv = aa.apgd(model_fn, x, y, 1.5, norm="l2", steps=20).numpy()
    norms = np.sqrt(((x_adv.astype(np.float64) - x) ** 2).reshape(len(x), -1).sum(1))
    assert norms.max() <= 1.5 * (1 + 1e-5) and x_adv.min() >= 0 and x_adv.max() <= 1
    assert accuracy(model_fn, x_adv, y) < accuracy(model_fn, x, y) - 0.3


def test_saturated_softmax_masks_pgd_not_dlr(model_fn, images):
    x, y = images
    sat = saturated(model_fn)
    clean = accuracy(sat, x, y)
    pgd = accuracy(sat, attacks.pgd(sat, x, y, 0.15, steps=20, seed=0), y)
    assert pgd >= clean - 0.05  # the trap works: PGD-CE is stuck
    # the DLR losses are invariant to the scale of the logits
    assert accuracy(sat, aa.apgd(sat, x, y, 0.15, steps=20, loss="dlr"), y) < 0.3
    x_t = aa.apgd(sat, x, y, 0.15, steps=20, targeted=True, n_target_classes=3)
    assert accuracy(sat, x_t, y) < 0.3


def test_quantised_input_masks_pgd_not_square(model_fn, images):
    x, y = images
    quant = quantised(model_fn)
    clean = accuracy(quant, x, y)
    pgd = accuracy(quant, attacks.pgd(quant, x, y, 0.3, steps=20, seed=0), y)
    assert clean > 0.9 and pgd >= clean - 0.05  # no gradient: PGD only has its random start
    x_sq = aa.square(quant, x, y, 0.3, n_queries=300).numpy()
    assert accuracy(quant, x_sq, y) < 0.3
    assert linf(x_sq, x).max() <= 0.3 + 1e-6 and x_sq.min() >= 0 and x_sq.max() <= 1


def test_apgd_and_square_are_deterministic_and_trace_in_tf_function(model_fn, images):
    x, y = images[0][:64], images[1][:64]
    a = aa.apgd(model_fn, x, y, 0.1, steps=10, restarts=2, seed=3).numpy()
    np.testing.assert_array_equal(a, aa.apgd(model_fn, x, y, 0.1, steps=10, restarts=2,
                                             seed=3).numpy())
    assert np.abs(a - aa.apgd(model_fn, x, y, 0.1, steps=10, restarts=2, seed=4)).max() > 0
    graph = tf.function(lambda xb, yb: aa.apgd(model_fn, xb, yb, 0.1, steps=10, restarts=2,
                                               seed=3))
    np.testing.assert_allclose(graph(tf.constant(x), tf.constant(y)).numpy(), a, atol=1e-6)
    s = aa.square(model_fn, x, y, 0.1, n_queries=50, seed=1).numpy()
    np.testing.assert_array_equal(s, aa.square(model_fn, x, y, 0.1, n_queries=50,
                                               seed=1).numpy())


# ----------------------------------------------------------------------------- FAB-T
def test_fab_projection_is_the_minimal_linf_step():
    linprog = pytest.importorskip("scipy.optimize").linprog
    rng = np.random.default_rng(0)
    dim = 12
    t = rng.uniform(0, 1, (6, dim))
    w = rng.normal(size=(6, dim))
    w[0, :4] = 0  # coordinates the hyperplane does not constrain
    b = np.sum(w * rng.uniform(0, 1, (6, dim)), 1)  # a hyperplane that meets the box
    d = project_linf_hyperplane(tf.constant(t, tf.float32), tf.constant(w, tf.float32),
                                tf.constant(b, tf.float32)).numpy()
    np.testing.assert_allclose(np.sum(w * (t + d), 1), b, atol=1e-4)
    assert (t + d).min() >= -1e-6 and (t + d).max() <= 1 + 1e-6
    for i in range(len(t)):  # minimise s subject to |d| <= s, t + d in the box, <w, t + d> = b
        cost = np.r_[np.zeros(dim), 1.0]
        eye = np.eye(dim)
        a_ub = np.block([[eye, -np.ones((dim, 1))], [-eye, -np.ones((dim, 1))]])
        res = linprog(cost, A_ub=a_ub, b_ub=np.zeros(2 * dim), A_eq=np.r_[w[i], 0.0][None],
                      b_eq=[b[i] - w[i] @ t[i]],
                      bounds=[(-t[i, j], 1 - t[i, j]) for j in range(dim)] + [(0, None)])
        assert abs(np.abs(d[i]).max() - res.fun) < 1e-4


def test_fab_finds_small_adversarial_examples(model_fn, images):
    x, y = images[0][:100], images[1][:100]
    x_adv = aa.fab(model_fn, x, y, 0.15, steps=20, n_target_classes=3).numpy()
    assert linf(x_adv, x).max() <= 0.15 + 1e-5 and x_adv.min() >= 0 and x_adv.max() <= 1
    assert accuracy(model_fn, x_adv, y) < accuracy(model_fn, x, y) - 0.5


# ----------------------------------------------------------------------------- AutoAttack
FAST = {"steps": 10, "n_queries": 100, "n_target_classes": 3}


def test_autoattack_breakdown_is_consistent(model_fn, images):
    x, y = images[0][:60], images[1][:60]
    res = aa.autoattack(model_fn, x, y, 0.1, batch_size=10, **FAST)
    acc = list(res["robust_accuracy"].values())
    assert list(res["robust_accuracy"]) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert all(a >= b for a, b in zip(acc[:-1], acc[1:], strict=True)) and acc[-1] < acc[0] - 0.2
    robust = res["robust"]
    assert robust.dtype == bool and robust.shape == (60,) and robust.mean() == acc[-1]
    assert [b is None for b in res["broken_by"]] == list(robust)
    counts = {name: res["broken_by"].count(name) for name in res["robust_accuracy"]}
    np.testing.assert_allclose(np.cumsum(list(counts.values())) / 60, 1 - np.array(acc),
                               atol=1e-9)
    # x_adv: adversarial exactly where not robust, always in the ball and the box
    x_adv = res["x_adv"]
    correct = np.argmax(model_fn(tf.constant(x_adv)).numpy(), -1) == y
    np.testing.assert_array_equal(correct, robust)
    assert linf(x_adv, x).max() <= 0.1 + 1e-5 and x_adv.min() >= 0 and x_adv.max() <= 1
    calls = []
    again = aa.autoattack(model_fn, x, y, 0.1, batch_size=10, **FAST,
                          progress=lambda done, total: calls.append((done, total)))
    np.testing.assert_array_equal(again["x_adv"], x_adv)
    # progress: the cost done grows with every batch, the estimated total shrinks as images
    # fall, and the last call has nothing left
    done, total = np.array(calls).T
    assert len(calls) >= 4 and np.all(np.diff(done) > 0) and np.all(total >= done - 1e-9)
    assert total[0] > total[-1] and total[-1] == pytest.approx(done[-1])
    first_batch = aa.attack_cost("apgd-ce", 10, batch_size=10, **FAST)
    assert done[0] == pytest.approx(first_batch)


def test_attack_cost_weighs_runs_iterations_and_images():
    kw = dict(steps=100, n_queries=5000, n_target_classes=9, batch_size=500)
    ce, t = aa.attack_cost("apgd-ce", 500, **kw), aa.attack_cost("apgd-t", 500, **kw)
    assert t == pytest.approx(9 * ce) and aa.attack_cost("apgd-ce", 500, restarts=2) == 2 * ce
    assert aa.attack_cost("apgd-ce", 1000, **kw) == pytest.approx(2 * ce)
    assert aa.attack_cost("square", 500, **kw) > ce and aa.attack_cost("fab-t", 0, **kw) == 0
    # the last few robust images cost a small padded batch, not a whole one
    assert aa.attack_cost("apgd-ce", 510, **kw) < 1.2 * ce


def test_autoattack_compiles_each_attack_once(model_fn, images):
    traces = []

    def counted(x):
        traces.append(x.shape[0])
        return model_fn(x)

    def calls(n):
        traces.clear()
        aa.autoattack(counted, images[0][:n], images[1][:n], 0.03, batch_size=20,
                      attacks=["square", "apgd-t"], steps=5, n_queries=20, n_target_classes=2)
        return len(traces)

    # 3 padded batches and 2 targets call the compiled functions 6 times: no more traces
    assert calls(50) == calls(20)


def test_small_batches_of_the_last_robust_images_give_the_same_results(model_fn, images,
                                                                      monkeypatch):
    """The last images still robust run in a smaller padded batch (less work); every result
    equals the one of a full padded batch."""
    assert [aa.bucket(n, 500, 1) for n in (500, 251, 126, 125, 63, 1)] == [
        500, 500, 250, 125, 125, 31]
    assert aa.bucket(10, 250, 2) == 16 and aa.bucket(70, 250, 2) == 126
    assert aa.bucket(3, 20, 1) == 20
    x, y = images[0][:64], images[1][:64]
    sizes = []
    real = aa.bucket

    def recorded(n, b, replicas):
        sizes.append(real(n, b, replicas))
        return sizes[-1]

    monkeypatch.setattr(aa, "bucket", recorded)
    kw = dict(batch_size=64, attacks=["apgd-ce", "apgd-t", "square"], steps=5,
              n_target_classes=3, n_queries=30)
    small = aa.autoattack(model_fn, x, y, 0.15, **kw)
    assert 16 in sizes, sizes  # some attack ran on the 16-image batch
    monkeypatch.setattr(aa, "bucket", lambda n, b, replicas: b)
    full = aa.autoattack(model_fn, x, y, 0.15, **kw)
    np.testing.assert_array_equal(small["robust"], full["robust"])
    np.testing.assert_array_equal(small["x_adv"], full["x_adv"])
    assert small["robust_accuracy"] == full["robust_accuracy"]


def test_autoattack_subset_and_order(model_fn, images):
    x, y = images[0][:40], images[1][:40]
    res = aa.autoattack(model_fn, x, y, 0.1, attacks=["square", "apgd-ce"], **FAST)
    assert list(res["robust_accuracy"]) == ["clean", "square", "apgd-ce"]
    assert set(res["seconds"]) == {"square", "apgd-ce"}
    l2 = aa.autoattack(model_fn, x, y, 1.0, norm="l2", attacks=["apgd-ce", "apgd-t"], **FAST)
    assert l2["robust_accuracy"]["apgd-t"] <= l2["robust_accuracy"]["apgd-ce"]


# ----------------------------------------------------------------------------- errors
def test_bad_settings_are_refused(model_fn, images):
    x, y = images[0][:8], images[1][:8]
    with pytest.raises(ValueError, match="steps"):
        aa.apgd(model_fn, x, y, 0.1, steps=0)
    with pytest.raises(ValueError, match="eps"):
        aa.apgd(model_fn, x, y, -0.1)
    with pytest.raises(ValueError, match="loss"):
        aa.apgd(model_fn, x, y, 0.1, loss="hinge")
    with pytest.raises(ValueError, match="norm"):
        aa.apgd(model_fn, x, y, 0.1, norm="l1")
    with pytest.raises(ValueError, match="n_target_classes"):
        aa.apgd(model_fn, x, y, 0.1, targeted=True, n_target_classes=10)
    with pytest.raises(ValueError, match="square supports norm 'linf' only"):
        aa.square(model_fn, x, y, 1.0, norm="l2")
    with pytest.raises(ValueError, match="n_queries"):
        aa.square(model_fn, x, y, 0.1, n_queries=0)
    with pytest.raises(ValueError, match="fab supports norm 'linf' only"):
        aa.fab(model_fn, x, y, 1.0, norm="l2")
    with pytest.raises(ValueError, match="unknown attack 'cw'"):
        aa.autoattack(model_fn, x, y, 0.1, attacks=["apgd-ce", "cw"])
    with pytest.raises(ValueError, match="unknown version"):
        aa.autoattack(model_fn, x, y, 0.1, version="plus")
    with pytest.raises(ValueError, match="fab-t, square support norm 'linf' only"):
        aa.autoattack(model_fn, x, y, 1.0, norm="l2")
    with pytest.raises(ValueError, match="steps"):
        aa.autoattack(model_fn, x, y, 0.1, steps=0)
    with pytest.raises(ValueError, match="eps"):
        aa.autoattack(model_fn, x, y, -1.0)
