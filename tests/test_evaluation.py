"""Robustness reports on real MNIST: attack ordering, SavedModel parity, held-out checks."""

import dataclasses
import json
import os

import numpy as np
import pytest

from rat_tf import attacks, crosscheck, data, evaluation, export, perturbation_files

N_TEST = 300
# The SavedModel's report (compared with the Keras model's) leaves out AutoAttack and the
# masking checks: tests/test_crosscheck_autoattack.py runs AutoAttack on SavedModels.
SAVED_MEASURES = ("clean", "fgsm", "pgd", "per_class", "tup_given", "tup_fresh", "uap")


@pytest.fixture(scope="module")
def settings():
    return evaluation.EvalSettings.for_dataset(
        "mnist", fgsm_eps=(0.05, 0.1, 0.2), pgd_eps=(0.1, 0.2), pgd_steps=10, pgd_restarts=2,
        class_eps=0.1, tup_passes=2, tup_n_per_class=10, tup_batch_size=25, uap_passes=1,
        n_test=N_TEST, batch_size=150, aa_n=100, aa_steps=10, aa_queries=100,
        masking_steps=10, masking_n=100, seed=0)


@pytest.fixture(scope="module")
def split(mnist_arrays):
    """Test images to measure on; search images from the training set (never the test set)."""
    x_train, y_train, x_test, y_test = mnist_arrays
    return x_test[:N_TEST], y_test[:N_TEST], x_train[-2000:], y_train[-2000:]


@pytest.fixture(scope="module")
def given(split, tmp_path_factory):
    """A 'training' perturbation file whose metadata fingerprints its search images."""
    _, _, xs, _ = split
    v = np.random.default_rng(0).uniform(-0.2, 0.2, (10, 28, 28, 1)).astype(np.float32)
    path = str(tmp_path_factory.mktemp("given") / "v.npz")
    perturbation_files.save(path, v, search_images=xs[:100], eps=0.2, norm="linf")
    _, meta = perturbation_files.load(path)
    assert meta[perturbation_files.FINGERPRINT_KEY] == data.fingerprints(xs[:100]).tolist()
    return path


@pytest.fixture(scope="module")
def reports(mnist_model, split, settings, given, tmp_path_factory):
    """Reports of the Keras model and of its SavedModel export, with the same seeds."""
    x_test, y_test, xs, ys = split
    saved = export.export_saved_model(mnist_model,
                                      str(tmp_path_factory.mktemp("export") / "std"))
    out = {}
    for name, model, measures in (("keras", mnist_model, settings.measures),
                                  ("saved_model", saved, SAVED_MEASURES)):
        out[name] = evaluation.robustness_report(
            model, x_test, y_test, x_search=xs, y_search=ys, perturbations=given,
            settings=dataclasses.replace(settings, measures=measures), name=name,
            progress=False)
    return out


def test_pgd_with_restarts_at_least_as_strong_as_fgsm(reports, settings):
    for name, r in reports.items():
        for eps in settings.pgd_eps:
            key = f"{eps:g}"
            assert key in r["fgsm_accuracy"]
            # a few images of slack (crosscheck.not_weaker's floor): both attacks are random
            assert r["pgd_accuracy"][key] <= (r["fgsm_accuracy"][key]
                                              + crosscheck.DEFAULT_TOL_IMAGES / N_TEST), (name, key)
        # and accuracy falls as the FGSM radius grows, from the clean accuracy down
        curve = [r["clean_accuracy"]] + [r["fgsm_accuracy"][f"{e:g}"] for e in settings.fgsm_eps]
        assert curve == sorted(curve, reverse=True), (name, curve)
        assert r["clean_accuracy"] > 0.9


def test_saved_model_report_matches_keras(reports):
    k, s = reports["keras"], reports["saved_model"]
    assert s["model"].startswith("saved_model:") and k["model"].startswith("keras:")
    assert s["clean_accuracy"] == pytest.approx(k["clean_accuracy"], abs=1e-9)
    for key in k["fgsm_accuracy"]:
        assert s["fgsm_accuracy"][key] == pytest.approx(k["fgsm_accuracy"][key], abs=2 / N_TEST)
    for key in k["pgd_accuracy"]:
        assert s["pgd_accuracy"][key] == pytest.approx(k["pgd_accuracy"][key], abs=3 / N_TEST)
    np.testing.assert_allclose(s["tup_given"]["success_rate"], k["tup_given"]["success_rate"],
                               atol=2 / N_TEST)
    assert s["tup_fresh"]["mean"] == pytest.approx(k["tup_fresh"]["mean"], abs=0.03)
    assert s["uap"]["fooling_rate"] == pytest.approx(k["uap"]["fooling_rate"], abs=0.03)
    assert s["per_class"]["clean"] == k["per_class"]["clean"]


