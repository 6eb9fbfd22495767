"""Attacks on the small real MNIST model: FGSM, PGD, universal searches, errors and files."""

import numpy as np
import pytest
import tensorflow as tf

from rat_tf import attacks, data, ops, perturbation_files

EPS = 0.3  # the usual MNIST L-inf radius


@pytest.fixture(scope="module")
def model_fn(mnist_model):
    return lambda x: mnist_model(x, training=False)


@pytest.fixture(scope="module")
def test_slice(mnist_arrays):
    _, _, x_test, y_test = mnist_arrays
    return x_test[:500], y_test[:500]


@pytest.fixture(scope="module")
def search_set(mnist_arrays):
    x_train, y_train, _, _ = mnist_arrays
    return data.balanced_subset(x_train, y_train, 20, seed=0)  # 200 training images


@pytest.fixture(scope="module")
def held_out(mnist_arrays):
    _, _, x_test, y_test = mnist_arrays
    return x_test[:1000], y_test[:1000]


def accuracy(model_fn, x, y):
    return float(np.mean(np.argmax(model_fn(x).numpy(), -1) == y))


def linf(a, b):
    return np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).reshape(len(a), -1).max(1)


def l2(a, b):
    return np.sqrt(((np.asarray(a, np.float64) - b) ** 2).reshape(len(a), -1).sum(1))


# ----------------------------------------------------------------------------- FGSM / PGD
def test_fgsm_lowers_accuracy_and_stays_in_ball(model_fn, test_slice):
    x, y = test_slice
    clean = accuracy(model_fn, x, y)
    x_adv = attacks.fgsm(model_fn, x, y, 0.2).numpy()
    assert clean > 0.9
    assert accuracy(model_fn, x_adv, y) < clean - 0.3
    assert linf(x_adv, x).max() <= 0.2 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
    # random init (FGSM-RS) and L2 also stay in their balls
    x_rs = attacks.fgsm(model_fn, x, y, 0.2, rand_init=True, seed=1).numpy()
    assert linf(x_rs, x).max() <= 0.2 + 1e-6
    x_l2 = attacks.fgsm(model_fn, x, y, 2.0, norm="l2").numpy()
    assert l2(x_l2, x).max() <= 2.0 * (1 + 1e-5)
    assert accuracy(model_fn, x_l2, y) < clean


def test_attacks_start_from_a_given_random_start(model_fn, test_slice):
    x = test_slice[0][:50]
    y = test_slice[1][:50]
    d = np.random.default_rng(0).uniform(-0.5, 0.5, x.shape).astype(np.float32)  # beyond eps
    # a vanishing step stays at the start, projected to the ball
    x_start = attacks.pgd(model_fn, x, y, 0.2, step_size=1e-12, steps=1, init=d).numpy()
    np.testing.assert_allclose(x_start, np.clip(x + np.clip(d, -0.2, 0.2), 0, 1), atol=1e-6)
    a = attacks.fgsm(model_fn, x, y, 0.2, rand_init=True, init=d).numpy()
    b = attacks.fgsm(model_fn, x, y, 0.2, rand_init=True, init=-d).numpy()
    np.testing.assert_array_equal(a, attacks.fgsm(model_fn, x, y, 0.2, rand_init=True,
                                                  init=d).numpy())
    assert np.abs(a - b).max() > 0.1 and linf(a, x).max() <= 0.2 + 1e-6
    with pytest.raises(ValueError, match="init must have the shape"):
        attacks.fgsm(model_fn, x, y, 0.2, rand_init=True, init=d[:10])


