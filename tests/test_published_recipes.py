"""Single-step AT variants (FGSM-RS as published, N-FGSM), frozen PGD, the early-stopping guard
and the published-recipe presets."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from rat_tf import attacks, callbacks, models, recipes, trainers, training
from test_cli import _one_error_line, _run


class _Spy:
    """A logits function that records the smallest pixel it was called on."""

    def __init__(self, model):
        self.model, self.seen = model, []

    def __call__(self, x):
        self.seen.append(float(tf.reduce_min(x)))
        return self.model(x, training=False)


def test_fgsm_gradient_point_and_projection(mnist_model, mnist_arrays):
    x, y = mnist_arrays[2][:64], mnist_arrays[3][:64]
    start = tf.random.stateless_uniform(x.shape, [1, 2], -0.3, 0.3)
    spy = _Spy(mnist_model)
    boxed = attacks.fgsm(spy, x, y, 0.3, rand_init=True, init=start, box_start=True)
    assert spy.seen[-1] >= 0.0  # the gradient is taken inside the pixel box
    unboxed = attacks.fgsm(spy, x, y, 0.3, rand_init=True, init=start, box_start=False)
    assert spy.seen[-1] < -0.25  # at x + start itself, below the black background
    for x_adv in (boxed, unboxed):
        assert np.abs(x_adv - x).max() <= 0.3 + 1e-6
        assert x_adv.numpy().min() >= 0.0 and x_adv.numpy().max() <= 1.0
    assert not np.array_equal(boxed, unboxed)
    # N-FGSM: a start in 2 eps, a step of eps and no projection reach beyond the eps ball.
    wide = tf.random.stateless_uniform(x.shape, [1, 2], -0.6, 0.6)
    nfgsm = attacks.fgsm(mnist_model, x, y, 0.3, rand_init=True, init=wide, init_scale=2.0,
                         step_size=0.3, project=False)
    reach = np.abs(nfgsm - x).max()
    assert 0.6 < reach <= 0.9 + 1e-6
    with pytest.raises(ValueError, match="init_scale"):
        attacks.fgsm(mnist_model, x, y, 0.3, rand_init=True, init_scale=0.0)


def test_pgd_freeze_fooled_keeps_fooled_examples_where_they_fell(mnist_model, mnist_arrays):
    x, y = mnist_arrays[2][:200], mnist_arrays[3][:200]
    wrong = (y + 1) % 10  # every example is "misclassified" against these labels
    start = tf.random.stateless_uniform(x.shape, [3, 4], -0.1, 0.1)
    frozen = attacks.pgd(mnist_model, x, wrong, 0.1, steps=5, init=start, freeze_fooled=True)
    moving = attacks.pgd(mnist_model, x, wrong, 0.1, steps=5, init=start)
    pred = np.argmax(mnist_model(np.clip(x + start, 0, 1)), 1)
    stuck = pred != wrong  # fooled (not the label) at the start: never moved
    np.testing.assert_allclose(frozen.numpy()[stuck], np.clip(x + start, 0, 1)[stuck],
                               atol=1e-6)
    assert stuck.sum() > 150
    assert np.abs(moving.numpy()[stuck] - frozen.numpy()[stuck]).max() > 0.05


def test_fgsm_at_trainer_settings_roundtrip(tmp_path):
    classifier = models.build_model("tiny_cnn", "mnist")
    trainer = trainers.make_trainer("fgsm_at", classifier, eps=0.3, step_size=0.3,
                                    init_scale=2.0, box_start=True, project=False)
    assert trainer.settings()["init_scale"] == 2.0 and not trainer.settings()["project"]
    trainer.compile(optimizer="adam")
    x = np.random.default_rng(0).uniform(0, 1, (32, 28, 28, 1)).astype(np.float32)
    x_adv = trainer.adversarial_batch(tf.constant(x), tf.zeros([32], tf.int32)).numpy()
    assert np.abs(x_adv - x).max() > 0.3 + 1e-3  # N-FGSM leaves the eps ball
    path = str(tmp_path / "t.keras")
    trainer.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_config()["init_scale"] == 2.0 and loaded.get_config()["box_start"]
    assert not loaded.get_config()["project"]
    pgd = trainers.make_trainer("pgd_at", classifier, eps=0.3, freeze_fooled=True)
    assert pgd.settings()["freeze_fooled"] and "init_scale" not in pgd.settings()
    with pytest.raises(ValueError, match="init_scale"):
        trainers.make_trainer("fgsm_at", classifier, eps=0.3, init_scale=-1.0)


def _scrambled(model: keras.Model) -> None:
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(0, 1, w.shape).astype(w.dtype) for w in model.get_weights()])


def test_early_stopping_restores_the_best_weights(mnist_model, mnist_arrays, tmp_path):
    model = keras.models.clone_model(mnist_model)
    model.set_weights(mnist_model.get_weights())
    x, y = mnist_arrays[2][:300], mnist_arrays[3][:300]
    guard = callbacks.RobustEarlyStopping(x, y, 0.05, drop=0.2, steps=5,
                                          state_dir=str(tmp_path))
    guard.set_model(model)
    logs = {}
    guard.on_epoch_end(0, logs)
    best = [w.copy() for w in model.get_weights()]
    assert logs["early_stop_pgd_accuracy"] > 0.5 and guard.best_epoch == 1
    _scrambled(model)  # a collapse: held-out PGD accuracy falls to chance
    model.stop_training = False
    guard.on_epoch_end(1, {})
    assert model.stop_training and guard.stopped_epoch == 2
    for a, b in zip(model.get_weights(), best):
        np.testing.assert_array_equal(a, b)
    # A resumed run (a new callback on the same state) knows the best epoch and its weights.
    _scrambled(model)
    resumed = callbacks.RobustEarlyStopping(x, y, 0.05, drop=0.2, steps=5,
                                            state_dir=str(tmp_path))
    resumed.set_model(model)
    assert resumed.best_epoch == 1
    resumed.on_epoch_end(2, {})
    for a, b in zip(model.get_weights(), best):
        np.testing.assert_allclose(a, b)
    with pytest.raises(ValueError, match="drop"):
        callbacks.RobustEarlyStopping(x, y, 0.05, drop=0.0)


def test_train_holds_out_the_early_stopping_images(data_dir, tmp_path):
    cfg = recipes.train_config("mnist_fgsm_rs", epochs=2, warmup_epochs=0.5,
                               steps_per_epoch=3, train_subset=500, test_subset=200,
                               early_stop_drop=0.3, early_stop_images=100, data_dir=data_dir,
                               model_dir=str(tmp_path / "run"), verbose=0)
    metrics = training.train(cfg)
    assert metrics["early_stop"]["held_out_images"] == 100
    assert len(metrics["history"]["early_stop_pgd_accuracy"]) == 2
    assert not (tmp_path / "run" / "early_stop").exists()  # its state is dropped at the end
    with pytest.raises(ValueError, match="early_stop_drop"):
        training.TrainConfig(early_stop_drop=1.5, model_dir=str(tmp_path)).validate()


def test_every_recipe_is_a_valid_config_of_a_zoo_model():
    assert {"mnist_fgsm_rs", "mnist_nfgsm", "mnist_pgd_at", "cifar10_fgsm_rs",
            "cifar10_nfgsm", "cifar10_pgd_at", "cifar10_fgsm_rs_cpu"} <= set(recipes.RECIPES)
    for name, recipe in recipes.RECIPES.items():
        config = recipes.train_config(name, model_dir="unused")
        config.validate()
        assert config.model in models.MODELS and (config.method in ("fgsm_at", "pgd_at")
                                                   or config.rat_init != "none")
        assert recipe.source
    fgsm_rs = recipes.train_config("mnist_fgsm_rs", epochs=3)
    assert fgsm_rs.epochs == 3 and fgsm_rs.pgd_step_size == 0.375  # overrides on top
    assert not fgsm_rs.adv_box_start and fgsm_rs.adv_project
    with pytest.raises(ValueError, match="unknown recipe"):
        recipes.get("trades")
    with pytest.raises(ValueError, match="no TrainConfig settings"):
        recipes.train_config("mnist_fgsm_rs", learning_rate=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(recipes.RECIPES))
def test_every_recipe_trains_on_a_tiny_slice(name, data_dir, tmp_path):
    """Each recipe, GPU ones included, runs end to end for two steps on real data."""
    recipe = recipes.get(name)
    cfg = recipes.train_config(name, epochs=1, warmup_epochs=0.0, steps_per_epoch=2,
                               batch_size=10, train_subset=100, test_subset=50,
                               data_dir=data_dir, model_dir=str(tmp_path / name), verbose=0,
                               pgd_steps=min(3, recipe.settings.get("pgd_steps", 3)))
    metrics = training.train(cfg)
    assert metrics["settings"]["method"] == recipe.settings["method"]
    assert np.isfinite(metrics["history"]["loss"][-1])
    assert (tmp_path / name / "model.keras").exists()


def test_train_binary_recipe_flags_override(data_dir, tmp_path):
    out = tmp_path / "run"
    status, stderr = _run("train.py", "--recipe=mnist_nfgsm", "--epochs=1", "--warmup_epochs=0",
                          "--steps_per_epoch=2", "--train_subset=100", "--n_test=50",
                          f"--data_dir={data_dir}", f"--model_dir={out}", timeout=300)
    assert status == 0, stderr[-2000:]
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    assert metrics["config"]["epochs"] == 1 and metrics["config"]["model"] == "wong_mnist_net"
    assert metrics["settings"]["init_scale"] == 2.0 and not metrics["settings"]["project"]
    status, stderr = _run("train.py", "--recipe=trades", f"--model_dir={out}")
    assert status == 2 and "recipe" in _one_error_line(stderr)


@pytest.mark.slow
def test_reproduce_reports_what_was_changed_and_reuses_the_model(data_dir, tmp_path):
    """A reproduction row end to end on a tiny slice: the report names the settings changed
    from the recipe, has no empty section, and a second call reuses the trained model."""
    out = str(tmp_path / "repro")
    small = dict(epochs=1, warmup_epochs=0.0, steps_per_epoch=2, batch_size=20,
                 train_subset=100, test_subset=50, verbose=0)
    evals = dict(pgd_steps=3, pgd_restarts=1, aa_n=10, aa_steps=5, aa_queries=20,
                 masking_n=10, masking_steps=3)
    report = recipes.reproduce("mnist_rat_target", out, n_test=20, data_dir=data_dir,
                               eval_overrides=evals, seed=3, **small)
    changed = report["recipe"]["changed"]
    assert changed["seed"] == 3 and changed["epochs"] == 1
    assert "lr" not in changed  # not given, so not changed
    with open(tmp_path / "repro" / "recipe.json") as f:
        assert json.load(f)["changed"] == changed
    md = (tmp_path / "repro" / "report.md").read_text()
    assert "Changed here from the recipe: " in md and "seed=3" in md and "epochs=1" in md
    assert "Training: 1 epoch in " in md
    assert "## Per class" not in md and "universal perturbations" not in md
    assert report["autoattack"]["num_images"] == 10
    assert len(report["recipe"]["epoch_seconds"]) == 1
    assert report["recipe"]["train_seconds"] == pytest.approx(report["recipe"]["epoch_seconds"][0])
    model_file = tmp_path / "repro" / "model" / "model.keras"
    stamp = model_file.stat().st_mtime_ns
    again = recipes.reproduce("mnist_rat_target", out, n_test=20, data_dir=data_dir,
                              eval_overrides=evals, seed=3, **small)
    assert model_file.stat().st_mtime_ns == stamp  # not trained again
    assert again["clean_accuracy"] == report["clean_accuracy"]
