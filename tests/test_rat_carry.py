"""RAT whose FGSM start is carried from an image's last step (``RATModel(rat_carry=...)``)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from rat_tf import models, trainers, training

EPS = 0.3
N = 96  # the carried images of the unit tests


def _trainer(carry: str = "last", lr: float = 0.0, seed: int = 0, **kw) -> trainers.RATModel:
    keras.utils.set_random_seed(seed)
    trainer = trainers.make_trainer(
        "rat", models.build_model("tiny_cnn", "mnist"), eps=EPS, rat_init="target",
        targets_per_image="runner_up", rat_carry=carry, carry_images=N, **kw)
    trainer.compile(optimizer=keras.optimizers.SGD(lr))
    return trainer


def _batch(mnist_arrays, index: np.ndarray):
    x, y = mnist_arrays[2][index], mnist_arrays[3][index].astype(np.int32)
    return {"image": tf.constant(x), "index": tf.constant(index, tf.int32)}, tf.constant(y)


def _carried(trainer) -> tuple[np.ndarray, np.ndarray]:
    return (keras.ops.convert_to_numpy(trainer.carried_starts),
            keras.ops.convert_to_numpy(trainer.carried))


def _input_grad(classifier, x0, y, t=None) -> np.ndarray:
    """The input gradient at x0 of the summed margin z_t - z_y (with targets t), else of the
    summed true-class cross-entropy (the training loss, in training mode)."""
    x0 = tf.constant(x0)
    with tf.GradientTape() as tape:
        tape.watch(x0)
        if t is None:
            out = keras.losses.sparse_categorical_crossentropy(
                y, classifier(x0, training=True), from_logits=True)
        else:
            z = classifier(x0, training=False)
            out = tf.gather(z, t, batch_dims=1) - tf.gather(z, y, batch_dims=1)
        value = tf.reduce_sum(out)
    return tape.gradient(value, x0).numpy()


def _agree(got: np.ndarray, want: np.ndarray) -> float:
    """The share of coordinates that agree (sign() of a near-zero gradient may flip)."""
    return float(np.mean(np.abs(got - want) < 1e-5))


def test_an_image_starts_where_its_last_fgsm_example_ended(mnist_arrays):
    trainer = _trainer("last")  # lr 0: the weights stay, so every step is predictable
    index = np.arange(10, 42)
    data, y = _batch(mnist_arrays, index)
    x = data["image"].numpy()
    first = trainer.adversarial_batch(data["image"], y).numpy()  # from V[t], not carried yet
    trainer.train_on_batch(data, y)
    starts, carried = _carried(trainer)
    assert set(np.flatnonzero(carried)) == set(index)  # only this batch's rows are carried
    assert _agree(starts[index], first - x) > 0.999
    assert not np.any(starts[np.setdiff1d(np.arange(N), index)])
    # the next step of these images starts from the carried perturbation, not from V[t]
    logits = trainer.classifier(x, training=False).numpy()
    logits[np.arange(len(index)), y.numpy()] = -np.inf
    t = logits.argmax(1)
    delta0 = starts[index]
    g = _input_grad(trainer.classifier, x + delta0, y.numpy(), t)
    want = np.clip(x + np.clip(delta0 + EPS * np.sign(g), -EPS, EPS), 0, 1) - x
    trainer.train_on_batch(data, y)
    assert _agree(_carried(trainer)[0][index], want) > 0.999
    assert _agree(want, first - x) < 0.95  # the carried start did change the example


def test_last_step_carries_one_more_step_up_the_training_loss(mnist_arrays):
    trainer = _trainer("last_step")
    index = np.arange(0, 32)
    data, y = _batch(mnist_arrays, index)
    x = data["image"].numpy()
    x_adv = trainer.adversarial_batch(data["image"], y).numpy()
    g = _input_grad(trainer.classifier, x_adv, y.numpy())
    want = np.clip(x_adv - x + EPS * np.sign(g), -EPS, EPS)  # in the ball, not the pixel box
    trainer.train_on_batch(data, y)
    starts, _ = _carried(trainer)
    assert _agree(starts[index], want) > 0.999
    assert np.abs(starts).max() <= EPS + 1e-6


def test_carry_noise_blurs_only_carried_starts(mnist_arrays):
    trainer = _trainer("last", rat_carry_noise=0.5)
    index = np.arange(8, 40)
    data, y = _batch(mnist_arrays, index)
    trainer.train_on_batch(data, y)
    starts = _carried(trainer)[0]
    both = tf.constant(np.concatenate([index, [0, 1]]), tf.int32)  # 0 and 1: never seen
    fresh = np.full((len(both), 28, 28, 1), 0.123, np.float32)
    got = trainer._carried_start(tf.constant(fresh), both).numpy()
    np.testing.assert_array_equal(got[-2:], fresh[-2:])  # an unseen image keeps its start
    moved = got[:-2] - starts[index]
    assert np.abs(got).max() <= EPS + 1e-6 and np.abs(moved).max() <= 0.5 * EPS + 1e-6
    assert np.mean(np.abs(moved) > 1e-3) > 0.5  # the noise is there, and new each step
    trainer.optimizer.iterations.assign_add(1)
    again = trainer._carried_start(tf.constant(fresh), both).numpy()
    assert np.mean(np.abs(again - got) > 1e-3) > 0.5
    assert trainer.get_config()["rat_carry_noise"] == 0.5


def test_carry_settings_and_indices_are_checked(mnist_arrays):
    classifier = models.build_model("tiny_cnn", "mnist")
    for bad, match in [(dict(rat_carry="last"), "set rat_init"),
                       (dict(rat_init="target", rat_carry="nope"), "rat_carry must be one of"),
                       (dict(rat_init="target", rat_carry="last"), "set carry_images"),
                       (dict(rat_init="target", rat_carry_noise=0.5), "set rat_carry"),
                       (dict(rat_init="target", rat_carry="last", carry_images=N,
                             rat_carry_noise=-0.5), "rat_carry_noise must be >= 0")]:
        with pytest.raises(ValueError, match=match):
            trainers.make_trainer("rat", classifier, eps=EPS, **bad)
    trainer = _trainer("last")
    data, y = _batch(mnist_arrays, np.arange(8))
    with pytest.raises(ValueError, match="needs each training image's index"):
        trainer.train_on_batch(data["image"], y)
    with pytest.raises(tf.errors.InvalidArgumentError, match="carry_images=96"):
        trainer.train_on_batch({"image": data["image"], "index": data["index"] + N - 4}, y)


def test_carried_starts_are_saved_and_loaded(tmp_path, mnist_arrays):
    trainer = _trainer("last_step", lr=0.05)
    data, y = _batch(mnist_arrays, np.arange(N))
    trainer.fit(tf.data.Dataset.from_tensor_slices((data, y)).batch(32), epochs=1, verbose=0)
    assert trainer.settings()["rat_carry"] == "last_step"
    assert trainer.settings()["carry_images"] == N
    path = str(tmp_path / "t.keras")
    trainer.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.rat == trainer.rat and loaded.carry_images == N
    for a, b in zip(_carried(loaded), _carried(trainer)):
        np.testing.assert_array_equal(a, b)
    assert _carried(loaded)[1].sum() == N


def test_train_stream_with_index_names_each_image(mnist_arrays):
    x, y = mnist_arrays[0][:200], mnist_arrays[1][:200]
    batches = training.train_stream(x, y, 50, seed=1, with_index=True).take(5)
    seen = []
    for images, labels in batches:
        index = images["index"].numpy()
        np.testing.assert_array_equal(images["image"].numpy(), x[index])
        np.testing.assert_array_equal(labels.numpy(), y[index])
        seen.extend(index)
    assert sorted(seen[:200]) == list(range(200))  # one pass visits every image once


def test_fit_on_arrays_with_their_indices_carries_every_image(mnist_arrays):
    """model.fit on NumPy arrays, shuffled, with a partial last batch and validation data:
    the way the guide shows for a user's own training loop."""
    trainer = _trainer("last", lr=0.05)
    x, y = mnist_arrays[0][:N], mnist_arrays[1][:N]
    history = trainer.fit({"image": x, "index": np.arange(N)}, y, batch_size=40, epochs=2,
                          shuffle=True, validation_data=(x, y), verbose=0)
    starts, carried = _carried(trainer)
    assert carried.min() == 1 and carried.max() == 1  # every image, each in its own row
    assert np.all(np.abs(starts) <= EPS + 1e-6) and np.mean(np.abs(starts) > 0) > 0.5
    assert len(history.history["val_accuracy"]) == 2


