"""Cross-check of rat_tf's AutoAttack against ART's APGD-CE, APGD-DLR and Square (real MNIST).

Needs the optional extra ``bench`` (adversarial-robustness-toolbox); skipped without it.
"""

import pytest

pytest.importorskip("art")

from rat_tf import autoattack, crosscheck, export  # noqa: E402

N, EPS = 100, 0.1
BUDGET = dict(steps=10, n_queries=100, batch_size=100)
# FAB-T (the slowest, tested in test_autoattack) is left out: rat_tf's APGD-CE, APGD-T and
# Square must already be at least as strong as ART's APGD-CE, APGD-DLR and Square.
ATTACKS = ("apgd-ce", "apgd-t", "square")


@pytest.fixture(scope="module")
def saved_model(mnist_model, tmp_path_factory):
    return export.export_saved_model(mnist_model, str(tmp_path_factory.mktemp("aa") / "sm"))


@pytest.fixture(scope="module")
def images(mnist_arrays):
    _, _, x_test, y_test = mnist_arrays
    return x_test[:N], y_test[:N]


@pytest.fixture(scope="module")
def art_robust(saved_model, images):
    """ART's per-image results after its three attacks, run once for the tests below."""
    return crosscheck.art_autoattack_correct(saved_model, *images, EPS, **BUDGET)


@pytest.fixture
def art_once(art_robust, monkeypatch):
    """crosscheck_autoattack with ART's results of ``art_robust`` instead of a new ART run."""
    monkeypatch.setattr(crosscheck, "art_autoattack_correct",
                        lambda *args, **kwargs: {k: v.copy() for k, v in art_robust.items()})


def test_rat_tf_autoattack_at_least_as_strong_as_art(saved_model, images, art_once):
    res = crosscheck.crosscheck_autoattack(saved_model, *images, EPS, attacks=ATTACKS,
                                           **BUDGET)
    print(res)
    assert res["art"]["clean"] > 0.9
    assert res["art"]["square"] < res["art"]["clean"] - 0.1  # ART's attacks bite
    assert res["ok"] and res["excess_images"] <= res["allowed_images"], res
    assert list(res["rat_tf_after_each"]) == ["clean", "apgd-ce", "apgd-t", "square"]


def test_a_weakened_rat_tf_autoattack_is_caught(saved_model, images, art_once, monkeypatch):
    """The same comparison fails for a rat_tf AutoAttack that silently attacks at a third of
    the radius."""
    real = autoattack.autoattack
    monkeypatch.setattr(autoattack, "autoattack", lambda model_fn, x, y, eps, **kw: real(
        model_fn, x, y, eps / 3, **kw))
    res = crosscheck.crosscheck_autoattack(saved_model, *images, EPS, attacks=ATTACKS,
                                           **BUDGET)
    print(res)
    assert not res["ok"] and res["excess_images"] > res["allowed_images"], res