def test_pgd_with_restarts_at_least_as_strong_as_fgsm(model_fn, test_slice):
    x, y = test_slice[0][:200], test_slice[1][:200]
    acc_fgsm = accuracy(model_fn, attacks.fgsm(model_fn, x, y, 0.2), y)
    x_pgd = attacks.pgd(model_fn, x, y, 0.2, steps=10, restarts=2, seed=0).numpy()
    acc_pgd = accuracy(model_fn, x_pgd, y)
    assert acc_pgd <= acc_fgsm
    assert acc_pgd < 0.5 * accuracy(model_fn, x, y)
    assert linf(x_pgd, x).max() <= 0.2 + 1e-6
    x2 = attacks.pgd(model_fn, x[:64], y[:64], 1.5, steps=5, norm="l2", seed=0).numpy()
    assert l2(x2, x[:64]).max() <= 1.5 * (1 + 1e-5)


def test_restarts_keep_worst_case_per_example(model_fn, test_slice):
    x, y = test_slice[0][:200], test_slice[1][:200]
    kw = dict(steps=3, step_size=0.03, seed=3)
    one = attacks.pgd(model_fn, x, y, 0.1, restarts=1, **kw)
    three = attacks.pgd(model_fn, x, y, 0.1, restarts=3, **kw)
    wrong1 = np.argmax(model_fn(one).numpy(), -1) != y
    wrong3 = np.argmax(model_fn(three).numpy(), -1) != y
    assert np.all(wrong3[wrong1])  # restart 0 is among the three: never less successful


def test_targeted_pgd_reaches_target(model_fn, test_slice):
    x, y = test_slice[0][:100], test_slice[1][:100]
    t = (y + 1) % 10
    x_adv = attacks.pgd(model_fn, x, t, 0.3, steps=20, targeted=True, seed=0)
    assert np.mean(np.argmax(model_fn(x_adv).numpy(), -1) == t) > 0.8


def test_fgsm_pgd_trace_in_tf_function_and_replica_context(model_fn, test_slice, mirrored_2cpu):
    x, y = test_slice[0][:64], test_slice[1][:64]
    eager = attacks.fgsm(model_fn, x, y, 0.1).numpy()
    compiled = tf.function(lambda a, b: attacks.fgsm(model_fn, a, b, 0.1))(x, y).numpy()
    np.testing.assert_allclose(compiled, eager, atol=1e-6)
    # as called from a train_step under MirroredStrategy (per-replica, inside tf.function)
    strategy = mirrored_2cpu
    ds = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(64, drop_remainder=True))

    @tf.function
    def step(batch):
        def replica_fn(xb, yb):
            adv = attacks.pgd(model_fn, xb, yb, 0.1, steps=3, restarts=2, seed=0)
            fg = attacks.fgsm(model_fn, xb, yb, 0.1, rand_init=True)
            return tf.reduce_max(tf.abs(adv - xb)), tf.reduce_max(tf.abs(fg - xb))
        return strategy.run(replica_fn, args=batch)

    for batch in ds:
        out = step(batch)
    d_pgd, d_fgsm = [max(float(r) for r in strategy.experimental_local_results(o)) for o in out]
    assert 0.05 < float(d_pgd) <= 0.1 + 1e-6 and float(d_fgsm) <= 0.1 + 1e-6


# ----------------------------------------------------------------------------- universal
@pytest.fixture(scope="module")
def sgd_result(model_fn, search_set):
    x, y = search_set
    return attacks.targeted_universal(model_fn, x, y, EPS, method="sgd", targets=[2, 3, 8],
                                      delta=0.2, max_passes=6, batch_size=50, seed=0)


def test_sgd_search_reaches_held_out_success(model_fn, sgd_result, held_out):
    V, stats = sgd_result
    assert V.shape == (10, 28, 28, 1) and V.dtype == np.float32
    np.testing.assert_array_equal(V[[0, 1, 4, 5, 6, 7, 9]], 0.0)  # not searched
    assert stats["success_rate"][0] is None and stats["success_rate"][2] > 0.5
    assert stats["traces"] == 1  # one compiled pass function, no retracing between passes
    rate = attacks.targeted_success_rate(model_fn, *held_out, V, targets=[2, 3, 8])
    assert np.all(rate[[2, 3, 8]] > 0.5), rate
    assert np.isnan(rate[0])
    assert np.abs(V).max() <= EPS  # exactly, in float64


