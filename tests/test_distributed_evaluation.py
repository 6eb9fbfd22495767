"""Distributed evaluation: every measure under MirroredStrategy on 2 logical CPUs, and the
batched loops under a 2-process MultiWorkerMirroredStrategy, give the default strategy's
per-image results.

Each global batch is split over the replicas and random starts are drawn for the whole batch,
so accuracies (clean, FGSM, PGD with restarts, per class, AutoAttack, the masking checks) must
be equal, not close. The universal searches all-reduce their gradient sums, which adds them in
another order than one device does: their perturbations agree up to the sign of a few
near-zero sums, so they are compared with a tolerance.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from rat_tf import attacks, evaluation, models, ops
from rat_tf import autoattack as aa

N_TEST = 110  # in batches of 50: the last one is padded, replica 1's slice of it all padding


@pytest.fixture(scope="module")
def settings():
    return evaluation.EvalSettings.for_dataset(
        "mnist", fgsm_eps=(0.1, 0.2), pgd_eps=(0.1,), pgd_steps=5, pgd_restarts=2,
        class_eps=0.1, tup_passes=1, tup_n_per_class=5, tup_batch_size=20, uap_passes=1,
        n_test=N_TEST, batch_size=50, aa_eps=0.1, aa_n=50, aa_steps=5, aa_queries=50,
        masking_steps=5, masking_n=50, seed=0)


@pytest.fixture(scope="module")
def split(mnist_arrays):
    x_train, y_train, x_test, y_test = mnist_arrays
    return x_test[:N_TEST], y_test[:N_TEST], x_train[-1000:], y_train[-1000:]


@pytest.fixture(scope="module")
def reports(mnist_model, split, settings, mirrored_2cpu):
    x_test, y_test, xs, ys = split
    given = np.random.default_rng(0).uniform(-0.2, 0.2, (10, 28, 28, 1)).astype(np.float32)
    return {name: evaluation.robustness_report(
        mnist_model, x_test, y_test, x_search=xs, y_search=ys, perturbations=given,
        settings=settings, name="m", progress=False, strategy=strategy)
        for name, strategy in (("default", None), ("mirrored", mirrored_2cpu))}


def test_mirrored_report_equals_default(reports):
    want, got = reports["default"], reports["mirrored"]
    assert (want["num_replicas"], got["num_replicas"]) == (1, 2)
    assert got["strategy"] == "MirroredStrategy"
    assert want["autoattack"]["after_each"]["apgd-ce"] > 0  # the later attacks have work
    for key in ("clean_accuracy", "fgsm_accuracy", "pgd_accuracy", "pgd_fgsm_accuracy",
                "per_class", "tup_given", "masking"):
        assert got[key] == want[key], key
    for key in ("eps", "num_images", "robust_accuracy", "after_each", "broken_by"):
        assert got["autoattack"][key] == want["autoattack"][key], key
    # universal searches: all-reduced sums, so V differs where a sum is near zero
    eps = want["settings"]["tup_eps"]
    for key in ("tup_fresh", "uap"):
        diff = np.abs(got.arrays[key] - want.arrays[key])
        assert diff.mean() < 0.01 * eps, (key, diff.mean())
    np.testing.assert_allclose(got["tup_fresh"]["success_rate"],
                               want["tup_fresh"]["success_rate"], atol=0.03)
    assert got["uap"]["fooling_rate"] == pytest.approx(want["uap"]["fooling_rate"], abs=0.03)


@pytest.fixture(scope="module")
def model_fn(mnist_model):
    return models.as_model_fn(mnist_model)


ATTACKS = {
    "pgd": lambda f, x, y: attacks.pgd(f, x, y, 0.1, steps=3, restarts=2, seed=1),
    "fgsm-rs": lambda f, x, y: attacks.fgsm(f, x, y, 0.1, rand_init=True, seed=2),
    "apgd-ce": lambda f, x, y: aa.apgd(f, x, y, 0.1, steps=3, restarts=2, seed=3),
    "square": lambda f, x, y: aa.square(f, x, y, 0.1, n_queries=20, seed=5),
    "fab-t": lambda f, x, y: aa.fab(f, x, y, 0.1, steps=3, n_target_classes=1, restarts=2,
                                    seed=6),
}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_random_attacks_do_not_depend_on_the_split(name, model_fn, split, mirrored_2cpu):
    """Each attack's adversarial images, per replica, equal those of the whole batch (APGD-T
    draws its starts as APGD-CE does; it runs in the report's AutoAttack)."""
    x, y = split[0][:20], split[1][:20]
    attack = ATTACKS[name]
    want = attacks.ReplicaStep(lambda xb, yb: attack(model_fn, xb, yb))([x, y])
    got = attacks.ReplicaStep(lambda xb, yb: attack(model_fn, xb, yb), mirrored_2cpu)([x, y])
    assert np.abs(want - x).max() > 0.05  # the attack moved the images
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_replica_step_keeps_order_dtypes_and_padding(mirrored_2cpu):
    x = np.arange(14, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)

    def fn(xb, scale):
        ctx = tf.distribute.get_replica_context()
        replica = tf.fill(tf.shape(xb)[:1], tf.cast(ctx.replica_id_in_sync_group, tf.int32))
        draw = ops.replica_rows(lambda s: tf.random.stateless_uniform(s, [7, 0]), tf.shape(xb))
        return xb * scale, xb[:, 0] > 4, replica, draw

    step = attacks.ReplicaStep(fn, mirrored_2cpu)
    scaled, big, replica, draw = step.map_batches([x], 8, 2.0)
    np.testing.assert_array_equal(scaled, 2 * x)
    assert big.dtype == bool and big.tolist() == (x[:, 0] > 4).tolist()
    assert replica.dtype == np.int32 and replica.tolist() == [0] * 4 + [1] * 4 + [0] * 4 + [1] * 2
    full = tf.random.stateless_uniform([8, 3], [7, 0]).numpy()
    np.testing.assert_array_equal(draw, np.concatenate([full, full[:6]]))  # per global batch


