"""The resumable training run: :func:`train` behind ``bin/train.py`` and the experiment.

:func:`train` reads as its steps: prepare the run folder (resume or start over), load the
data, build and compile the trainer (:mod:`rat_tf.trainers`), set its perturbations (RAT),
fit with the callbacks (:mod:`rat_tf.callbacks`) and write the outputs (``model.keras``,
``metrics.json``, ``history.csv``, TensorBoard logs and, for RAT, ``perturbations.npz``).

Modules: :mod:`~rat_tf.training.config` (:class:`TrainConfig`), :mod:`~rat_tf.training.optim`
(schedules, optimizers, the smoothed loss) and :mod:`~rat_tf.training.run` (:func:`train`).
"""

from absl import logging  # noqa: F401  (tests patch training.logging.info)

from rat_tf.training.config import (AUGMENTATIONS, DEFAULT_RAT_SUBSET, LR_SCHEDULES, METHODS,
                                    OPTIMIZERS, SEARCH_METHODS, SETTINGS_FILE,
                                    WARMUP_SCHEDULES, Arrays, TrainConfig, WorkerLostError)
from rat_tf.training.optim import (OneCycle, SmoothedSparseCrossentropy, make_optimizer,
                                   make_schedule)
from rat_tf.training.run import accuracy_curve, train, train_stream

__all__ = ["AUGMENTATIONS", "DEFAULT_RAT_SUBSET", "LR_SCHEDULES", "METHODS", "OPTIMIZERS",
           "SEARCH_METHODS", "SETTINGS_FILE", "WARMUP_SCHEDULES", "Arrays", "TrainConfig",
           "WorkerLostError", "OneCycle", "SmoothedSparseCrossentropy", "make_optimizer",
           "make_schedule", "accuracy_curve", "train", "train_stream"]