def test_success_rate_matches_direct_count(model_fn, sgd_result, held_out):
    V, _ = sgd_result
    x, y = held_out[0][:300], held_out[1][:300]
    rate = attacks.targeted_success_rate(model_fn, x, y, V, batch_size=64)
    for t in (2, 8):
        keep = y != t
        pred = np.argmax(model_fn(ops.apply_perturbation(x[keep], V[t])).numpy(), -1)
        assert rate[t] == pytest.approx(np.mean(pred == t), abs=1e-9)
    # with a cache, another V reuses the compiled step (no new trace), same figures
    cache = {}
    np.testing.assert_array_equal(
        attacks.targeted_success_rate(model_fn, x, y, V, batch_size=64, cache=cache), rate)
    half = attacks.targeted_success_rate(model_fn, x, y, V * 0.5, batch_size=64, cache=cache)
    np.testing.assert_array_equal(
        half, attacks.targeted_success_rate(model_fn, x, y, V * 0.5, batch_size=64))
    assert not np.array_equal(half[[2, 3, 8]], rate[[2, 3, 8]])
    (step,) = cache.values()
    assert step._compiled.experimental_get_tracing_count() == 1


def test_l2_search_respects_bound_exactly(model_fn, search_set, held_out):
    x, y = search_set
    eps = 4.0
    V, stats = attacks.targeted_universal(model_fn, x, y, eps, norm="l2", targets=[3, 8],
                                          max_passes=4, batch_size=50, seed=1)
    norms = np.sqrt((V.astype(np.float64) ** 2).reshape(10, -1).sum(1))
    assert np.all(norms <= eps) and norms[3] > 0.9 * eps
    rate = attacks.targeted_success_rate(model_fn, *held_out, V, targets=[3, 8])
    assert np.all(rate[[3, 8]] > 0.3), rate


def test_batched_and_reference_search(model_fn, search_set, held_out):
    x, y = search_set
    V, stats = attacks.targeted_universal(model_fn, x, y, EPS, method="batched",
                                          targets=[2, 8], max_passes=3, batch_size=50,
                                          inner_steps=5, seed=0)
    assert stats["method"] == "batched" and np.abs(V).max() <= EPS
    rate = attacks.targeted_success_rate(model_fn, *held_out, V, targets=[2, 8])
    assert np.all(rate[[2, 8]] > 0.2), rate
    xs, ys = x[:60], y[:60]  # the per-image reference loop on a tiny slice
    Vr, sr = attacks.targeted_universal(model_fn, xs, ys, EPS, method="reference",
                                        targets=[2], max_passes=2, inner_steps=5, seed=0)
    assert np.abs(Vr).max() <= EPS and np.abs(Vr[2]).max() > 0
    rate = attacks.targeted_success_rate(model_fn, *held_out, Vr, targets=[2])
    assert rate[2] > 0.25, rate


@pytest.mark.parametrize("per_source", [False, True])
def test_mirrored_search_matches_default(model_fn, search_set, per_source, mirrored_2cpu):
    x, y = search_set[0][:120], search_set[1][:120]
    kw = dict(targets=[2, 3], max_passes=2, batch_size=40, seed=5, per_source=per_source)
    V1, s1 = attacks.targeted_universal(model_fn, x, y, EPS, **kw)
    V2, s2 = attacks.targeted_universal(model_fn, x, y, EPS, strategy=mirrored_2cpu, **kw)
    assert s2["num_replicas"] == 2 and np.abs(V1[..., 2, :, :, :] if per_source else V1[2]
                                              ).max() > 0.1
    diff = np.abs(V1 - V2)
    assert diff.mean() < 0.01 * EPS, diff.mean()
    np.testing.assert_allclose(s1["success_rate"][2], s2["success_rate"][2], atol=0.03)
    tf.keras.utils.set_random_seed(123)  # the search order does not depend on global seeds
    V3, _ = attacks.targeted_universal(model_fn, x, y, EPS, **kw)
    np.testing.assert_array_equal(V1, V3)  # deterministic for a seed