def test_report_contents(reports, settings):
    r = reports["keras"]
    assert r["num_test"] == N_TEST and r["num_search"] == 100
    assert len(r["tup_fresh"]["success_rate"]) == 10
    assert max(r["tup_fresh"]["linf"]) <= settings.tup_eps + 1e-6
    assert r.arrays["tup_fresh"].shape == (10, 28, 28, 1)
    assert sum(r["per_class"]["count"]) == N_TEST
    assert r["per_class"]["fgsm_eps"] == 0.1
    assert r["tup_given"]["meta"] == {"eps": 0.2, "norm_type": "linf"}


def test_json_serializable_with_every_setting(reports, settings):
    for r, measures in zip(reports.values(), (settings.measures, SAVED_MEASURES)):
        back = json.loads(json.dumps(r, allow_nan=False))
        expected = dataclasses.replace(settings, measures=measures).to_dict()
        assert back["settings"] == json.loads(json.dumps(expected))
        for field in ("fgsm_eps", "pgd_eps", "pgd_steps", "pgd_restarts", "tup_eps",
                      "tup_method", "tup_passes", "uap_eps", "n_test", "seed"):
            assert field in back["settings"]


def test_markdown_and_written_report(reports, tmp_path):
    table = evaluation.markdown_table(reports)
    rows = [line for line in table.strip().splitlines()[2:]]
    assert [row.split("|")[1].strip() for row in rows] == list(reports)
    assert "PGD-10x2 0.2" in table.splitlines()[0]
    paths = evaluation.write_report(reports, str(tmp_path))
    for key in ("json", "markdown", "accuracy_vs_radius", "perturbations"):
        assert os.path.isfile(paths[key])
    for png in ("accuracy_vs_radius", "perturbations"):
        assert os.path.getsize(paths[png]) < 200_000
    with open(paths["json"]) as f:
        assert set(json.load(f)) == set(reports)
    with open(paths["markdown"]) as f:
        assert table in f.read()


def test_refuses_to_measure_on_search_images(mnist_model, split, settings, given):
    x_test, y_test, xs, ys = split
    leaky = np.concatenate([xs, x_test[7:8]])
    with pytest.raises(ValueError, match="held-out"):
        evaluation.robustness_report(mnist_model, x_test, y_test, x_search=leaky,
                                     y_search=np.concatenate([ys, y_test[7:8]]),
                                     settings=settings, progress=False)
    # the fingerprints stored with a perturbation file are checked too
    with pytest.raises(ValueError, match="held-out"):
        evaluation.robustness_report(mnist_model, xs[:50], ys[:50], x_search=x_test,
                                     y_search=y_test, perturbations=given, settings=settings,
                                     progress=False)


def test_bad_images_labels_and_settings_are_refused(mnist_model, split, settings):
    x_test, y_test, xs, ys = split
    kw = dict(x_search=xs, y_search=ys, settings=settings, progress=False)
    with pytest.raises(ValueError, match=r"x_test must be finite pixel values in \[0, 1\], got"):
        evaluation.robustness_report(mnist_model, x_test * 255.0, y_test, **kw)
    with pytest.raises(ValueError, match="x_test must be finite .* NaN or infinite"):
        evaluation.robustness_report(mnist_model, np.where(x_test > 0.5, np.nan, x_test),
                                     y_test, **kw)
    with pytest.raises(ValueError, match="y_test labels must be in"):
        evaluation.robustness_report(mnist_model, x_test, y_test + 10, **kw)
    with pytest.raises(ValueError, match="no image of classes"):
        keep = ys != 3
        evaluation.robustness_report(mnist_model, x_test, y_test, x_search=xs[keep],
                                     y_search=ys[keep], settings=settings, progress=False)
    cifar = evaluation.EvalSettings.for_dataset("cifar10")
    with pytest.raises(ValueError, match="not cifar10 images"):
        evaluation.robustness_report(mnist_model, x_test, y_test, x_search=xs, y_search=ys,
                                     settings=cifar, progress=False)
    with pytest.raises(ValueError, match="settings are for 'cifar10'"):
        evaluation.evaluate_models({}, dataset="mnist", settings=cifar)


