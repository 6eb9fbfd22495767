"""The attack registry's contract: every registered attack, called by name on 32 real MNIST
test images against a small dense net, stays in the eps ball and the pixel box, is
deterministic for a seed and gives the same images under a 2-replica MirroredStrategy; and an
attack registered by one entry runs in the AutoAttack driver."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from rat_tf import attacks, evaluation, models, ops
from rat_tf import autoattack as aa

EPS = 0.1
SETTINGS = attacks.RunSettings(eps=EPS, steps=3, n_queries=20, n_target_classes=2, restarts=2)
# FAB-T keeps shrinking the adversarial examples it found until every image of its batch has
# one, so the example an image keeps depends on when its replica's half of the batch stops;
# which images it breaks does not.
SAME_BROKEN_ONLY = {"fab-t"}


@pytest.fixture(scope="module")
def batch(mnist_arrays):
    _, _, x_test, y_test = mnist_arrays
    return x_test[:32], y_test[:32]


@pytest.fixture(scope="module")
def model_fn(mnist_arrays):
    """A dense net (784-32-10) fitted 1 epoch on 2,000 training images."""
    x_train, y_train, _, _ = mnist_arrays
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train[:2000], y_train[:2000], batch_size=64, epochs=1, verbose=0)
    return models.as_model_fn(model)


def run(name: str, model_fn, x, y, seed: int = 1, strategy=None) -> np.ndarray:
    """Attack ``name`` on (x, y): per replica in a ReplicaStep if it runs per replica, else
    the attack's own driver on ``strategy``."""
    attack = attacks.get_attack(name)
    if attack.per_replica:
        step = attacks.ReplicaStep(
            lambda xb, yb: attack.call(model_fn, xb, yb, EPS, SETTINGS, seed), strategy)
        return step([x, y])
    return np.asarray(attack.call(model_fn, x, y, EPS, SETTINGS, seed, strategy))


def check_ball_and_box(x_adv: np.ndarray, x: np.ndarray) -> None:
    assert x_adv.shape == x.shape and x_adv.dtype == np.float32
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    assert np.abs(x_adv - x).max() <= EPS + 1e-6


@pytest.mark.parametrize("name", sorted(attacks.REGISTRY))
def test_every_attack_stays_in_the_ball_and_box_and_is_deterministic(name, model_fn, batch):
    x, y = batch
    first = run(name, model_fn, x, y)
    check_ball_and_box(first, x)
    assert np.abs(first - x).max() > 0  # it moved some image
    np.testing.assert_array_equal(run(name, model_fn, x, y), first)


@pytest.mark.parametrize("name", sorted(attacks.REGISTRY))
def test_every_attack_gives_the_same_images_on_two_replicas(name, model_fn, batch,
                                                            mirrored_2cpu):
    """Per-replica attacks: equal up to float32 rounding; the universal search all-reduces its
    gradient sums (another order of additions), so its images agree up to a few signs."""
    x, y = batch
    want = run(name, model_fn, x, y)
    got = run(name, model_fn, x, y, strategy=mirrored_2cpu)
    check_ball_and_box(got, x)
    if name in SAME_BROKEN_ONLY:
        predict = lambda z: np.argmax(model_fn(tf.constant(z)).numpy(), -1)  # noqa: E731
        np.testing.assert_array_equal(predict(got) != y, predict(want) != y)
    elif attacks.get_attack(name).per_replica:
        np.testing.assert_allclose(got, want, atol=1e-6)
    else:
        assert np.abs(got - want).mean() < 0.01 * EPS


def test_the_registry_holds_the_built_in_attacks():
    assert set(attacks.REGISTRY.built_in) == {"fgsm", "pgd", "apgd-ce", "apgd-dlr", "apgd-t",
                                              "fab-t", "square", "uap"}
    assert attacks.autoattack_names() == aa.ATTACKS == (
        "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")
    with pytest.raises(ValueError, match="already registered"):
        attacks.register(attacks.get_attack("fgsm"))
    with pytest.raises(ValueError, match="built-in attack"):
        attacks.unregister("pgd")
    with pytest.raises(ValueError, match="unknown attack 'cw'"):
        attacks.get_attack("cw")


# --------------------------------------------------------------------------- a toy attack
def random_sign(model_fn, x, y, eps, *, seed=0, clip_values=ops.PIXEL_RANGE) -> tf.Tensor:
    """x + eps * a random sign per pixel, in the box (``seed``: an int or a seed [2])."""
    del model_fn, y
    seed = tf.constant([seed, 0], tf.int64) if isinstance(seed, int) else seed
    signs = ops.replica_rows(
        lambda shape: tf.sign(tf.random.stateless_uniform(shape, seed, -1.0, 1.0)), tf.shape(x))
    return ops.apply_perturbation(x, eps * signs, clip_values)


def toy_run(model_fn, x, y, todo, logits, r, seed, settings):
    del todo, logits, r
    x_adv = random_sign(model_fn, x, y, settings.eps, seed=seed, clip_values=settings.clip)
    fooled = tf.not_equal(tf.argmax(model_fn(x_adv), -1, output_type=tf.int32), y)
    return fooled, x_adv, x_adv, tf.zeros(tf.shape(y), tf.float32)


def toy_call(model_fn, x, y, eps, settings, seed, strategy=None):
    del strategy
    return random_sign(model_fn, x, y, eps, seed=seed, clip_values=settings.clip)


TOY = attacks.Attack("toy", random_sign, toy_call, run=toy_run, linf_only=True)


@pytest.fixture
def toy():
    """The toy attack, registered by its one entry for the test and removed after it."""
    attacks.register(TOY)
    yield "toy"
    attacks.unregister("toy")


def test_a_registered_toy_attack_runs_in_autoattack(toy, model_fn, batch):
    x, y = batch
    assert toy in attacks.autoattack_names()
    check_ball_and_box(run(toy, model_fn, x, y), x)
    out = aa.autoattack(model_fn, x, y, 0.3, attacks=[toy, "apgd-ce"], steps=1, batch_size=32,
                        seed=2)
    assert list(out["robust_accuracy"]) == ["clean", toy, "apgd-ce"]
    assert toy in out["broken_by"], out["broken_by"]  # it broke some images, APGD-CE others
    per_image = evaluation.aa_per_image(evaluation.aa_per_image_codes(out["broken_by"],
                                                                      [toy, "apgd-ce"]))
    assert per_image == [b or "robust" for b in out["broken_by"]] and toy in per_image
    cost = aa.attack_cost(toy, 100, steps=7, batch_size=50)
    assert cost == 2 * 1.0 * 7 * 64  # 2 batches of 50 (at least 64 effective), 1 pass a step
    with pytest.raises(ValueError, match="toy support norm 'linf' only"):
        aa.autoattack(model_fn, x, y, 0.3, attacks=[toy], norm="l2")


def test_an_unregistered_attack_is_unknown_to_autoattack(model_fn, batch):
    x, y = batch
    assert "toy" not in attacks.REGISTRY
    with pytest.raises(ValueError, match="unknown attack 'toy'"):
        aa.autoattack(model_fn, x, y, 0.3, attacks=["toy"])
