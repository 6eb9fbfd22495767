"""RAT with V as the start of a per-image FGSM step (``RATModel(rat_init=...)``)."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from rat_tf import evaluation, models, trainers, training

EPS = 0.3


def _classifier(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return models.build_model("tiny_cnn", "mnist")


def _trainer(classifier, lr: float = 0.0, **kw) -> trainers.RATModel:
    trainer = trainers.make_trainer("rat", classifier, eps=EPS, **kw)
    trainer.compile(optimizer=keras.optimizers.SGD(lr))
    return trainer


def _ce_grad(classifier, x0, y) -> np.ndarray:
    """The input gradient of the summed true-class cross-entropy, by a tape of our own."""
    x0 = tf.constant(x0)
    with tf.GradientTape() as tape:
        tape.watch(x0)
        loss = tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(
            y, classifier(x0, training=False), from_logits=True))
    return tape.gradient(loss, x0).numpy()


@pytest.mark.parametrize("init,step", [("class", None), ("class", 0.1), ("zero", None)])
def test_fgsm_from_the_start_is_the_projected_signed_step(mnist_arrays, init, step):
    x, y = mnist_arrays[2][:64], mnist_arrays[3][:64].astype(np.int32)
    classifier = _classifier()
    v = np.random.default_rng(1).uniform(-EPS, EPS, (10, 28, 28, 1)).astype(np.float32)
    trainer = _trainer(classifier, rat_init=init, rat_step_size=step,
                       perturbations=v if init == "class" else None)
    got = trainer.adversarial_batch(tf.constant(x), tf.constant(y)).numpy()
    start = v[y] if init == "class" else np.zeros_like(x)
    g = _ce_grad(classifier, x + start, y)  # at the unclipped start, as Wong et al.'s FGSM
    want = np.clip(x + np.clip(start + (step or EPS) * np.sign(g), -EPS, EPS), 0, 1)
    # sign() of a gradient coordinate near zero may differ by rounding: a few pixels only
    assert np.mean(np.abs(got - want) < 1e-5) > 0.999
    assert np.abs(got - x).max() <= EPS + 1e-6 and got.min() >= 0 and got.max() <= 1


def test_v_rows_of_the_batch_move_up_the_true_class_loss(mnist_arrays):
    x, y = mnist_arrays[2][:64], mnist_arrays[3][:64].astype(np.int32)
    keep = np.isin(y, (3, 7))  # only classes 3 and 7: only V[3] and V[7] may move
    x, y = x[keep], y[keep]
    classifier = _classifier()
    trainer = _trainer(classifier, rat_init="class", online_step_size=0.05)  # lr 0: fixed weights
    v0 = trainer.get_perturbations().copy()
    assert np.allclose(np.abs(v0), EPS, atol=1e-5)  # random corners when no V is given
    trainer.train_on_batch(x, y)
    v1 = trainer.get_perturbations()
    moved = {c for c in range(10) if not np.array_equal(v0[c], v1[c])}
    assert moved == {3, 7}
    assert np.abs(v1).max() <= EPS + 1e-6
    loss = lambda v: keras.losses.sparse_categorical_crossentropy(  # noqa: E731
        y, classifier(x + v[y], training=False), from_logits=True).numpy().mean()
    assert loss(v1) > loss(v0)


def test_runner_up_targets_are_the_most_likely_wrong_class(mnist_arrays):
    x, y = mnist_arrays[2][:32], mnist_arrays[3][:32].astype(np.int32)
    classifier = _classifier()
    trainer = _trainer(classifier, rat_init="target", targets_per_image="runner_up")
    _, rows, targets = trainer.start(tf.constant(x), tf.constant(y))
    logits = classifier(x, training=False).numpy()
    logits[np.arange(len(y)), y] = -np.inf
    np.testing.assert_array_equal(targets.numpy(), logits.argmax(1))
    np.testing.assert_array_equal(rows.numpy(), targets.numpy())  # V[t]
    st = _trainer(classifier, rat_init="target", targets_per_image="runner_up", per_source=True)
    _, rows, targets = st.start(tf.constant(x), tf.constant(y))
    np.testing.assert_array_equal(rows.numpy(), y * 10 + targets.numpy())  # V[y, t]


def test_step_loss_ce_climbs_the_cross_entropy_from_the_v_t_start(mnist_arrays):
    x, y = mnist_arrays[2][:64], mnist_arrays[3][:64].astype(np.int32)
    classifier = _classifier()
    v = np.random.default_rng(2).uniform(-EPS, EPS, (10, 28, 28, 1)).astype(np.float32)
    kw = dict(rat_init="target", targets_per_image="runner_up", perturbations=v)
    ce = _trainer(classifier, rat_step_loss="ce", **kw)
    _, rows, targets = ce.start(tf.constant(x), tf.constant(y))
    start = v[targets.numpy()]  # the start is still V[runner-up]
    got = ce.adversarial_batch(tf.constant(x), tf.constant(y)).numpy()
    g = _ce_grad(classifier, x + start, y)
    want = np.clip(x + np.clip(start + EPS * np.sign(g), -EPS, EPS), 0, 1)
    assert np.mean(np.abs(got - want) < 1e-5) > 0.999
    # the default (auto) climbs the margin toward t: a different step on many pixels
    margin = _trainer(classifier, **kw).adversarial_batch(tf.constant(x), tf.constant(y))
    assert np.mean(np.abs(margin.numpy() - got) > 1e-5) > 0.05


def test_consistency_penalty_compares_logits_of_one_mode(mnist_arrays):
    """With batch norm, inference-mode and training-mode logits differ: the penalty must not
    count that difference (a step of ~0 from a zero start leaves nothing to penalise)."""
    x, y = mnist_arrays[2][:64], mnist_arrays[3][:64].astype(np.int32)
    keras.utils.set_random_seed(0)
    classifier = keras.Sequential([
        keras.Input((28, 28, 1)), keras.layers.Conv2D(8, 3), keras.layers.BatchNormalization(),
        keras.layers.ReLU(), keras.layers.Flatten(), keras.layers.Dense(10)])
    modes = classifier(x, training=True).numpy() - classifier(x, training=False).numpy()
    assert np.mean(np.square(modes)) > 1e-2  # the two modes disagree on this model
    trainer = _trainer(classifier, rat_init="zero", rat_step_size=1e-6, rat_consistency=1.0)
    logs = trainer.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["loss"]) and logs["consistency_loss"] < 1e-4


def test_noise_blurs_the_v_start_within_the_ball(mnist_arrays):
    x, y = mnist_arrays[2][:64], mnist_arrays[3][:64].astype(np.int32)
    classifier = _classifier()
    v = np.random.default_rng(1).choice(np.float32([-EPS, EPS]), (10, 28, 28, 1))
    kw = dict(rat_init="class", perturbations=v)
    plain = _trainer(classifier, **kw).start(tf.constant(x), tf.constant(y))[0].numpy()
    np.testing.assert_allclose(plain, v[y])
    noisy = _trainer(classifier, rat_init_noise=0.5, **kw)
    start = noisy.start(tf.constant(x), tf.constant(y))[0].numpy()
    assert np.abs(start).max() <= EPS + 1e-6
    moved = np.abs(start - v[y])
    assert moved.max() <= 0.5 * EPS + 1e-6  # noise of radius 0.5 eps, clipped to the ball
    # V sits at the corners, so about half the pixels are pushed out and clipped back
    assert 0.4 < np.mean(moved > 1e-6) < 0.6
    again = noisy.start(tf.constant(x), tf.constant(y))[0].numpy()
    np.testing.assert_array_equal(start, again)  # drawn from (seed, step): reproducible


def test_settings_are_checked_saved_and_fit_needs_no_v(tmp_path, mnist_arrays):
    classifier = _classifier()
    for bad, match in [(dict(rat_init="nope"), "rat_init must be one of"),
                       (dict(rat_init="class", per_source=True), "per_source"),
                       (dict(rat_init="class", online=True), "drop online"),
                       (dict(rat_step_size=0.1), "set rat_init"),
                       (dict(rat_init="target", targets_per_image="all"), "'all' does not apply"),
                       (dict(rat_init="class", rat_consistency=-1.0), "rat_consistency"),
                       (dict(rat_init="class", rat_step_size=0.0), "rat_step_size"),
                       (dict(rat_init="target", rat_init_noise=-0.5), "rat_init_noise"),
                       (dict(rat_init="random", rat_init_noise=0.5), "blurs a V start"),
                       (dict(rat_init_noise=0.5), "set rat_init"),
                       (dict(rat_init="target", rat_step_loss="nope"), "rat_step_loss must"),
                       (dict(rat_init="class", rat_step_loss="margin"), "toward a target"),
                       (dict(rat_init="random", rat_step_loss="margin"), "toward a target"),
                       (dict(rat_step_loss="ce"), "set rat_init")]:
        with pytest.raises(ValueError, match=match):
            trainers.make_trainer("rat", classifier, eps=EPS, **bad)
    with pytest.raises(ValueError, match="needs eps"):
        trainers.make_trainer("rat", classifier, rat_init="class")
    x, y = mnist_arrays[0][:64], mnist_arrays[1][:64]
    trainer = _trainer(classifier, lr=0.05, rat_init="class", rat_consistency=10.0)
    history = trainer.fit(x, y, batch_size=32, epochs=1, verbose=0).history
    assert {"adversarial_accuracy", "consistency_loss", "loss"} <= set(history)
    assert trainer.settings()["eps"] == EPS and trainer.settings()["rat_init"] == "class"
    path = str(tmp_path / "t.keras")
    trainer.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.rat == trainer.rat
    np.testing.assert_array_equal(loaded.get_perturbations(), trainer.get_perturbations())


def test_the_consistency_penalty_changes_the_update(mnist_arrays):
    x, y = mnist_arrays[0][:64], mnist_arrays[1][:64]
    weights = []
    for penalty in (0.0, 10.0):
        trainer = _trainer(_classifier(), lr=0.1, rat_init="class", rat_consistency=penalty)
        trainer.train_on_batch(x, y)
        weights.append(np.concatenate([w.numpy().ravel() for w in trainer.classifier.weights]))
    assert np.abs(weights[0] - weights[1]).max() > 1e-4


def _fit(strategy, x, y):
    with strategy.scope():
        trainer = _trainer(_classifier(), lr=0.05, rat_init="target", seed=3)
    history = trainer.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0).history
    return trainer, history


def test_v_and_losses_match_under_mirrored_strategy(mirrored_2cpu, mnist_arrays):
    x, y = mnist_arrays[0][:256], mnist_arrays[1][:256]
    one, h1 = _fit(tf.distribute.get_strategy(), x, y)
    two, h2 = _fit(mirrored_2cpu, x, y)
    v1, v2 = one.get_perturbations(), two.get_perturbations()
    v0 = trainers.RATModel(_classifier(), eps=EPS, rat_init="target", seed=3).get_perturbations()
    assert np.mean(v1 != v0) > 0.05  # V was learnt
    assert np.mean(v1 == v2) > 0.98  # sign steps: rounding near zero flips a few coordinates
    np.testing.assert_allclose(h1["loss"], h2["loss"], rtol=5e-3)


def test_train_learns_v_without_a_search_and_feeds_the_masking_checks(data_dir, tmp_path):
    cfg = training.TrainConfig(dataset="mnist", model="tiny_cnn", method="rat",
                               rat_init="class", epochs=1, batch_size=50, train_subset=500,
                               test_subset=200, data_dir=data_dir, seed=0,
                               model_dir=str(tmp_path / "run"))
    metrics = training.train(cfg)
    assert metrics["search_seconds"] == 0.0 and "search_success_rate" not in metrics
    assert os.path.isfile(os.path.join(cfg.model_dir, "perturbations.npz"))
    with open(os.path.join(cfg.model_dir, "metrics.json")) as f:
        record = evaluation.training_record(json.load(f))
    assert record is not None and record["eps"] == pytest.approx(0.3)
    assert 0.0 <= record["adversarial_accuracy"] <= 1.0