def _fit_carry(strategy, x, y):
    with strategy.scope():
        trainer = _trainer("last_step", lr=0.05, seed=3)
    ds = training.train_stream(x, y, 32, seed=0, with_index=True)
    trainer.fit(ds, epochs=1, steps_per_epoch=len(x) // 32, verbose=0)
    return _carried(trainer)


def test_carried_starts_match_under_mirrored_strategy(mirrored_2cpu, mnist_arrays):
    x, y = mnist_arrays[0][:N], mnist_arrays[1][:N]
    one = _fit_carry(tf.distribute.get_strategy(), x, y)
    two = _fit_carry(mirrored_2cpu, x, y)
    assert one[1].sum() == two[1].sum() == N  # every replica's rows reach the variable
    assert np.mean(one[0] == two[0]) > 0.98  # sign steps: rounding flips a few coordinates




def _carry_config(tmp_path, name: str, data_dir: str, carry: str = "last_step"
                  ) -> training.TrainConfig:
    # 4 steps of 50 are one pass over the 200 images: from epoch 1 on every start is carried
    return training.TrainConfig(
        dataset="mnist", model="tiny_cnn", method="rat", rat_init="target",
        targets_per_image="runner_up", rat_init_noise=1.0, rat_carry=carry, epochs=3,
        batch_size=50, steps_per_epoch=4, train_subset=200, test_subset=200, lr=3e-3,
        data_dir=data_dir, seed=0, verbose=0, model_dir=str(tmp_path / name))


@pytest.mark.slow  # three short training runs
def test_a_killed_carry_run_resumes_with_its_carried_starts(crash_at, data_dir, tmp_path):
    reference = training.train(_carry_config(tmp_path, "uninterrupted", data_dir))
    assert reference["settings"]["rat_carry"] == "last_step"
    assert reference["settings"]["carry_images"] == 200
    cfg = _carry_config(tmp_path, "interrupted", data_dir)
    with pytest.raises(RuntimeError, match="simulated crash"):
        training.train(cfg, callbacks=[crash_at(2)])
    resumed = training.train(cfg)
    assert resumed["resumed"] and resumed["history"]["epoch"] == [0, 1, 2]
    # the starts of epoch 2 come from the backup: the same run as without the crash
    np.testing.assert_allclose(resumed["history"]["loss"], reference["history"]["loss"],
                               rtol=1e-4)
    # and they matter: without carry the same run differs from epoch 1 on
    plain = training.train(_carry_config(tmp_path, "plain", data_dir, carry="none"))
    assert plain["history"]["loss"][0] == pytest.approx(reference["history"]["loss"][0],
                                                        rel=1e-4)
    assert abs(plain["history"]["loss"][2] - reference["history"]["loss"][2]) > 1e-3