def test_cached_search_is_reused_without_retracing(model_fn, search_set):
    x, y = search_set[0][:120], search_set[1][:120]
    kw = dict(targets=[2, 3], max_passes=2, batch_size=40)
    cache: dict = {}
    V1, s1 = attacks.targeted_universal(model_fn, x, y, EPS, seed=4, cache=cache, **kw)
    (search,) = cache.values()
    V2, s2 = attacks.targeted_universal(model_fn, x, y, EPS, seed=5, cache=cache, **kw)
    assert list(cache.values()) == [search] and s2["traces"] == 1  # reused, not traced again
    V3, _ = attacks.targeted_universal(model_fn, x, y, EPS, seed=5, **kw)
    np.testing.assert_array_equal(V2, V3)  # a reused search starts afresh from V = 0
    assert np.abs(V1 - V2).max() > 0  # another seed, another order
    attacks.targeted_universal(model_fn, x, y, 0.2, seed=5, cache=cache, **kw)
    assert list(cache.values()) != [search]  # other settings: a new search replaces it


def test_search_continues_from_a_given_v(model_fn, search_set, sgd_result):
    """``init`` starts the search from a V (projected into the ball); rows not searched stay
    zero; a V of the wrong shape is refused."""
    x, y = search_set[0][:100], search_set[1][:100]
    step = 0.01
    kw = dict(targets=[2, 3, 8], max_passes=1, batch_size=50, step_size=step, delta=1.0)
    start = sgd_result[0]  # a searched V, [10,28,28,1]
    V, stats = attacks.targeted_universal(model_fn, x, y, EPS, init=start, **kw)
    # 1 pass of 2 steps: each searched row moves at most 2 steps from where it started
    assert linf(V[[2, 3, 8]], start[[2, 3, 8]]).max() <= 2 * step + 1e-6
    assert not V[[0, 1, 4, 5, 6, 7, 9]].any()
    cold, _ = attacks.targeted_universal(model_fn, x, y, EPS, **kw)
    assert linf(cold[[2, 3, 8]], start[[2, 3, 8]]).min() > 2 * step  # from zero: far off
    outside, _ = attacks.targeted_universal(model_fn, x, y, EPS, init=np.full_like(start, 0.9),
                                            **kw)
    assert np.abs(outside).max() <= EPS + 1e-6  # projected into the ball, then searched
    assert np.abs(outside[[2, 3, 8]]).min() >= EPS - 2 * step - 1e-6
    with pytest.raises(ValueError, match=r"init must be a V of shape \[10, 28, 28, 1\]"):
        attacks.targeted_universal(model_fn, x, y, EPS, init=start[:5], **kw)
    with pytest.raises(ValueError, match="init holds NaN"):
        attacks.targeted_universal(model_fn, x, y, EPS, init=np.full_like(start, np.nan), **kw)