def test_settings_defaults_and_validation():
    c = evaluation.EvalSettings.for_dataset("cifar10")
    assert c.fgsm_eps == pytest.approx((2 / 255, 4 / 255, 8 / 255))
    m = evaluation.EvalSettings.for_dataset("mnist", pgd_steps=7)
    assert m.fgsm_eps == (0.05, 0.1, 0.2, 0.3) and m.pgd_steps == 7
    for bad in ((0.1, -0.1), (float("nan"),), (float("inf"),)):
        with pytest.raises(ValueError, match="fgsm_eps"):
            evaluation.EvalSettings.for_dataset("mnist", fgsm_eps=bad)
    with pytest.raises(ValueError, match="tup_eps"):
        evaluation.EvalSettings.for_dataset("mnist", tup_eps=float("nan"))
    with pytest.raises(ValueError, match="pgd_restarts"):
        evaluation.EvalSettings.for_dataset("mnist", pgd_restarts=0)
    with pytest.raises(ValueError, match="unknown evaluation settings"):
        evaluation.EvalSettings.for_dataset("mnist", pgd_stepz=3)
    with pytest.raises(ValueError, match="n_pgd must be >= 1 or None"):
        evaluation.EvalSettings.for_dataset("mnist", n_pgd=0)
    with pytest.raises(ValueError, match="unknown dataset"):
        evaluation.EvalSettings.for_dataset("svhn")
    assert evaluation.parse_models("a=x.keras, b=dir") == {"a": "x.keras", "b": "dir"}
    with pytest.raises(ValueError, match="name=path"):
        evaluation.parse_models("a=x,b")


def test_pgd_on_the_first_n_pgd_test_images(mnist_model, split, settings, tmp_path):
    """With n_pgd < n_test, PGD (and its FGSM comparison) is measured on the first n_pgd images
    exactly as a report on those images alone measures it; the rest uses every test image."""
    x_test, y_test, xs, ys = split
    fast = dataclasses.replace(settings, n_test=120, n_pgd=40, pgd_steps=3,
                               measures=("clean", "fgsm", "pgd", "per_class"))
    both = evaluation.robustness_report(mnist_model, x_test, y_test, x_search=xs, y_search=ys,
                                        settings=fast, progress=False)
    first = evaluation.robustness_report(
        mnist_model, x_test, y_test, x_search=xs, y_search=ys,
        settings=dataclasses.replace(fast, n_test=40, n_pgd=None), progress=False)
    assert (both["num_test"], both["num_pgd"], first["num_pgd"]) == (120, 40, 40)
    assert sum(both["per_class"]["count"]) == 120
    assert both["pgd_accuracy"] == first["pgd_accuracy"]
    assert both["pgd_fgsm_accuracy"] == {k: first["fgsm_accuracy"][k] for k in ("0.1", "0.2")}
    assert first["pgd_fgsm_accuracy"] == {k: first["fgsm_accuracy"][k] for k in ("0.1", "0.2")}
    assert both["fgsm_accuracy"] != first["fgsm_accuracy"]  # the sweep uses all 120 images
    assert "(first 40)" in evaluation.markdown_table({"m": both}).splitlines()[0]
    assert "(first 40)" not in evaluation.markdown_table({"m": first}).splitlines()[0]
    assert "first 40 of the test images" in evaluation.report_markdown({"m": both})


