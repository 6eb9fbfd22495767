"""The private Keras / TensorFlow names rat_tf.keras_compat relies on exist in this install."""

import keras
import pytest
import tensorflow as tf

from rat_tf import keras_compat, models, trainers


@pytest.mark.parametrize("name", ["_symbolic_build", "_compute_loss", "_maybe_symbolic_build"])
def test_model_private_methods_exist(name):
    assert callable(getattr(keras.Model, name, None)), f"keras.Model.{name} is gone"


def test_compiled_trainer_has_a_loss_tracker():
    trainer = trainers.StandardModel(models.build_model("tiny_cnn", "mnist"))
    trainer.compile(optimizer="adam")
    assert hasattr(trainer, "_loss_tracker")
    assert trainer._loss_tracker in trainer.metrics


def test_backup_and_restore_private_names_exist(tmp_path):
    callback = keras.callbacks.BackupAndRestore(str(tmp_path))
    assert callable(getattr(callback, "_save_model", None))
    for name in ("_weights_path", "_training_metadata_path", "_current_epoch",
                 "_last_batch_seen"):
        assert hasattr(callback, name), f"BackupAndRestore.{name} is gone"


def test_multi_worker_mode_probe():
    strategy = tf.distribute.MultiWorkerMirroredStrategy()  # no TF_CONFIG: one local worker
    assert callable(getattr(strategy.extended, "_in_multi_worker_mode", None))
    assert keras_compat.multi_worker(strategy) is False
    assert keras_compat.multi_worker(tf.distribute.get_strategy()) is False