def test_per_source_search_holds_one_perturbation_per_class_pair(model_fn, search_set, tmp_path):
    x, y = search_set
    V, stats = attacks.targeted_universal(model_fn, x, y, EPS, targets=[2, 3, 8],
                                          max_passes=3, batch_size=50, seed=0, per_source=True)
    assert V.shape == (10, 10, 28, 28, 1) and np.abs(V).max() <= EPS
    assert stats["per_source"] and stats["traces"] == 1
    for t in (2, 3, 8):
        assert not V[t, t].any() and stats["success_rate_pairs"][t][t] is None  # s == t
        assert all(np.abs(V[s, t]).max() > 0.1 for s in range(10) if s != t)
    np.testing.assert_array_equal(V[:, [0, 1, 4, 5, 6, 7, 9]], 0.0)  # targets not searched
    # V[s, t] differ between sources: they are not one perturbation per target repeated
    assert np.abs(V[0, 8] - V[1, 8]).mean() > 0.05
    # The per-target rate of the search equals an independent count on the search images
    # where each image of label s gets V[s, t]; each pair's rate is its own count.
    rate = attacks.targeted_success_rate(model_fn, x, y, V, targets=[2, 3, 8])
    for t in (2, 3, 8):
        assert stats["success_rate"][t] == pytest.approx(rate[t], abs=1e-6)
        assert stats["success_rate"][t] > 0.5
        for s in (0, 5):
            pred = np.argmax(model_fn(ops.apply_perturbation(x[y == s], V[s, t])).numpy(), -1)
            assert stats["success_rate_pairs"][s][t] == pytest.approx(np.mean(pred == t),
                                                                       abs=1e-6)
    # The batched (paper-style) update per source: bounded, and it fools on the search images.
    Vb, sb = attacks.targeted_universal(model_fn, x, y, EPS, method="batched", targets=[8],
                                        max_passes=2, batch_size=50, inner_steps=3, seed=0,
                                        per_source=True)
    assert np.abs(Vb).max() <= EPS and not Vb[8, 8].any() and np.abs(Vb[3, 8]).max() > 0
    assert sb["success_rate"][8] == pytest.approx(
        attacks.targeted_success_rate(model_fn, x, y, Vb, targets=[8])[8], abs=1e-6)
    assert sb["success_rate"][8] > 0.2
    # A source class absent from the search images gets no perturbation and no rate.
    keep = y != 4
    V4, s4 = attacks.targeted_universal(model_fn, x[keep], y[keep], EPS, targets=[8],
                                        max_passes=1, batch_size=50, per_source=True)
    assert not V4[4].any() and s4["success_rate_pairs"][4][8] is None and V4[3, 8].any()
    with pytest.raises(ValueError, match="per source"):
        attacks.targeted_success_rate(model_fn, x, y, V[:, :9])
    out = tmp_path / "pairs"  # written as a grid: one row per source class
    report = perturbation_files.write_search(str(out), V, stats, x, class_names=[str(c) for c in range(10)])
    assert report["mean_success_search"] == pytest.approx(
        np.mean([stats["success_rate"][t] for t in (2, 3, 8)]))
    stored, meta = perturbation_files.load(str(out / "perturbations.npz"))
    np.testing.assert_array_equal(stored, V)
    assert meta[perturbation_files.FINGERPRINT_KEY] == data.fingerprints(x).tolist()
    assert 1000 < (out / "perturbations.png").stat().st_size < 200_000


def test_xla_compiled_search_matches(model_fn, search_set):
    x, y = search_set[0][:80], search_set[1][:80]
    kw = dict(targets=[3], max_passes=1, batch_size=40, seed=2)
    V1, _ = attacks.targeted_universal(model_fn, x, y, EPS, **kw)
    V2, s2 = attacks.targeted_universal(model_fn, x, y, EPS, jit_compile=True, **kw)
    assert np.abs(V1[3]).max() > 0 and np.abs(V2).max() <= EPS
    assert np.mean(np.abs(V1 - V2)) < 0.02 * EPS


def test_untargeted_universal_fools(model_fn, search_set, held_out):
    x, y = search_set
    v, stats = attacks.untargeted_universal(model_fn, x, y, EPS, max_passes=3, batch_size=50)
    assert v.shape == (28, 28, 1) and np.abs(v).max() <= EPS
    assert stats["fooling_rate"] > 0.3
    assert attacks.fooling_rate(model_fn, held_out[0], v) > 0.3
    assert attacks.fooling_rate(model_fn, held_out[0], np.zeros_like(v)) == 0.0