def test_batch_size_must_split_over_the_replicas(mnist_model, model_fn, split, settings,
                                                 mirrored_2cpu):
    x_test, y_test, xs, ys = split
    odd = evaluation.EvalSettings(**{**vars(settings), "batch_size": 75})
    with pytest.raises(ValueError, match="batch_size 75 does not split evenly over the 2 "
                                         "replicas of MirroredStrategy"):
        evaluation.robustness_report(mnist_model, x_test, y_test, x_search=xs, y_search=ys,
                                     settings=odd, progress=False, strategy=mirrored_2cpu)
    step = evaluation.correct_fn(model_fn, strategy=mirrored_2cpu)
    with pytest.raises(ValueError, match="batch size 25 does not split evenly"):
        evaluation.correct_on(step, x_test, y_test, 25)
    with pytest.raises(ValueError, match="batch_size 25 does not split evenly"):
        aa.autoattack(model_fn, x_test[:60], y_test[:60], 0.1, batch_size=25,
                      strategy=mirrored_2cpu)
    # fewer images than a batch: the batch shrinks to a multiple of the replicas
    ok = evaluation.correct_on(step, x_test[:7], y_test[:7], 8)
    assert ok.shape == (7,) and ok.dtype == bool


# --------------------------------------------------------------------------- multi-worker
def per_image(model_fn, x, y, strategy) -> dict:
    """Per-image results of the batched loops: PGD with restarts and AutoAttack."""
    step = evaluation.correct_fn(model_fn, lambda xb, yb, eps: attacks.pgd(
        model_fn, xb, yb, eps, steps=3, restarts=2, seed=0), strategy)
    res = aa.autoattack(model_fn, x, y, 0.1, attacks=["apgd-ce", "square"], batch_size=20,
                        steps=3, n_queries=20, restarts=2, strategy=strategy)
    return {"pgd": evaluation.correct_on(step, x, y, 20, 0.1), "aa_robust": res["robust"],
            "aa_x": res["x_adv"]}


WORKER = """
import sys
import keras
import numpy as np
from rat_tf import distribute, models
from test_distributed_evaluation import per_image
strategy = distribute.get_strategy("multi_worker")
arrays = np.load(sys.argv[1])
model_fn = models.as_model_fn(keras.models.load_model(sys.argv[2], compile=False))
out = per_image(model_fn, arrays["x"], arrays["y"], strategy)
if distribute.is_chief(strategy):
    np.savez(sys.argv[3], **out)
"""


def test_multi_worker_loops_equal_default(model_fn, mnist_model_path, split, tmp_path):
    """2 workers of one replica each: every worker gets the whole batch back, in order."""
    x, y = split[0][:30], split[1][:30]  # the last batch of 20 is padded
    np.savez(tmp_path / "images.npz", x=x, y=y)
    socks = [socket.socket() for _ in range(2)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    cluster = {"worker": [f"127.0.0.1:{s.getsockname()[1]}" for s in socks]}
    for s in socks:
        s.close()
    here = os.path.dirname(os.path.abspath(__file__))
    procs = [subprocess.Popen(
        [sys.executable, "-c", WORKER, str(tmp_path / "images.npz"), mnist_model_path,
         str(tmp_path / "out.npz")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=os.pathsep.join(
            [os.path.dirname(here), here, os.environ.get("PYTHONPATH", "")]),
                 TF_CONFIG=json.dumps({"cluster": cluster,
                                       "task": {"type": "worker", "index": i}})))
        for i in range(2)]
    try:
        logs = [p.communicate(timeout=300)[0].decode()[-3000:] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], logs
    got = np.load(tmp_path / "out.npz")
    want = per_image(model_fn, x, y, None)
    assert 0 < want["aa_robust"].sum() < len(x) and want["pgd"].sum() < len(x)
    for key in ("pgd", "aa_robust"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    np.testing.assert_allclose(got["aa_x"], want["aa_x"], atol=1e-6)
