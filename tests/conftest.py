"""Shared fixtures: real data slices from $RAT_DATA_DIR and a small pretrained MNIST model.

The CPU is split into 2 logical devices before TensorFlow starts, so MirroredStrategy can be
tested on CPU (tests that use the default strategy run on /cpu:0).

Two tiers: ``pytest -m "not slow"`` runs the fast tier (about a minute); the ``slow`` tier is
every test that trains or attacks a real model at some length. A test is slow when it is
marked ``@pytest.mark.slow``, uses a fixture of ``SLOW_FIXTURES`` or lives in a module of
``SLOW_MODULES``; CI runs both tiers.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_HERE = os.path.dirname(os.path.abspath(__file__))
os.environ.setdefault("RAT_DATA_DIR", os.path.join(_HERE, "..", "..", "shared", "data"))

import pytest  # noqa: E402

from rat_tf import distribute  # noqa: E402

distribute.split_cpu(2)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from rat_tf import data, models  # noqa: E402

DATA_DIR = os.environ["RAT_DATA_DIR"]


# Fixtures that train a model or run a report, and modules whose every test trains or
# runs a binary end to end.
SLOW_FIXTURES = {"mnist_model", "mnist_model_path", "mirrored_2cpu", "slices", "run_dir",
                 "reports", "saved_model", "trained"}
SLOW_MODULES = {"test_experiment", "test_crosscheck", "test_crosscheck_autoattack",
                "test_distributed", "test_readme_example", "test_perturb_bin",
                "test_distributed_evaluation", "test_autoattack", "test_training", "test_cli",
                "test_own_models"}


class _CrashAt(keras.callbacks.Callback):
    """Simulates a crash at the start of epoch ``at`` (0-based), after earlier backups."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.at:
            raise RuntimeError("simulated crash")


@pytest.fixture
def crash_at():
    """``crash_at(n)``: a callback that raises RuntimeError("simulated crash") as epoch n
    begins, as a killed run stops after its last backup."""
    return _CrashAt


def pytest_report_header(config):
    return f"RAT_DATA_DIR={DATA_DIR}"


# Modules whose tests share an expensive module-scoped fixture: under pytest-xdist
# (``-n 2 --dist loadgroup``) each runs on one worker, so the fixture is built once; the
# tests of other modules are spread over the workers one by one.
GROUPED_MODULES = {"test_evaluation", "test_experiment", "test_crosscheck",
                   "test_crosscheck_autoattack", "test_distributed", "test_distributed_evaluation",
                   "test_autoattack", "test_attacks", "test_own_models", "test_perturb_bin",
                   "test_attack_registry"}


# tryfirst: pytest-xdist's own hook turns the xdist_group marker into a node id suffix, so the
# marker must be in place before it runs (else every test is scheduled on its own).
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in SLOW_MODULES or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if module in GROUPED_MODULES:
            item.add_marker(pytest.mark.xdist_group(module))


@pytest.fixture(scope="session")
def mirrored_2cpu():
    """One MirroredStrategy over the 2 logical CPUs for the session.

    Every MirroredStrategy of a process starts its collective keys at the same base, so
    collectives of strategies created elsewhere in the process could collide with ours (shape
    mismatch errors). TensorFlow's own tests give each strategy its own
    ``_collective_key_base`` ("only set this in tests"); so do we.
    """
    tf.distribute.MirroredStrategy._collective_key_base = 1_000_000
    try:
        return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    finally:
        tf.distribute.MirroredStrategy._collective_key_base = 0


@pytest.fixture(scope="session")
def data_dir():
    if not data.files_available("mnist", DATA_DIR):
        pytest.fail(f"real MNIST files not found below RAT_DATA_DIR={DATA_DIR}")
    return DATA_DIR


@pytest.fixture(scope="session")
def mnist_arrays(data_dir):
    """Full real MNIST as float32 arrays: (x_train, y_train, x_test, y_test)."""
    x_train, y_train = data.load_arrays("mnist", "train", "files", data_dir)
    x_test, y_test = data.load_arrays("mnist", "test", "files", data_dir)
    return x_train, y_train, x_test, y_test


@pytest.fixture(scope="session")
def mnist_model(mnist_arrays):
    """A ``tiny_cnn`` trained 2 epochs on 12,000 real MNIST images (about 97% test accuracy).

    The zoo's smallest model: every test that attacks or fine-tunes it costs a tenth of what
    it would with ``mnist_cnn``.
    """
    x_train, y_train, _, _ = mnist_arrays
    keras.utils.set_random_seed(0)
    model = models.build_model("tiny_cnn", "mnist")
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x_train[:12000], y_train[:12000], batch_size=64, epochs=2, verbose=0)
    return model


@pytest.fixture(scope="session")
def mnist_model_path(mnist_model, tmp_path_factory):
    """The pretrained MNIST model saved as a .keras file."""
    path = str(tmp_path_factory.mktemp("pretrained") / "model.keras")
    mnist_model.save(path)
    return path


@pytest.fixture(scope="session")
def fresh_tup_success(mnist_arrays):
    """A function: mean success of targeted universal perturbations searched afresh against a
    model (0.3, 3 passes on 300 test images), measured on 1,000 other test images."""
    from rat_tf import attacks

    _, _, x_test, y_test = mnist_arrays
    x_search, y_search = x_test[:300], y_test[:300]
    x_eval, y_eval = x_test[5000:6000], y_test[5000:6000]

    def success(model) -> float:
        fresh, _ = attacks.targeted_universal(model, x_search, y_search, 0.3, max_passes=3,
                                              seed=1)
        return float(np.mean(attacks.targeted_success_rate(model, x_eval, y_eval, fresh)))

    return success
