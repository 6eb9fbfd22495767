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
    assert pgd["ok"], pgd  # rat_tf's PGD is not weaker than ART's (crosscheck.not_weaker)
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
    assert pgd["diff"] > pgd["tol"] and not pgd["ok"] and not res["ok"]
    assert pgd["only_art_fools"] > 10


def test_not_weaker_allows_noise_and_catches_a_weaker_attack():
    """A few images, or a few standard deviations of the images one side only breaks, of
    slack; more images left unbroken, with few broken the other way, fail."""
    def results(n, both, only_ref, only_ours):  # bool [n]: True = still correct
        ref, ours = np.ones(n, bool), np.ones(n, bool)
        ref[:both + only_ref] = False
        ours[:both] = False
        ours[both + only_ref:both + only_ref + only_ours] = False
        return ours, ref

    same = crosscheck.not_weaker(*results(100, 40, 0, 0))
    assert same["ok"] and same["excess"] == 0 and same["allowed"] == 3
    one = crosscheck.not_weaker(*results(100, 39, 1, 0))  # 0.61 against 0.60
    assert one["ok"] and (one["only_reference_breaks"], one["only_ours_breaks"]) == (1, 0)
    noisy = crosscheck.not_weaker(*results(500, 100, 20, 12))  # 8 <= 3 sqrt(32)
    assert noisy["ok"] and noisy["excess"] == 8 and noisy["allowed"] == pytest.approx(16.97, 0.01)
    weak = crosscheck.not_weaker(*results(100, 30, 12, 0))  # 12 > 3 sqrt(12)
    assert not weak["ok"] and weak["allowed"] == pytest.approx(10.39, 0.01)
    assert crosscheck.not_weaker(*results(100, 30, 12, 0), tol_images=12)["ok"]
    assert crosscheck.not_weaker(*results(100, 30, 0, 12))["ok"]  # stronger is fine
    with pytest.raises(ValueError, match="one shape"):
        crosscheck.not_weaker(np.ones(3, bool), np.ones(4, bool))
    with pytest.raises(ValueError, match=">= 0"):
        crosscheck.not_weaker(np.ones(3, bool), np.ones(3, bool), tol_z=-1)


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