# ----------------------------------------------------------------------------- errors & files
def test_bad_inputs_raise_clear_errors(model_fn, search_set, mirrored_2cpu):
    x, y = search_set[0][:20], search_set[1][:20]
    tu = attacks.targeted_universal
    with pytest.raises(ValueError, match="eps"):
        tu(model_fn, x, y, -0.1)
    with pytest.raises(ValueError, match="norm"):
        tu(model_fn, x, y, 0.1, norm="l1")
    with pytest.raises(ValueError, match="method"):
        tu(model_fn, x, y, 0.1, method="adam")
    with pytest.raises(ValueError, match="out of range"):
        tu(model_fn, x, y, 0.1, targets=[3, 10])
    with pytest.raises(ValueError, match="logits"):
        tu(model_fn, x, y, 0.1, num_classes=7)  # the model returns 10 logits, not 7
    with pytest.raises(ValueError, match="delta"):
        tu(model_fn, x, y, 0.1, delta=1.5)
    with pytest.raises(ValueError, match="shape"):
        tu(model_fn, np.zeros((4, 32, 32, 3), np.float32), np.zeros(4, np.int32), 0.1)
    with mirrored_2cpu.scope():
        with pytest.raises(ValueError, match="sequential"):
            tu(model_fn, x, y, 0.1, method="reference")
    with pytest.raises(ValueError, match="perturbations must be"):
        attacks.targeted_success_rate(model_fn, x, y, np.zeros((10, 32, 32, 3)))
    with pytest.raises(ValueError, match="logits"):
        attacks.targeted_success_rate(model_fn, x, y, np.zeros((4, 28, 28, 1)))
    with pytest.raises(ValueError, match="eps"):
        attacks.fgsm(model_fn, x, y, -1.0)
    with pytest.raises(ValueError, match="norm"):
        attacks.pgd(model_fn, x, y, 0.1, norm="linfinity")
    with pytest.raises(ValueError, match="steps"):
        attacks.pgd(model_fn, x, y, 0.1, steps=0)
    with pytest.raises(ValueError, match="shape"):
        attacks.fooling_rate(model_fn, x, np.zeros((28, 28, 3)))


def test_save_load_round_trip(tmp_path):
    V = np.random.default_rng(0).uniform(-0.3, 0.3, (10, 28, 28, 1)).astype(np.float32)
    path = perturbation_files.save(str(tmp_path / "v.npz"), V, eps=0.3, norm="linf",
                                      success=np.array([0.5, 0.25]), targets=[1, 2])
    V2, meta = perturbation_files.load(path)
    np.testing.assert_array_equal(V, V2)
    assert meta == {"eps": 0.3, "norm_type": "linf", "success": [0.5, 0.25], "targets": [1, 2]}
    with np.load(path, allow_pickle=False) as f:  # plain arrays, no pickled objects
        assert sorted(f.files) == ["meta", "perturbations"]
    np.savez(str(tmp_path / "other.npz"), a=np.zeros(3))
    with pytest.raises(ValueError, match="perturbations"):
        perturbation_files.load(str(tmp_path / "other.npz"))


def test_search_progress_shows_current_values_and_finishes_on_an_early_stop(
        model_fn, search_set, capsys):
    x, y = search_set[0][:200], search_set[1][:200]
    search = attacks.UniversalSearch(model_fn, x.shape[1:], list(range(10)), EPS)
    # delta 1: every target has reached 1 - delta = 0 after the first pass (1 of up to 4).
    _, _, passes, history = search.run(x, y, max_passes=4, delta=1.0, progress=True)
    out = capsys.readouterr().out
    assert passes == 1 and "targeted universal search: 10 perturbations, 200 images" in out
    rate = float(np.mean(history[-1]))
    assert f"success: {rate:.4f}" in out and "active rows: 0" in out  # the values of pass 1
    assert "1/4" in out and out.endswith("\n")  # the bar was finished at the early stop


def test_save_perturbations_is_atomic(tmp_path, monkeypatch):
    import errno

    path = str(tmp_path / "v.npz")
    perturbation_files.save(path, np.zeros((10, 28, 28, 1)), eps=0.3, norm="linf")
    before = open(path, "rb").read()

    def disk_full(file, **arrays):
        with open(file, "wb") as f:
            f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    with pytest.raises(OSError, match="v.npz"):
        perturbation_files.save(path, np.ones((10, 28, 28, 1)) * 0.1, eps=0.3, norm="linf")
    assert open(path, "rb").read() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.npz"]

