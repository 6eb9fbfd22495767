"""Extending rat_tf through its public API: a new dataset is one registry entry and its reader.

The toy dataset is real data: MNIST digits 0, 1 and 2, averaged down to 14x14 pixels.
"""

import numpy as np
import pytest

from rat_tf import data, evaluation, experiment, models, perturbation_files, training

TOY = "toy_digits"
_COUNTS = {"train": 600, "test": 300}


def _toy_reader(split, data_dir, verify):
    """The first images of digits 0-2 of an MNIST split, 2x2-averaged to 14x14 uint8."""
    images, labels = data.load_files("mnist", split, data_dir, verify)
    keep = np.flatnonzero(labels < 3)[:_COUNTS[split]]
    x = images[keep].reshape(-1, 14, 2, 14, 2, 1).mean(axis=(2, 4))
    return np.round(x).astype(np.uint8), labels[keep]


@pytest.fixture
def toy_dataset(data_dir):
    info = data.register(data.DatasetInfo(
        TOY, (14, 14, 1), 3, ("zero", "one", "two"), dict(_COUNTS), mean=(0.13,), std=(0.31,),
        eps=0.3, adv_eps=0.3, fgsm_eps=(0.1, 0.3), pgd_eps=(0.3,), class_eps=0.1,
        preset_family="mnist", reader=_toy_reader))
    yield info
    data.unregister(TOY)


def test_registered_dataset_loads_checked(toy_dataset, data_dir):
    x, y = data.load_arrays(TOY, "test", "files", data_dir)
    assert x.shape == (300, 14, 14, 1) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert set(np.unique(y)) == {0, 1, 2}


@pytest.mark.slow
def test_search_training_and_evaluation_on_a_registered_dataset(toy_dataset, data_dir,
                                                                tmp_path):
    config = training.TrainConfig(dataset=TOY, data_dir=data_dir, model="tiny_cnn",
                                  method="rat", epochs=2, batch_size=50, train_subset=300,
                                  search_passes=2, model_dir=str(tmp_path / "rat"), verbose=0)
    metrics = training.train(config)
    assert metrics["train_images"] == 300 and metrics["test_images"] == 300
    assert metrics["test_accuracy"] > 0.6  # 3 classes: chance is 1/3
    v, meta = perturbation_files.load(str(tmp_path / "rat" / "perturbations.npz"))
    assert v.shape == (3, 14, 14, 1) and meta["eps"] == pytest.approx(0.3)

    settings = evaluation.EvalSettings.for_dataset(
        TOY, n_test=100, pgd_steps=3, pgd_restarts=1, tup_passes=1, tup_n_per_class=10,
        uap_passes=1)
    assert settings.fgsm_eps == (0.1, 0.3) and settings.tup_eps == 0.3
    reports = evaluation.evaluate_models({"rat": str(tmp_path / "rat" / "model.keras")},
                                         dataset=TOY, data_dir=data_dir, settings=settings,
                                         out_dir=str(tmp_path / "eval"), progress=False)
    report = reports["rat"]
    assert report["num_test"] == 100 and set(report["fgsm_accuracy"]) == {"0.1", "0.3"}
    assert report["fgsm_accuracy"]["0.3"] <= report["clean_accuracy"]
    assert report["class_names"] == ["zero", "one", "two"]
    assert (tmp_path / "eval" / "report.md").is_file()


def test_zoo_model_of_a_registered_dataset(toy_dataset):
    model = models.build_model("mnist_cnn", TOY)
    assert model.input_shape == (None, 14, 14, 1) and model.output_shape == (None, 3)
    assert experiment.budget_preset(TOY, "tiny")["model"] == "tiny_cnn"


@pytest.mark.parametrize("field,value,message", [
    ("mean", (0.1, 0.2), "one value per channel"),
    ("eps", 0.0, "positive radii"),
    ("class_names", ("a", "b"), "2 class_names for 3 classes"),
    ("num_examples", {"train": 10}, "count of each split"),
    ("reader", None, "reader must be callable"),
])
def test_a_missing_or_bad_fact_is_an_error(field, value, message):
    facts = dict(name="bad", image_shape=(14, 14, 1), num_classes=3,
                 class_names=("a", "b", "c"), num_examples={"train": 1, "test": 1},
                 mean=(0.1,), std=(0.3,), eps=0.3, adv_eps=0.3, fgsm_eps=(0.1,),
                 pgd_eps=(0.3,), class_eps=0.1, preset_family="mnist", reader=_toy_reader)
    facts[field] = value
    with pytest.raises(ValueError, match=message):
        data.DatasetInfo(**facts)


def test_an_unknown_preset_family_is_an_error(data_dir):
    data.register(data.DatasetInfo(
        "no_presets", (14, 14, 1), 3, ("a", "b", "c"), dict(_COUNTS), mean=(0.1,), std=(0.3,),
        eps=0.3, adv_eps=0.3, fgsm_eps=(0.1,), pgd_eps=(0.3,), class_eps=0.1,
        preset_family="imagenet", reader=_toy_reader))
    try:
        with pytest.raises(ValueError, match="preset family 'imagenet'"):
            experiment.budget_preset("no_presets", "small")
    finally:
        data.unregister("no_presets")


def test_register_refuses_a_taken_name():
    with pytest.raises(ValueError, match="already registered"):
        data.register(data.get_info("mnist"))
    with pytest.raises(ValueError, match="built-in"):
        data.unregister("mnist")


class _MeanConfidence(evaluation.Measure):
    """A toy measure: the mean top softmax probability on the test images."""

    name = "toy_confidence"

    def stages(self, ctx):
        return [("confidence", 1.0)]

    def run(self, ctx, report):
        import time

        import tensorflow as tf

        t0 = time.time()
        p = tf.nn.softmax(ctx.model_fn(tf.constant(ctx.x_test)))
        value = float(tf.reduce_mean(tf.reduce_max(p, axis=-1)))
        ctx.done("confidence", t0, value)
        return {"toy_confidence": value}

    def columns(self, report):
        return [("confidence", f"{100 * report['toy_confidence']:.1f}")]


@pytest.fixture
def toy_measure():
    measure = evaluation.register_measure(_MeanConfidence())
    yield measure
    evaluation.unregister_measure(measure.name)


def test_a_registered_measure_runs_in_the_report(toy_measure, mnist_model, mnist_arrays,
                                                 tmp_path):
    x_train, y_train, x_test, y_test = mnist_arrays
    settings = evaluation.EvalSettings.for_dataset(
        "mnist", measures=("clean", "toy_confidence"), n_test=100)
    report = evaluation.robustness_report(mnist_model, x_test, y_test, x_search=x_train[:500],
                                          y_search=y_train[:500], settings=settings,
                                          progress=False)
    assert 0.1 <= report["toy_confidence"] <= 1.0
    assert "fgsm_accuracy" not in report and "tup_fresh" not in report
    assert list(report["seconds"]) == ["clean", "confidence"]
    table = evaluation.markdown_table({"m": report})
    assert table.splitlines()[0] == "| model | clean | confidence |"
    paths = evaluation.write_report({"m": report}, str(tmp_path))
    assert "confidence" in open(paths["markdown"]).read()


def test_unknown_measure_is_an_error():
    with pytest.raises(ValueError, match="measures must be distinct names"):
        evaluation.EvalSettings.for_dataset("mnist", measures=("clean", "nope"))
    with pytest.raises(ValueError, match="built-in"):
        evaluation.unregister_measure("clean")
