"""Cross-check of rat_tf's AutoAttack against ART's APGD-CE, APGD-DLR and Square (real MNIST).

Needs the optional extra ``bench`` (adversarial-robustness-toolbox); skipped without it.
"""

import pytest

pytest.importorskip("art")

from rat_tf import crosscheck, export  # noqa: E402


@pytest.fixture(scope="module")
def saved_model(mnist_model, tmp_path_factory):
    return export.export_saved_model(mnist_model, str(tmp_path_factory.mktemp("aa") / "sm"))


def test_rat_tf_autoattack_at_least_as_strong_as_art(saved_model, mnist_arrays):
    _, _, x_test, y_test = mnist_arrays
    # FAB-T (the slowest, tested in test_autoattack) is left out: rat_tf's APGD-CE, APGD-T
    # and Square must already be at least as strong as ART's APGD-CE, APGD-DLR and Square.
    res = crosscheck.crosscheck_autoattack(saved_model, x_test[:100], y_test[:100], 0.1,
                                           steps=10, n_queries=100, batch_size=100,
                                           attacks=("apgd-ce", "apgd-t", "square"))
    print(res)
    assert res["art"]["clean"] > 0.9
    assert res["art"]["square"] < res["art"]["clean"] - 0.1  # ART's attacks bite
    assert res["rat_tf"] <= res["art"]["square"] + crosscheck.DEFAULT_AA_TOL, res
    assert res["ok"]
    assert list(res["rat_tf_after_each"]) == ["clean", "apgd-ce", "apgd-t", "square"]