def test_per_source_perturbations_are_measured_and_drawn(mnist_model, split, settings, tmp_path):
    """A per-source V [K,K,...]: each test image of label s is measured with V[s, t]."""
    x_test, y_test, xs, ys = split
    fast = dataclasses.replace(settings, n_test=100, measures=("clean", "tup_given"))
    v = np.random.default_rng(1).uniform(-0.3, 0.3, (10, 10, 28, 28, 1)).astype(np.float32)
    v[np.arange(10), np.arange(10)] = 0.0
    report = evaluation.robustness_report(mnist_model, x_test, y_test, x_search=xs, y_search=ys,
                                          perturbations=v, settings=fast, progress=False)
    fn = lambda a: mnist_model(a, training=False)  # noqa: E731
    expected = attacks.targeted_success_rate(fn, x_test[:100], y_test[:100], v)
    np.testing.assert_allclose(report["tup_given"]["success_rate"], expected, atol=1e-9)
    per_target = attacks.targeted_success_rate(fn, x_test[:100], y_test[:100], v[0])
    assert not np.allclose(expected, per_target)  # not just the perturbations of source 0
    assert report["tup_given"]["linf"] == pytest.approx([0.3] * 10, abs=1e-3)
    paths = evaluation.write_report({"m": report}, str(tmp_path))
    assert os.path.getsize(paths["perturbations"]) < 200_000
    with pytest.raises(ValueError, match="one per class"):
        evaluation.robustness_report(mnist_model, x_test, y_test, x_search=xs, y_search=ys,
                                     perturbations=v[:, :9], settings=fast, progress=False)


def test_fit_png_shrinks_a_large_figure(tmp_path):
    import matplotlib.pyplot as plt
    from PIL import Image

    from rat_tf import plots

    path = str(tmp_path / "noise.png")
    plt.imsave(path, np.random.default_rng(0).uniform(size=(400, 400, 3)))
    assert os.path.getsize(path) > plots.MAX_PNG_BYTES
    assert plots.fit_png(path) == path and os.path.getsize(path) <= plots.MAX_PNG_BYTES
    with Image.open(path) as img:
        assert img.size == (400, 400)


def test_autoattack_in_the_report_at_most_fgsm(reports, settings, mnist_model, split):
    for name, r in [("keras", reports["keras"])]:
        aa = r["autoattack"]
        assert aa["eps"] == pytest.approx(max(settings.pgd_eps)) and aa["num_images"] == 100
        after = list(aa["after_each"].values())
        assert after == sorted(after, reverse=True), (name, aa)  # never gains accuracy
        assert aa["robust_accuracy"] == pytest.approx(after[-1])
        assert list(aa["after_each"]) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
        # the worst case over four attacks is at least as strong as FGSM on the same images
        x, y = split[0][:aa["num_images"]], split[1][:aa["num_images"]]
        fgsm = evaluation.correct_on(evaluation.fgsm_correct_fn(
            evaluation.load_model_fn(mnist_model)[0]), x, y, 100, aa["eps"])
        robust = np.array(evaluation.aa_per_image(aa)) == "robust"
        assert crosscheck.not_weaker(robust, fgsm)["ok"], (name, aa)
        assert aa["robust_accuracy"] <= r["pgd_accuracy"][f"{max(settings.pgd_eps):g}"] + 0.05


def test_autoattack_keeps_what_broke_each_image(reports):
    """One outcome per image in test-set order, agreeing with the counts and accuracies."""
    aa = reports["keras"]["autoattack"]
    per_image = evaluation.aa_per_image(aa)
    assert len(per_image) == aa["num_images"] == len(aa["per_image"]["codes"])
    assert aa["per_image"]["names"] == ["robust", "clean", "apgd-ce", "apgd-t", "fab-t",
                                        "square"]
    assert {a: per_image.count(a) for a in aa["broken_by"]} == aa["broken_by"]
    assert per_image.count("robust") == round(aa["robust_accuracy"] * aa["num_images"])
    left = aa["num_images"]
    for name, acc in aa["after_each"].items():  # accuracy after each attack, from the list
        left -= per_image.count(name)
        assert left == round(acc * aa["num_images"]), (name, per_image)
    assert per_image.count("clean") > 0 and per_image.count("apgd-ce") > 0
    assert evaluation.aa_per_image(json.loads(json.dumps(aa))) == per_image


def test_masking_checks_find_nothing_on_an_honest_model(reports):
    assert "masking" not in reports["saved_model"]  # SAVED_MEASURES
    for name, r in [("keras", reports["keras"])]:
        m = r["masking"]
        assert m["box_accuracy"] <= 0.01 and m["flags"] == [], (name, m)


def test_markdown_has_the_aa_column_and_sections(reports, tmp_path):
    md = evaluation.report_markdown({"keras": reports["keras"]})
    head = md.split("\n| model |")[1].split("\n")[0]
    assert "| AA 0.2 (first 100) |" in "|" + head + "|" or "AA 0.2 (first 100)" in head
    assert "## AutoAttack" in md and "## Gradient-masking checks" in md
    assert "no sign of gradient masking" in md


