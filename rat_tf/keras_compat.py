"""Every use of a private Keras or TensorFlow API in rat_tf, each with why it is needed.

The trainers and the resumable run need a few things Keras 3 does not expose publicly. They
are wrapped here, one function each, so an upgrade that breaks one breaks here, and
``tests/test_keras_compat.py`` checks every private name still exists in the installed
versions (the range pinned in ``pyproject.toml``).
"""

from __future__ import annotations

import os

import keras
import tensorflow as tf

from rat_tf import files


def multi_worker(strategy: tf.distribute.Strategy) -> bool:
    """Whether ``strategy`` is a MultiWorkerMirroredStrategy running with several workers."""
    # A MultiWorkerMirroredStrategy without a cluster runs locally; only the private
    # extended._in_multi_worker_mode() tells the two apart.
    extended = getattr(strategy, "extended", None)
    return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and bool(getattr(extended, "_in_multi_worker_mode", lambda: False)()))


def symbolic_build(model: keras.Model, data_batch: tuple) -> None:
    """Build a model's compiled state (metrics, optimizer) from an example batch."""
    # Keras' own Model._maybe_symbolic_build pulls a batch from the distributed iterator and
    # reduces it with strategy.reduce, which fails under MultiWorkerMirroredStrategy
    # (PerReplica -> Tensor). The trainers override it and call the private _symbolic_build
    # with a batch of the known input signature instead.
    with model.distribute_strategy.scope():
        model._symbolic_build(data_batch=data_batch)


def compiled_loss(model: keras.Model, x, y, y_pred, sample_weight, training: bool) -> tf.Tensor:
    """The compiled loss of a batch, scaled by 1 / replicas as Keras does for its gradients."""
    # Model.compute_loss (public) also adds the loss to the loss tracker; the trainers compute
    # the loss of one batch made of several parts and track its value themselves.
    return model._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                               training=training)


def track_loss(model: keras.Model, value: tf.Tensor, count: tf.Tensor) -> None:
    """Add ``value`` (the mean loss over ``count`` examples) to the model's "loss" log."""
    # The "loss" metric of Model.metrics is the private _loss_tracker; no public setter exists.
    model._loss_tracker.update_state(value, sample_weight=count)


def step_logs(results: dict, strategy: tf.distribute.Strategy) -> dict:
    """Step logs in the shape Keras can reduce under ``strategy``."""
    # Keras 3 reduces step logs across workers with strategy.reduce(MEAN, axis=0), which
    # rejects scalars (tensorflow/tensorflow#72388): hand it shape-[1] values.
    if multi_worker(strategy):
        return {k: tf.reshape(v, [1]) for k, v in results.items()}
    return results


class ClusterBackupAndRestore(keras.callbacks.BackupAndRestore):
    """``BackupAndRestore`` where every worker restores from the chief's backup, saved atomically.

    Each worker saves to its own ``backup_dir`` (no two processes write one file) but all
    restore ``restore_dir`` (the chief's), so a restarted cluster resumes at one epoch even if
    a worker died between the chief's save and its own. ``settings`` (the run's settings) are
    stored beside the first backup as ``settings_file``. The backup is NOT deleted at the end
    of training: the driver deletes it once the final outputs are written, so a kill in between
    resumes with nothing to re-train.
    """

    # Overrides the private _save_model and swaps the private _weights_path /
    # _training_metadata_path while restoring: the public callback neither writes atomically
    # nor restores from another folder than it saves to.

    def __init__(self, backup_dir: str, restore_dir: str | None = None,
                 settings: dict | None = None, settings_file: str = "run_settings.json"):
        super().__init__(backup_dir)
        self.restore_dir = restore_dir or backup_dir
        self.settings, self.settings_file = settings, settings_file

    def on_train_end(self, logs: dict | None = None) -> None:
        pass  # keep the backup until the outputs are written (see the class docstring)

    def _save_model(self) -> None:
        """Save weights, then the epoch, each atomically: a kill never leaves half a file.

        A kill between the two re-runs the last epoch on resume; nothing is lost.
        """
        if self.settings is not None:
            files.write_json(os.path.join(os.path.dirname(self._weights_path),
                                          self.settings_file), self.settings)
        files.atomic_write(self._weights_path,
                           lambda p: self.model.save_weights(p, overwrite=True), ".weights.h5")
        files.write_json(self._training_metadata_path,
                         {"epoch": self._current_epoch, "batch": self._last_batch_seen})

    def on_train_begin(self, logs: dict | None = None) -> None:
        own = (self._weights_path, self._training_metadata_path)
        self._weights_path = os.path.join(self.restore_dir, "latest.weights.h5")
        self._training_metadata_path = os.path.join(self.restore_dir, "training_metadata.json")
        try:
            super().on_train_begin(logs)
        finally:
            self._weights_path, self._training_metadata_path = own

