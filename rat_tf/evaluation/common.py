"""What the measures, checks and renderers share: the held-out check, models and their
training metrics, the compiled correct() step, accuracies and number formats."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from rat_tf import attacks, data, models, perturbation_files
from rat_tf.evaluation.settings import ModelFn, TRAINING_METRICS_FILE


def check_disjoint(x_test: np.ndarray, x_search: np.ndarray | None = None,
                   search_fingerprints: np.ndarray | Sequence[str] | None = None) -> None:
    """Raise ValueError if a test image is also one of the search images (or fingerprints)."""
    test = set(data.fingerprints(x_test).tolist())
    for what, prints in (("x_search", None if x_search is None else data.fingerprints(x_search)),
                         ("the perturbation's search images", search_fingerprints)):
        if prints is None:
            continue
        common = test & set(np.asarray(prints).astype(str).tolist())
        if common:
            raise ValueError(f"{len(common)} test image(s) are also among {what}: a universal "
                             f"perturbation must be measured on held-out images, never on the "
                             f"images it was searched on")


def load_model_fn(model: keras.Model | str | Callable) -> tuple[ModelFn, str]:
    """A differentiable callable x -> logits, and a description, from a model or a path.

    Accepts a keras Model, any callable, a ``.keras`` file, a directory holding ``model.keras``
    or a SavedModel directory (loaded with :func:`rat_tf.export.load_serving_fn`).
    """
    if isinstance(model, keras.Model):
        return models.as_model_fn(model), f"keras:{model.name}"
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "saved_model.pb")):
            from rat_tf import export  # only needed for SavedModels

            return export.load_serving_fn(path), f"saved_model:{path}"
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, "model.keras")):
            path = os.path.join(path, "model.keras")
        if os.path.isfile(path) and path.endswith((".keras", ".h5")):
            loaded = keras.models.load_model(path, compile=False)
            return models.as_model_fn(loaded), f"keras:{path}"
        raise ValueError(f"{path}: not a .keras file, a directory with model.keras, or a "
                         f"SavedModel directory")
    if callable(model):
        return model, getattr(model, "__name__", type(model).__name__)
    raise ValueError(f"cannot evaluate a {type(model).__name__}: pass a keras Model, a callable "
                     f"or a model path")


def training_metrics_path(model: Any) -> str | None:
    """The ``metrics.json`` of the training run beside a model given as a path (a ``.keras``
    file, or a folder holding ``model.keras`` or a SavedModel); None: no such file."""
    if not isinstance(model, (str, os.PathLike)):
        return None
    path = os.fspath(model)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    metrics = os.path.join(folder, TRAINING_METRICS_FILE)
    return metrics if os.path.isfile(metrics) else None


def read_training_metrics(path: str) -> dict | None:
    """The training metrics in ``path`` (a ``metrics.json``); None, with a warning, if the file
    is not a JSON object."""
    try:
        with open(path) as f:
            metrics = json.load(f)
    except (OSError, ValueError) as e:
        logging.warning("%s: not readable (%s); the masking checks go without it", path, e)
        return None
    if not isinstance(metrics, dict):
        logging.warning("%s holds no metrics object; the masking checks go without it", path)
        return None
    return metrics


def training_record(metrics: Mapping, source: str = "given") -> dict | None:
    """What the masking checks use of a model's training metrics: the final training
    adversarial accuracy (``train_adversarial_accuracy``, else the last epoch of the history's
    ``adversarial_accuracy``) and the trainer's method, radius and norm; None for a method
    without adversarial batches (standard, RAT)."""
    accuracy = metrics.get("train_adversarial_accuracy")
    if accuracy is None:
        epochs = (metrics.get("history") or {}).get("adversarial_accuracy") or []
        accuracy = next((a for a in reversed(epochs) if a is not None), None)
    trainer = metrics.get("settings") or {}
    if accuracy is None or trainer.get("eps") is None:
        return None
    return {"adversarial_accuracy": float(accuracy), "eps": float(trainer["eps"]),
            "norm": trainer.get("norm", "linf"), "method": trainer.get("method"),
            "source": source}


def correct_fn(model_fn: ModelFn, attack: Callable | None = None,
               strategy: tf.distribute.Strategy | None = None) -> attacks.ReplicaStep:
    """A compiled ([x, y], eps) -> correct [B] of a fixed-size global batch, attacked if
    ``attack``, every replica of ``strategy`` (None: the current strategy) on its slice.

    ``attack(x, y, eps)`` runs per replica; ``eps`` is a tensor argument, so one trace serves
    every radius of a sweep.
    """
    def step(xb, yb, eps):
        if attack is not None:
            xb = attack(xb, yb, eps)
        return tf.equal(tf.argmax(model_fn(xb), -1, output_type=tf.int32), yb)

    return attacks.ReplicaStep(step, strategy)


def correct_on(step: attacks.ReplicaStep, x: np.ndarray, y: np.ndarray, batch_size: int,
               eps: float = 0.0) -> np.ndarray:
    """Boolean [N]: whether each image is classified correctly by ``step`` (of
    :func:`correct_fn`), in padded global batches of ``batch_size``, a multiple of the
    replicas."""
    if len(x) == 0:
        return np.zeros([0], bool)
    return step.map_batches([x, y], batch_size, np.float32(eps))


def fgsm_correct_fn(model_fn: ModelFn, norm: str = "linf",
                    strategy: tf.distribute.Strategy | None = None) -> attacks.ReplicaStep:
    """:func:`correct_fn` under the (untargeted, no random start) FGSM attack."""
    return correct_fn(model_fn, lambda x, y, eps: attacks.fgsm(model_fn, x, y, eps, norm=norm),
                      strategy)


def pgd_correct_fn(model_fn: ModelFn, *, steps: int, restarts: int,
                   step_size: float | None = None, seed: int = 0,
                   strategy: tf.distribute.Strategy | None = None) -> attacks.ReplicaStep:
    """:func:`correct_fn` under PGD (L-inf, random start, the worst of ``restarts``)."""
    return correct_fn(model_fn, lambda x, y, eps: attacks.pgd(
        model_fn, x, y, eps, step_size=attacks.pgd_step_size(eps, steps, step_size),
        steps=steps, rand_init=True, restarts=restarts, seed=seed), strategy)


def _check_arrays(x: np.ndarray, y: np.ndarray) -> None:
    if len(x) == 0:
        raise ValueError("accuracy of an empty set")
    if len(x) != len(y):
        raise ValueError(f"{len(x)} images but {len(y)} labels")


def accuracy(model: keras.Model | ModelFn, x: np.ndarray, y: np.ndarray,
             batch_size: int = 500, *,
             strategy: tf.distribute.Strategy | None = None) -> float:
    """Clean accuracy of a classifier (or an x -> logits callable) on arrays, each batch split
    over the replicas of ``strategy`` (None: the current strategy)."""
    _check_arrays(x, y)
    step = correct_fn(models.as_model_fn(model), strategy=strategy)
    return float(correct_on(step, np.asarray(x, np.float32), np.asarray(y, np.int32),
                            batch_size).mean())


def adversarial_accuracy(model: keras.Model | ModelFn, x: np.ndarray, y: np.ndarray,
                         eps: float, *, norm: str = "linf", batch_size: int = 500,
                         step: attacks.ReplicaStep | None = None,
                         strategy: tf.distribute.Strategy | None = None) -> float:
    """Accuracy under the (untargeted, no random start) FGSM attack of radius ``eps``.

    ``step``: a compiled :func:`fgsm_correct_fn` of the model, to reuse over calls (it holds
    its strategy); else one is built for ``strategy`` (None: the current strategy).
    """
    _check_arrays(x, y)
    step = step or fgsm_correct_fn(models.as_model_fn(model), norm, strategy)
    return float(correct_on(step, np.asarray(x, np.float32), np.asarray(y, np.int32),
                            batch_size, eps).mean())


def per_class_accuracy(correct: np.ndarray, y: np.ndarray, k: int) -> list[float | None]:
    """Per class c < k: the share of its images ``correct`` (None: no image of c)."""
    return [float(correct[y == c].mean()) if np.any(y == c) else None for c in range(k)]


def by_target(V: np.ndarray) -> np.ndarray:
    """[K, ...] with every perturbation toward target t in row t (per-source V [K,K,...]:
    its column t)."""
    return np.swapaxes(V, 0, 1) if V.ndim == 5 else V


def mean_over_targets(rates: np.ndarray, V: np.ndarray) -> float:
    """Mean success over the targets that have a perturbation (all-zero rows are skipped)."""
    V = by_target(V)
    searched = np.any(np.reshape(V, (V.shape[0], -1)) != 0, axis=1)
    rates = rates[searched & np.isfinite(rates)]
    return float(np.mean(rates)) if rates.size else 0.0


def linf_norms(V: np.ndarray) -> list[float]:
    """Per target: the largest L-inf norm of a perturbation toward it."""
    V = by_target(V)
    return np.max(np.abs(np.reshape(V, (V.shape[0], -1))), axis=1).astype(float).tolist()


def pct(v: float | None) -> str:
    """A fraction as a percentage with one decimal for a table ("-" for None)."""
    return "-" if v is None else f"{100 * v:.1f}"


def radius_label(eps: float | str, dataset: str) -> str:
    """A radius for a table header: k/d for a dataset with a radius denominator d (k/255 on
    CIFAR-10), plain decimals otherwise."""
    eps, d = float(eps), data.get_info(dataset).radius_denominator
    if d and abs(eps * d - round(eps * d)) < 1e-4:
        return f"{round(eps * d)}/{d}"
    return f"{eps:g}"


def radius_of(report: Mapping, eps: float | str) -> str:
    """:func:`radius_label` of ``eps`` for the dataset of ``report``."""
    return radius_label(eps, report["dataset"])


def jsonable_meta(meta: Mapping) -> dict:
    """The small, JSON-ready part of a perturbation file's metadata (no fingerprint lists)."""
    return {k: v for k, v in meta.items() if k != perturbation_files.FINGERPRINT_KEY
            and isinstance(v, (str, int, float, bool, type(None)))}


def float_or_none(v: Any) -> float | None:
    """``v`` as a float, None kept."""
    return None if v is None else float(v)
