"""The trainers: RAT and its baselines (standard, FGSM-AT, PGD-AT) as Keras models.

One module each (``standard_trainer``, ``rat_trainer``, ``adversarial_trainer``); this one
gathers them, with :func:`make_trainer` and :func:`load_classifier`.

Every method is a small ``keras.Model`` that wraps a classifier and overrides ``train_step``,
so ``fit``, ``evaluate``, callbacks, checkpoints and ``tf.distribute`` strategies work as usual;
``call`` delegates to the classifier. They are registered Keras serialisables: a trainer saves
and loads as a ``.keras`` file with its classifier.
"""

from __future__ import annotations

from typing import Sequence

import keras

from rat_tf import models
from rat_tf.adversarial_trainer import ATTACK_OF, FGSM_RS_ALPHA, AdversarialTrainingModel
from rat_tf.rat_trainer import (BATCH_MODES, CARRY_MODES, RAT_INITS, STEP_LOSSES,
                                 TARGET_MODES, RATModel, RATSettings)
from rat_tf.standard_trainer import StandardModel

METHODS = ("standard", "rat", "fgsm_at", "pgd_at")


def make_trainer(method: str, classifier: keras.Model, **settings) -> StandardModel:
    """Wrap ``classifier`` in the trainer of ``method`` (standard|rat|fgsm_at|pgd_at)."""
    if method not in METHODS:
        raise ValueError(f"unknown training method {method!r}; choose one of {METHODS}")
    try:
        if method == "standard":
            return StandardModel(classifier, **settings)
        if method == "rat":
            return RATModel(classifier, **settings)
        return AdversarialTrainingModel(classifier, method, **settings)
    except TypeError as e:
        raise ValueError(f"bad settings for method {method!r}: {e}") from e


def load_classifier(path: str, image_shape: Sequence[int] | None = None,
                    num_classes: int | None = None) -> keras.Model:
    """The classifier in a ``.keras`` file (a classifier, or a trainer: its classifier), with
    its own architecture, checked against the data's image shape and number of classes."""
    try:
        loaded = keras.models.load_model(path, compile=False)
    except (ValueError, OSError, TypeError) as e:
        raise ValueError(f"{path}: not a loadable .keras classifier ({e})") from e
    classifier = loaded.classifier if isinstance(loaded, StandardModel) else loaded
    info = models.describe(classifier)
    if image_shape is not None and info.image_shape != tuple(image_shape):
        raise ValueError(f"{path}: the classifier takes images {info.image_shape}, the data "
                         f"has {tuple(image_shape)}")
    if num_classes is not None and info.num_classes != num_classes:
        raise ValueError(f"{path}: the classifier has {info.num_classes} classes, the data "
                         f"has {num_classes}")
    return classifier


__all__ = ["METHODS", "TARGET_MODES", "BATCH_MODES", "RAT_INITS", "STEP_LOSSES", "CARRY_MODES",
           "ATTACK_OF",
           "FGSM_RS_ALPHA", "RATSettings",
           "StandardModel", "RATModel", "AdversarialTrainingModel", "make_trainer",
           "load_classifier"]
