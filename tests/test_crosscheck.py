"""Cross-check of rat_tf's FGSM / PGD figures against ART on an exported model (real MNIST).

Needs the optional extra ``bench`` (adversarial-robustness-toolbox); skipped without it.
"""

import sys

import numpy as np
import pytest

pytest.importorskip("art")

from rat_tf import attacks, crosscheck, export  # noqa: E402

N_TEST = 300
FGSM_EPS = (0.1, 0.2)
PGD = dict(pgd_eps=(0.1,), pgd_steps=10, pgd_restarts=2)


@pytest.fixture(scope="module")
def saved_model(mnist_model, tmp_path_factory):
    return export.export_saved_model(mnist_model, str(tmp_path_factory.mktemp("xcheck") / "sm"))


@pytest.fixture(scope="module")
def test_images(mnist_arrays):
    _, _, x_test, y_test = mnist_arrays
    return x_test[:N_TEST], y_test[:N_TEST]


def _row(result, attack, eps=None):
    (row,) = [r for r in result["rows"] if r["attack"].startswith(attack) and r["eps"] == eps]
    return row


def test_art_agrees_with_rat_tf(saved_model, test_images):
    x, y = test_images
    res = crosscheck.crosscheck_with_art(saved_model, x, y, fgsm_eps=FGSM_EPS, **PGD, seed=0)
    print(crosscheck.format_table({"mnist_model": res}), res["seconds"])
    assert res["num_images"] == N_TEST
    assert _row(res, "clean")["art"] > 0.9  # a trained model, the same one on both sides
    for eps in FGSM_EPS:  # deterministic: same accuracy within 1 point, nearly the same images
        row = _row(res, "fgsm", eps)
        assert abs(row["diff"]) <= crosscheck.DEFAULT_FGSM_TOL, row
        assert row["only_art_fools"] + row["only_rat_tf_fools"] <= 5, row
    assert _row(res, "fgsm", 0.2)["art"] < _row(res, "fgsm", 0.1)["art"] - 0.1  # attacks bite
    pgd = _row(res, "pgd", 0.1)
    assert pgd["art"] < _row(res, "fgsm", 0.1)["art"]  # PGD is stronger than FGSM, and
    assert pgd["diff"] <= crosscheck.DEFAULT_PGD_TOL, pgd  # rat_tf's PGD is not weaker than ART's
    assert res["ok"]


def test_flags_a_weak_pgd(saved_model, test_images, monkeypatch):
    """A rat_tf PGD that silently attacks at a third of the radius must be reported."""
    real_pgd = attacks.pgd
    monkeypatch.setattr(attacks, "pgd", lambda model_fn, x, y, eps, **kw: real_pgd(
        model_fn, x, y, eps / 3, **kw))
    x, y = test_images
    res = crosscheck.crosscheck_with_art(saved_model, x[:150], y[:150], fgsm_eps=(),
                                         pgd_eps=(0.1,), pgd_steps=10, pgd_restarts=1)
    pgd = _row(res, "pgd", 0.1)
    assert pgd["diff"] > crosscheck.DEFAULT_PGD_TOL and not pgd["ok"] and not res["ok"]
    assert pgd["only_art_fools"] > 10


def test_bad_input(saved_model):
    x = np.zeros((4, 28, 28, 1), np.float32)
    with pytest.raises(ValueError, match="integer labels"):
        crosscheck.crosscheck_with_art(saved_model, x, np.zeros(3, np.int32))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        crosscheck.crosscheck_with_art(saved_model, x + 2, np.zeros(4, np.int32))
    with pytest.raises(ValueError, match="positive"):
        crosscheck.crosscheck_with_art(saved_model, x, np.zeros(4, np.int32), fgsm_eps=(0.0,))


def test_missing_art_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "art.attacks.evasion", None)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[bench\]"'):
        crosscheck.art_classifier("unused")
