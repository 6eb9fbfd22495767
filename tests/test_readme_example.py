"""The guide's "Use with your own model" section runs as written (examples/own_model.py)."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "own_model.py")


def test_the_guide_quotes_the_example_verbatim():
    with open(os.path.join(REPO, "docs", "guide.md")) as f:
        readme = f.read()
    section = readme.split("## Use with your own model", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    with open(EXAMPLE) as f:
        assert block == f.read()


@pytest.mark.slow
def test_the_example_runs_and_rat_raises_fgsm_accuracy(tmp_path, data_dir):
    env = {**os.environ, "RAT_DATA_DIR": data_dir, "TF_CPP_MIN_LOG_LEVEL": "2"}
    run = subprocess.run([sys.executable, EXAMPLE], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    found = dict(re.findall(r"FGSM 0.2 accuracy (before|after) RAT: ([0-9.]+)", run.stdout))
    assert set(found) == {"before", "after"}, run.stdout[-2000:]
    assert float(found["after"]) > float(found["before"]) + 0.1  # this seed: 0.21 -> 0.48
    served = tf.saved_model.load(str(tmp_path / "rat_savedmodel")).signatures["serving_default"]
    out = served(images=tf.zeros((2, 28, 28, 1)))
    assert out["probabilities"].shape == (2, 10)
    np.testing.assert_allclose(out["probabilities"].numpy().sum(-1), 1.0, atol=1e-5)
