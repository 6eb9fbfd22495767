"""bin/perturb.py end to end on a tiny real MNIST subset."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from rat_tf import perturbation_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _perturb(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, os.path.join(ROOT, "bin", "perturb.py"), *args],
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("per_source", [False, True])
def test_perturb_binary_writes_npz_png_json(mnist_model_path, data_dir, tmp_path, per_source):
    out = tmp_path / "tup"
    proc = _perturb("--dataset=mnist", f"--data_dir={data_dir}", "--data_source=files",
                    f"--model_path={mnist_model_path}", f"--output_dir={out}",
                    "--train_subset=40", "--search_passes=2", "--batch_size=20",
                    "--targets=2,8", "--n_test=300", "--eps=0.3", "--noprogress",
                    f"--per_source={per_source}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    V, meta = perturbation_files.load(str(out / "perturbations.npz"))
    if per_source:  # V[s, t]: one per (source, target)
        assert V.shape == (10, 10, 28, 28, 1) and meta["per_source"] is True
        V = V[5]  # the perturbations of source class 5
    assert V.shape == (10, 28, 28, 1) and np.abs(V).max() <= 0.3
    assert np.abs(V[2]).max() > 0 and not V[0].any()
    assert meta["targets"] == [2, 8] and meta["method"] == "sgd"
    report = json.loads((out / "search.json").read_text())
    assert report["settings"]["targets"] == [2, 8] and report["settings"]["eps"] == 0.3
    assert report["num_search_images"] == 40 and report["num_test_images"] == 300
    assert report["success_test"][0] is None and 0 <= report["success_test"][2] <= 1
    assert report["success_search"][8] is not None and report["wall_seconds"] > 0
    assert report["norm"][2] <= 0.3
    assert (out / "perturbations.png").stat().st_size > 1000


def test_perturb_checks_inputs_and_output_dir_before_searching(data_dir, tmp_path):
    """A missing model or an output folder that cannot exist: one line, status 2, no search."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    missing = tmp_path / "missing.keras"
    proc = _perturb("--dataset=mnist", f"--data_dir={data_dir}", f"--model_path={missing}",
                    f"--output_dir={tmp_path}/out")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"error: --model_path: {missing} does not exist")
    missing.write_text("never read: the output folder is checked first")
    proc = _perturb("--dataset=mnist", f"--data_dir={data_dir}", f"--model_path={missing}",
                    f"--output_dir={blocker}/out")
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and last.startswith("error: --output_dir: ")
    assert f"{blocker}/out" in last and "searching" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_perturb_binary_attacks_the_logits_of_a_softmax_classifier(mnist_model,
                                                                    mnist_model_path,
                                                                    data_dir, tmp_path):
    """A classifier ending in a softmax gets the V of its logits (the same model without the
    softmax), not a search on its probabilities."""
    softmax_path = str(tmp_path / "softmax.keras")
    keras.Sequential([keras.Input((28, 28, 1)), mnist_model,
                      keras.layers.Softmax()]).save(softmax_path)
    found = {}
    for name, path in (("logits", mnist_model_path), ("softmax", softmax_path)):
        out = tmp_path / name
        proc = _perturb("--dataset=mnist", f"--data_dir={data_dir}", f"--model_path={path}",
                        f"--output_dir={out}", "--train_subset=40", "--search_passes=2",
                        "--batch_size=20", "--targets=3", "--n_test=100", "--eps=0.3",
                        "--noprogress")
        assert proc.returncode == 0, proc.stderr[-3000:]
        found[name] = perturbation_files.load(str(out / "perturbations.npz"))[0][3]
    assert np.abs(found["logits"]).max() > 0.1
    np.testing.assert_allclose(found["softmax"], found["logits"], atol=1e-4)