@pytest.mark.parametrize("trap", ["saturated", "quantised"])
def test_masking_checks_flag_a_masked_model(trap, mnist_model, split):
    """Logits x 1e4 (CE gradients vanish) and a zero-gradient input quantisation both defeat
    gradient attacks; the report must say so instead of showing them as robust."""
    import tensorflow as tf

    from rat_tf import models

    x_test, y_test, xs, ys = split
    logits = models.as_model_fn(mnist_model)
    model_fn = (
        (lambda x: logits(x) * 1e4) if trap == "saturated" else
        (lambda x: logits(x * 0 + tf.stop_gradient(tf.round(x * 4) / 4))))
    settings = evaluation.EvalSettings.for_dataset(
        "mnist", measures=("clean", "fgsm", "pgd", "autoattack", "masking"), fgsm_eps=(0.3,),
        pgd_eps=(0.3,), pgd_steps=10, pgd_restarts=1, n_test=100, batch_size=100, aa_n=100,
        aa_attacks=("apgd-ce", "square"), aa_steps=10, aa_queries=200, masking_steps=10,
        masking_n=100)
    r = evaluation.robustness_report(model_fn, x_test, y_test, x_search=xs, y_search=ys,
                                     settings=settings, progress=False)
    m = r["masking"]
    assert r["pgd_accuracy"]["0.3"] > 0.5, r  # the gradient attack is fooled ...
    assert m["box_accuracy"] > 0.01 and any("whole pixel box" in f for f in m["flags"]), m
    if trap == "quantised":  # ... and the gradient-free attack is not
        assert m["square_only_breaks"] > 20 and any("Square" in f for f in m["flags"]), m
        assert r["autoattack"]["robust_accuracy"] <= r["clean_accuracy"] - 0.2
    assert "no sign of gradient masking" not in evaluation.report_markdown({"m": r})


def test_progress_bar_follows_autoattack_and_ends_full(mnist_model, split, monkeypatch, capsys):
    """AutoAttack's stage starts from a guess and revises its cost as images fall; the bar
    names the stages and ends exactly at its (revised) total."""
    import keras

    bars = []

    class Recorded(keras.utils.Progbar):
        def update(self, current, values=None, finalize=None):
            bars.append((self.target, current))
            super().update(current, values, finalize)

    monkeypatch.setattr(evaluation.keras.utils, "Progbar", Recorded)
    x_test, y_test, xs, ys = split
    settings = evaluation.EvalSettings.for_dataset(
        "mnist", measures=("clean", "autoattack"), n_test=100, batch_size=20, aa_n=100,
        aa_steps=5, aa_queries=50, seed=0)
    evaluation.robustness_report(mnist_model, x_test, y_test, x_search=xs, y_search=ys,
                                 settings=settings, progress=True)
    targets = [t for t, _ in bars]
    assert len(set(targets)) > 1, bars  # the estimate was revised during the run
    assert bars[-1][1] == pytest.approx(bars[-1][0]), bars  # and the bar ends full
    assert all(b[1] <= b[0] + 1e-9 for b in bars), bars
    assert "evaluating" in capsys.readouterr().out


def test_accuracy_figure_keys_models_by_colour_and_attacks_by_marker(monkeypatch, tmp_path):
    from rat_tf import plots

    legends, real = [], plots._save

    def save(fig, path, dpi, max_bytes=None):
        legends.append([t.get_text() for t in fig.axes[0].get_legend().get_texts()])
        return real(fig, path, dpi, max_bytes)

    monkeypatch.setattr(plots, "_save", save)
    report = {"clean_accuracy": 0.99, "fgsm_accuracy": {"0.1": 0.9, "0.3": 0.5},
              "pgd_accuracy": {"0.3": 0.2}, "autoattack": {"eps": 0.3, "robust_accuracy": 0.1}}
    path = evaluation.accuracy_figure({"a": report, "b": report}, str(tmp_path / "acc.png"))
    assert os.path.getsize(path) > 1000
    assert legends == [["a", "b", "PGD", "AA"]]  # not one entry per (model, attack)
    assert evaluation.accuracy_figure({"a": {}}, str(tmp_path / "none.png")) is None
