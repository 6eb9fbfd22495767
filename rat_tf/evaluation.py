"""Robustness reports: clean, FGSM sweep, PGD, targeted and untargeted universal perturbations.

The protocol of docs/method.md, section 3. Every number is measured on held-out test images; the
universal perturbations are searched on *other* images (``x_search``, e.g. training images)
and :func:`robustness_report` refuses to run when the two sets share an image. A report is a
JSON-ready dict that also records every setting; :func:`write_report` turns several reports
(models side by side) into ``report.json``, ``report.md`` and PNG figures. Every measure runs
under a ``tf.distribute`` strategy, each batch split over its replicas, with the per-image
results of one device.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from typing import Any, Callable, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from rat_tf import attacks, autoattack, data, files, models, ops, perturbation_files, plots
from rat_tf import registry

ModelFn = Callable[[tf.Tensor], tf.Tensor]
DEFAULT_MEASURES = ("clean", "fgsm", "pgd", "per_class", "tup_given", "tup_fresh", "uap",
                    "autoattack", "masking")
TRAINING_METRICS_FILE = "metrics.json"  # what rat_tf.training.train writes beside model.keras

# The gradient-masking rules (:func:`masking_flags` says why these numbers).
MASKING_MIN_IMAGES = 5  # a difference of accuracies is real only beyond this many images ...
MASKING_SE = 2.0  # ... and beyond this many binomial standard errors (:func:`noise_margin`)
MASKING_MIN_GAP = 0.3  # FGSM above PGD / AutoAttack by at least this (and the share below)
MASKING_FGSM_SHARE = 0.1  # FGSM takes at most this share of the accuracy PGD / AA take
MASKING_TRAIN_GAP = 0.5  # training adversarial accuracy above held-out PGD by more than this
MASKING_SQUARE_SHARE = 0.02  # Square breaks more than this share of what APGD / FAB left
_ROUNDING = 1e-9  # accuracies are k / n: a difference equal to a threshold is not above it

@dataclasses.dataclass
class EvalSettings:
    """Attack settings of a robustness report; :meth:`for_dataset` fills the dataset's radii.

    All radii are L-inf except the universal ones, which use ``tup_norm``. ``class_eps`` is the
    FGSM radius of the per-class breakdown; ``uap_eps`` (None: ``tup_eps``) the radius of the
    untargeted universal perturbation; ``n_test`` limits the test images (None: all); PGD, the
    costly attack, runs on the first ``n_pgd`` of them (None: all), and the report then also
    holds FGSM at the PGD radii on those same images (``pgd_fgsm_accuracy``). AutoAttack
    (:func:`rat_tf.autoattack.autoattack`) runs at ``aa_eps`` on the first ``aa_n`` test
    images. ``masking_fgsm_share`` and ``masking_train_gap`` are thresholds of the
    gradient-masking checks (:func:`masking_flags`). ``measures`` names the measures of the
    report, in order (:data:`MEASURES`).
    """

    dataset: str = "mnist"
    fgsm_eps: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3)
    pgd_eps: tuple[float, ...] = (0.1, 0.3)
    pgd_steps: int = 40
    pgd_restarts: int = 2
    pgd_step_size: float | None = None  # None: 2.5 * eps / steps (Madry et al.)
    class_eps: float = 0.1
    tup_eps: float = 0.3
    tup_norm: str = "linf"
    tup_method: str = "sgd"
    tup_passes: int = 10
    tup_delta: float = 0.2
    tup_step_size: float | None = None  # None: the attacks module default
    tup_n_per_class: int = 100  # search images per class, drawn from x_search
    tup_batch_size: int = 50  # search images per step (the search is tiled over the K targets)
    uap_eps: float | None = None
    uap_passes: int = 5
    batch_size: int = 250
    n_test: int | None = 1000
    n_pgd: int | None = None
    aa_eps: float | None = None  # None: the largest PGD radius
    aa_version: str = "standard"
    aa_attacks: tuple[str, ...] | None = None  # None: the version's sequence
    aa_steps: int = 100
    aa_queries: int = 5000
    aa_restarts: int = 1  # APGD-CE (and APGD-DLR) runs from random starts
    aa_n: int | None = 1000  # AutoAttack on the first aa_n test images (None: all)
    masking_steps: int = 20  # PGD steps of the gradient-masking check at the whole-box radius
    masking_n: int = 200  # its test images
    masking_fgsm_share: float = MASKING_FGSM_SHARE
    masking_train_gap: float = MASKING_TRAIN_GAP
    measures: tuple[str, ...] = DEFAULT_MEASURES
    seed: int = 0

    @classmethod
    def for_dataset(cls, dataset: str, **overrides: Any) -> "EvalSettings":
        """Settings with the radii of ``dataset``, then the overrides that are not None."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown evaluation settings {sorted(unknown)}")
        info = data.get_info(dataset)
        # The TUP radius is the RAT radius of V, so "given" and "fresh" V are comparable.
        base = dict(dataset=dataset, fgsm_eps=info.fgsm_eps, pgd_eps=info.pgd_eps,
                    class_eps=info.class_eps, tup_eps=info.eps)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def __post_init__(self) -> None:
        for name in ("fgsm_eps", "pgd_eps"):
            radii = tuple(float(e) for e in np.atleast_1d(getattr(self, name)))
            if not radii or not all(math.isfinite(e) and e > 0 for e in radii):
                raise ValueError(f"{name} must be a non-empty list of positive radii, got "
                                 f"{getattr(self, name)}")
            setattr(self, name, radii)
        for name in ("class_eps", "tup_eps", "uap_eps", "pgd_step_size", "tup_step_size",
                     "aa_eps"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(float(value)) and float(value) > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value}")
        for name in ("pgd_steps", "pgd_restarts", "tup_passes", "tup_n_per_class",
                     "uap_passes", "batch_size", "tup_batch_size", "aa_steps", "aa_queries",
                     "aa_restarts", "masking_steps", "masking_n"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        ops.check_norm(self.tup_norm)
        if self.tup_method not in attacks.TU_METHODS:
            raise ValueError(f"tup_method must be one of {attacks.TU_METHODS}, got "
                             f"{self.tup_method!r}")
        if not 0.0 <= self.tup_delta <= 1.0:
            raise ValueError(f"tup_delta must be in [0, 1], got {self.tup_delta}")
        for name in ("masking_fgsm_share", "masking_train_gap"):
            if not 0.0 < float(getattr(self, name)) < 1.0:
                raise ValueError(f"{name} must be in (0, 1), got {getattr(self, name)}")
        for name in ("n_test", "n_pgd", "aa_n"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)}")
        self.measures = tuple(self.measures)
        if self.aa_attacks is not None:
            self.aa_attacks = tuple(self.aa_attacks)
        unknown = [m for m in self.measures if m not in MEASURES]
        if unknown or not self.measures or len(set(self.measures)) != len(self.measures):
            raise ValueError(f"measures must be distinct names of {list(MEASURES)}, got "
                             f"{list(self.measures)}")
        for name in self.measures:
            MEASURES[name].check(self)

    def to_dict(self) -> dict:
        """The settings as a JSON-ready dict (with the resolved UAP radius)."""
        d = dataclasses.asdict(self)
        d["fgsm_eps"], d["pgd_eps"] = list(self.fgsm_eps), list(self.pgd_eps)
        d["uap_eps"] = float(self.uap_eps or self.tup_eps)
        d["aa_eps"] = float(self.resolved_aa_eps())
        d["measures"] = list(self.measures)
        if self.aa_attacks is not None:
            d["aa_attacks"] = list(self.aa_attacks)
        return d

    def resolved_aa_eps(self) -> float:
        """The AutoAttack radius: ``aa_eps``, or the largest PGD radius."""
        return float(self.aa_eps) if self.aa_eps is not None else max(self.pgd_eps)


class Report(dict):
    """A JSON-ready dict of results; ``.arrays`` keeps the perturbations found (not in JSON)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.arrays: dict[str, np.ndarray] = {}


# --------------------------------------------------------------------------- held-out check
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


# --------------------------------------------------------------------------- models
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


def _per_class(correct: np.ndarray, y: np.ndarray, k: int) -> list[float | None]:
    return [float(correct[y == c].mean()) if np.any(y == c) else None for c in range(k)]


def _by_target(V: np.ndarray) -> np.ndarray:
    """[K, ...] with every perturbation toward target t in row t (per-source V [K,K,...]:
    its column t)."""
    return np.swapaxes(V, 0, 1) if V.ndim == 5 else V


def _mean_over_targets(rates: np.ndarray, V: np.ndarray) -> float:
    """Mean success over the targets that have a perturbation (all-zero rows are skipped)."""
    V = _by_target(V)
    searched = np.any(np.reshape(V, (V.shape[0], -1)) != 0, axis=1)
    rates = rates[searched & np.isfinite(rates)]
    return float(np.mean(rates)) if rates.size else 0.0


def _linf(V: np.ndarray) -> list[float]:
    """Per target: the largest L-inf norm of a perturbation toward it."""
    V = _by_target(V)
    return np.max(np.abs(np.reshape(V, (V.shape[0], -1))), axis=1).astype(float).tolist()


# --------------------------------------------------------------------------- measures
@dataclasses.dataclass
class Context:
    """What the measures of one report share: the model, the images, the settings, the
    strategy whose replicas share every batch, compiled steps and the per-image results of
    earlier measures (``correct``, by key)."""

    model_fn: ModelFn
    x_test: np.ndarray
    y_test: np.ndarray
    x_search: np.ndarray  # the balanced subset the universal perturbations are searched on
    y_search: np.ndarray
    settings: EvalSettings
    num_classes: int
    n_pgd: int
    perturbations: np.ndarray | None = None  # V given (of training), if any
    perturbation_meta: dict = dataclasses.field(default_factory=dict)
    training: dict | None = None  # the model's final training adversarial accuracy, if known
    strategy: tf.distribute.Strategy = dataclasses.field(
        default_factory=tf.distribute.get_strategy)
    correct: dict = dataclasses.field(default_factory=dict)  # key -> bool [n] per test image
    done: Callable = lambda stage, t0, result=None: None  # noqa: E731 (set by the report)
    # progress(stage, cost done, revised cost) within a stage (set by the report)
    progress: Callable = lambda stage, done, total: None  # noqa: E731
    _steps: dict = dataclasses.field(default_factory=dict)

    def cached(self, key: str, build: Callable[[], attacks.ReplicaStep]
               ) -> attacks.ReplicaStep:
        """The compiled step of ``key``, built by ``build`` once per report."""
        if key not in self._steps:
            self._steps[key] = build()
        return self._steps[key]

    def step(self, key: str, attack: Callable | None = None) -> attacks.ReplicaStep:
        """The compiled :func:`correct_fn` of ``key`` (under ``attack``), once per report."""
        return self.cached(key, lambda: correct_fn(self.model_fn, attack, self.strategy))

    def clean(self) -> np.ndarray:
        """Per test image: classified correctly."""
        if "clean" not in self.correct:
            self.correct["clean"] = correct_on(self.step("clean"), self.x_test, self.y_test,
                                               self.settings.batch_size)
        return self.correct["clean"]

    def fgsm(self, eps: float, n: int | None = None) -> np.ndarray:
        """Per image of the first ``n`` test images: correct under FGSM at ``eps``."""
        n = len(self.x_test) if n is None else n
        key = f"fgsm {eps:g}"
        if key not in self.correct or len(self.correct[key]) < n:
            step = self.cached("fgsm", lambda: fgsm_correct_fn(self.model_fn,
                                                               strategy=self.strategy))
            self.correct[key] = correct_on(step, self.x_test[:n], self.y_test[:n],
                                           self.settings.batch_size, eps)
        return self.correct[key][:n]

    def share(self, n: float) -> float:
        """``n`` images (or image passes) as a fraction of the test set (for stage costs)."""
        return n / max(1, len(self.x_test))


class Measure:
    """One named unit of a robustness report: its stages (with a rough cost in forward and
    backward passes over the test set, for the progress bar), the report keys it fills, and
    its columns in the Markdown table. Subclass it and :func:`register_measure` an instance."""

    name = ""

    def check(self, settings: EvalSettings) -> None:
        """Raise ValueError naming a bad setting of this measure (called by EvalSettings)."""

    def stages(self, ctx: Context) -> list[tuple[str, float]]:
        """(stage name, cost) of each stage this measure will run."""
        return [(self.name, 1.0)]

    def run(self, ctx: Context, report: Mapping) -> dict:
        """Measure; return the report entries. Call ``ctx.done(stage, t0, result)`` per stage."""
        raise NotImplementedError

    def columns(self, report: Mapping) -> list[tuple[str, str]]:
        """(header, cell) pairs of this measure in the main Markdown table."""
        return []


MEASURES: registry.Registry[Measure] = registry.Registry("measure")


def register_measure(measure: Measure) -> Measure:
    """Add a measure to :data:`MEASURES` under its ``name`` (EvalSettings.measures picks it)."""
    if not isinstance(measure, Measure):
        raise ValueError("register_measure takes a Measure instance")
    return MEASURES.add(measure.name, measure)


def unregister_measure(name: str) -> None:
    """Remove a measure added by :func:`register_measure` (the built-in ones stay)."""
    MEASURES.remove(name)


def _radius_of(report: Mapping, eps: float | str) -> str:
    return _radius(eps, report["dataset"])


class _Clean(Measure):
    name = "clean"

    def run(self, ctx, report):
        t0 = time.time()
        acc = float(ctx.clean().mean())
        ctx.done("clean", t0, acc)
        return {"clean_accuracy": acc}

    def columns(self, report):
        return [("clean", _pct(report.get("clean_accuracy")))]


class _FGSM(Measure):
    name = "fgsm"

    def stages(self, ctx):
        return [(f"fgsm {e:g}", 3.0) for e in ctx.settings.fgsm_eps]

    def run(self, ctx, report):
        out = {}
        for eps in ctx.settings.fgsm_eps:
            t0 = time.time()
            out[f"{eps:g}"] = float(ctx.fgsm(eps).mean())
            ctx.done(f"fgsm {eps:g}", t0, out[f"{eps:g}"])
        return {"fgsm_accuracy": out}

    def columns(self, report):
        return [(f"FGSM {_radius_of(report, e)}", _pct(a))
                for e, a in report.get("fgsm_accuracy", {}).items()]


class _PGD(Measure):
    """PGD with restarts on the first ``n_pgd`` test images, and FGSM on those same images."""

    name = "pgd"

    def stages(self, ctx):
        s = ctx.settings
        return [(f"pgd {e:g}", 2.0 * s.pgd_steps * s.pgd_restarts * ctx.share(ctx.n_pgd))
                for e in s.pgd_eps]

    def run(self, ctx, report):
        s, n = ctx.settings, ctx.n_pgd
        step = ctx.cached("pgd", lambda: pgd_correct_fn(
            ctx.model_fn, steps=s.pgd_steps, restarts=s.pgd_restarts,
            step_size=s.pgd_step_size, seed=s.seed, strategy=ctx.strategy))
        acc, fgsm = {}, {}
        for eps in s.pgd_eps:
            t0 = time.time()
            acc[f"{eps:g}"] = float(correct_on(step, ctx.x_test[:n], ctx.y_test[:n],
                                               s.batch_size, eps).mean())
            fgsm[f"{eps:g}"] = float(ctx.fgsm(eps, n).mean())
            ctx.done(f"pgd {eps:g}", t0, acc[f"{eps:g}"])
        # FGSM at the PGD radii on the PGD images
        return {"pgd_accuracy": acc, "pgd_fgsm_accuracy": fgsm}

    def columns(self, report):
        st = report["settings"]
        steps = f"PGD-{st['pgd_steps']}x{st['pgd_restarts']}"
        if report.get("num_pgd", report["num_test"]) < report["num_test"]:
            steps += f" (first {report['num_pgd']})"
        return [(f"{steps} {_radius_of(report, e)}", _pct(a))
                for e, a in report.get("pgd_accuracy", {}).items()]


class _PerClass(Measure):
    name = "per_class"

    def stages(self, ctx):
        return []

    def run(self, ctx, report):
        k, y = ctx.num_classes, ctx.y_test
        return {"per_class": {
            "count": np.bincount(y, minlength=k).astype(int).tolist(),
            "clean": _per_class(ctx.clean(), y, k),
            "fgsm": _per_class(ctx.fgsm(ctx.settings.class_eps), y, k),
            "fgsm_eps": float(ctx.settings.class_eps)}}


def _tup_column(report: Mapping, which: str) -> tuple[str, str]:
    st = report["settings"]
    tup = (_radius_of(report, st["tup_eps"])
           + ("" if st["tup_norm"] == "linf" else f" {st['tup_norm']}"))
    entry = report.get(f"tup_{which}")
    return f"TUP {which} {tup} (succ.)", _pct(entry["mean"] if entry else None)


def _tup_success(ctx, v: np.ndarray) -> dict:
    """The success of V per target on the test images, its mean and its L-inf size."""
    rates = np.asarray(attacks.targeted_success_rate(
        ctx.model_fn, ctx.x_test, ctx.y_test, v, batch_size=ctx.settings.batch_size * 2,
        strategy=ctx.strategy), np.float64)
    return {"success_rate": files.floats(rates), "mean": _mean_over_targets(rates, v),
            "linf": _linf(v)}


class _TUPGiven(Measure):
    """Success on the test images of the perturbations used in training (if given)."""

    name = "tup_given"

    def stages(self, ctx):
        return [] if ctx.perturbations is None else [("tup given", float(ctx.num_classes))]

    def run(self, ctx, report):
        v = ctx.perturbations
        if v is None:
            return {"tup_given": None}
        t0 = time.time()
        out = {**_tup_success(ctx, v), "meta": _jsonable_meta(ctx.perturbation_meta)}
        report.arrays["tup_given"] = v
        ctx.done("tup given", t0, out["mean"])
        return {"tup_given": out}

    def columns(self, report):
        return [_tup_column(report, "given")]


class _TUPFresh(Measure):
    """Targeted universal perturbations searched again against the model, on other images."""

    name = "tup_fresh"

    def stages(self, ctx):
        s = ctx.settings
        search = ctx.share(len(ctx.x_search)) * ctx.num_classes
        return [("tup fresh", 2.0 * s.tup_passes * search + ctx.num_classes)]

    def run(self, ctx, report):
        s, t0 = ctx.settings, time.time()
        v, stats = attacks.targeted_universal(
            ctx.model_fn, ctx.x_search, ctx.y_search, s.tup_eps, num_classes=ctx.num_classes,
            norm=s.tup_norm, method=s.tup_method, delta=s.tup_delta, max_passes=s.tup_passes,
            step_size=s.tup_step_size, batch_size=s.tup_batch_size, seed=s.seed,
            strategy=ctx.strategy)
        v = np.asarray(v, np.float32)
        out = {**_tup_success(ctx, v),
               "search_success_rate": files.floats(stats.get("success_rate", [])),
               "passes": int(stats.get("passes", 0)),
               "norm": files.floats(stats.get("norm", []))}
        report.arrays["tup_fresh"] = v
        ctx.done("tup fresh", t0, out["mean"])
        return {"tup_fresh": out}

    def columns(self, report):
        return [_tup_column(report, "fresh")]


class _UAP(Measure):
    """An untargeted universal perturbation searched on the search images; its fooling rate."""

    name = "uap"

    def stages(self, ctx):
        return [("uap", 2.0 * ctx.settings.uap_passes * ctx.share(len(ctx.x_search)) + 2.0)]

    def run(self, ctx, report):
        s, t0 = ctx.settings, time.time()
        eps = float(s.uap_eps or s.tup_eps)
        v, stats = attacks.untargeted_universal(ctx.model_fn, ctx.x_search, ctx.y_search, eps,
                                                norm=s.tup_norm, max_passes=s.uap_passes,
                                                batch_size=s.tup_batch_size, seed=s.seed,
                                                strategy=ctx.strategy)
        v = np.asarray(v, np.float32)
        out = {"fooling_rate": float(attacks.fooling_rate(ctx.model_fn, ctx.x_test, v,
                                                          batch_size=s.batch_size,
                                                          strategy=ctx.strategy)),
               "eps": eps, "norm": s.tup_norm,
               "search_fooling_rate": _float_or_none(stats.get("fooling_rate")),
               "passes": int(stats.get("passes", 0))}
        report.arrays["uap"] = v
        ctx.done("uap", t0, out["fooling_rate"])
        return {"uap": out}

    def columns(self, report):
        return [(f"UAP {_radius_of(report, report['settings']['uap_eps'])} (fool.)",
                 _pct(report["uap"]["fooling_rate"] if report.get("uap") else None))]


_AA_ROBUST_GUESS = 0.1  # the share of images left for the attacks after the first


def _aa_n(ctx: Context) -> int:
    n = ctx.settings.aa_n
    return len(ctx.x_test) if n is None else min(int(n), len(ctx.x_test))


def aa_per_image_codes(broken_by: Sequence[str | None], attacks: Sequence[str]) -> dict:
    """AutoAttack's outcome per image, compact for report.json: ``{"names": [...], "codes":
    "..."}``, image i's outcome being ``names[int(codes[i])]``.

    ``broken_by`` is :func:`rat_tf.autoattack.autoattack`'s (the attack that broke each image,
    "clean" if misclassified, None if robust); ``attacks`` the sequence run, "clean" first or
    not. The names are "robust", "clean", then the attacks in order.
    """
    names = ["robust", "clean"] + [a for a in attacks if a != "clean"]
    if len(names) > 10:
        raise ValueError(f"at most 8 attacks have one-digit codes, got {list(attacks)}")
    code = {name: str(i) for i, name in enumerate(names)}
    return {"names": names, "codes": "".join(code["robust" if b is None else b]
                                             for b in broken_by)}


def aa_per_image(entry: Mapping) -> list[str]:
    """Per evaluated image, in test-set order (item i is test image i), what broke it under
    AutoAttack: "clean" (misclassified), an attack's name, or "robust"; ``entry`` is the
    report's ``autoattack`` entry (or its ``per_image``)."""
    per_image = entry.get("per_image", entry)
    names = per_image["names"]
    return [names[int(c)] for c in per_image["codes"]]


class _AutoAttack(Measure):
    """AutoAttack (APGD-CE, APGD-T, FAB-T, Square): worst case per image, with the breakdown."""

    name = "autoattack"

    def check(self, settings):
        autoattack.check_attacks(settings.aa_attacks, settings.aa_version, "linf")

    def _attacks(self, ctx):
        names = autoattack.check_attacks(ctx.settings.aa_attacks, ctx.settings.aa_version,
                                         "linf")
        if ctx.num_classes < 4 and ctx.settings.aa_attacks is None:
            names = [a for a in names if a != "apgd-t"]  # targeted DLR needs 4 classes
        return names

    def stages(self, ctx):
        # a guess until the run tells how many images the first attack left robust
        s, n = ctx.settings, _aa_n(ctx)
        kw = dict(steps=s.aa_steps, n_queries=s.aa_queries, batch_size=s.batch_size,
                  restarts=s.aa_restarts, n_target_classes=min(9, ctx.num_classes - 1),
                  replicas=ctx.strategy.num_replicas_in_sync)
        names = self._attacks(ctx)
        cost = autoattack.attack_cost(names[0], n, **kw) + sum(
            autoattack.attack_cost(a, math.ceil(n * _AA_ROBUST_GUESS), **kw) for a in names[1:])
        return [("autoattack", ctx.share(cost))]

    def run(self, ctx, report):
        s, n, t0 = ctx.settings, _aa_n(ctx), time.time()
        eps = s.resolved_aa_eps()
        out = autoattack.autoattack(
            ctx.model_fn, ctx.x_test[:n], ctx.y_test[:n], eps, attacks=self._attacks(ctx),
            seed=s.seed, batch_size=s.batch_size, steps=s.aa_steps, n_queries=s.aa_queries,
            restarts=s.aa_restarts, n_target_classes=min(9, ctx.num_classes - 1),
            strategy=ctx.strategy,
            progress=lambda done, total: ctx.progress("autoattack", ctx.share(done),
                                                      ctx.share(total)))
        broken = [b for b in out["broken_by"] if b not in (None, "clean")]
        result = {"eps": eps, "num_images": n, "robust_accuracy": float(out["robust"].mean()),
                  "after_each": out["robust_accuracy"],
                  "broken_by": {a: broken.count(a) for a in out["robust_accuracy"]
                                if a != "clean"},
                  "per_image": aa_per_image_codes(out["broken_by"], list(out["robust_accuracy"])),
                  "seconds": {a: round(t, 2) for a, t in out["seconds"].items()}}
        ctx.correct["autoattack"] = out["robust"]
        ctx.done("autoattack", t0, result["robust_accuracy"])
        return {"autoattack": result}

    def columns(self, report):
        aa = report.get("autoattack")
        if not aa:
            return [("AA", "-")]
        first = "" if aa["num_images"] >= report["num_test"] else f" (first {aa['num_images']})"
        return [(f"AA {_radius_of(report, aa['eps'])}{first}", _pct(aa["robust_accuracy"]))]


def noise_margin(a: float, b: float, n: int) -> float:
    """The least difference between two accuracies ``a`` and ``b`` on the same ``n`` images
    that the masking checks take as real: :data:`MASKING_MIN_IMAGES` images, or
    :data:`MASKING_SE` binomial standard errors at their mean accuracy, whichever is larger
    (a conservative bound: the two are measured on the same images, so their difference
    varies less)."""
    n = max(int(n), 1)
    p = min(max((float(a) + float(b)) / 2, 0.0), 1.0)
    return max(MASKING_MIN_IMAGES / n, MASKING_SE * math.sqrt(p * (1.0 - p) / n))


def _eps_key(accuracies: Mapping[str, float], eps: float) -> str | None:
    """The key of radius ``eps`` in a {radius: accuracy} dict of a report (None: not there)."""
    return next((k for k in accuracies if abs(float(k) - float(eps)) < 1e-6), None)


def _rising_fgsm(report: Mapping) -> list[str]:
    """FGSM accuracy above the accuracy at a smaller radius (clean: radius 0) beyond noise."""
    curve = sorted((float(e), float(a)) for e, a in report.get("fgsm_accuracy", {}).items())
    if report.get("clean_accuracy") is not None:
        curve.insert(0, (0.0, float(report["clean_accuracy"])))
    n, rise = report["num_test"], None
    for j in range(1, len(curve)):
        low_eps, low = min(curve[:j], key=lambda point: point[1])
        eps, acc = curve[j]
        margin = noise_margin(low, acc, n)
        if acc - low > margin + _ROUNDING and (rise is None or acc - low > rise[3] - rise[1]):
            rise = (low_eps, low, eps, acc, margin)
    if rise is None:
        return []
    low_eps, low, eps, acc, margin = rise
    where = "clean" if low_eps == 0 else f"FGSM {_radius_of(report, low_eps)}"
    return [f"FGSM accuracy rises with the radius: {_pct(acc)}% at {_radius_of(report, eps)} "
            f"against {_pct(low)}% {where}, {100 * (acc - low):.1f} points more on {n} images "
            f"(noise margin {100 * margin:.1f}): a larger step should not help, the gradient "
            f"at the image misleads one step (catastrophic overfitting)"]


def _fgsm_overstates(report: Mapping, share: float) -> list[str]:
    """FGSM far above PGD / AutoAttack on the same images while it costs almost no accuracy."""
    m = report.get("masking") or {}
    fallback = report.get("clean_accuracy")
    pairs = [("PGD", float(e), report.get("num_pgd", report["num_test"]),
              m.get("clean_on_pgd_images", fallback), report["pgd_fgsm_accuracy"][e], a)
             for e, a in report.get("pgd_accuracy", {}).items()
             if e in report.get("pgd_fgsm_accuracy", {})]
    aa = report.get("autoattack")
    if aa and m.get("fgsm_at_aa_eps") is not None:
        pairs.append(("AutoAttack", float(aa["eps"]), aa["num_images"],
                      m.get("clean_on_aa_images", fallback), m["fgsm_at_aa_eps"],
                      aa["robust_accuracy"]))
    flags = []
    for attack, eps, n, clean, fgsm, strong in pairs:
        if clean is None:
            continue
        gap = fgsm - strong
        if (gap > max(MASKING_MIN_GAP, noise_margin(fgsm, strong, n)) + _ROUNDING
                and clean - fgsm <= share * (clean - strong) + _ROUNDING):
            flags.append(
                f"FGSM at {_radius_of(report, eps)} leaves {_pct(fgsm)}% accuracy where "
                f"{attack} leaves {_pct(strong)}% on the same {n} images (clean "
                f"{_pct(clean)}%): FGSM changes accuracy by {100 * (fgsm - clean):+.1f} "
                f"points, {attack} by {100 * (strong - clean):+.1f}, so FGSM does under "
                f"{share:.0%} of {attack}'s harm: the model defeats the single step only "
                f"(catastrophic overfitting)")
    return flags


def _training_pgd(report: Mapping) -> tuple[str, float] | None:
    """(radius, held-out PGD accuracy) at the training radius of the report's training
    record, if the report has PGD there (L-inf training only)."""
    t = (report.get("masking") or {}).get("training")
    if not t or t.get("norm", "linf") != "linf":
        return None
    key = _eps_key(report.get("pgd_accuracy", {}), t["eps"])
    return None if key is None else (key, float(report["pgd_accuracy"][key]))


def _training_gap(report: Mapping, threshold: float) -> list[str]:
    """Training adversarial accuracy far above held-out PGD at the training radius."""
    pgd = _training_pgd(report)
    if pgd is None:
        return []
    t, (eps, heldout) = report["masking"]["training"], pgd
    n = report.get("num_pgd", report["num_test"])
    train = float(t["adversarial_accuracy"])
    if train - heldout <= max(threshold, noise_margin(train, heldout, n)) + _ROUNDING:
        return []
    return [f"Training adversarial accuracy ({t.get('method') or 'training'}, last epoch) "
            f"is {_pct(train)}% but PGD at the training radius {_radius_of(report, eps)} "
            f"leaves {_pct(heldout)}% of {n} held-out images, {100 * (train - heldout):.1f} "
            f"points less (more than {100 * threshold:.0f}): the training attack stopped "
            f"finding the adversarial examples PGD finds (catastrophic overfitting)"]


def masking_flags(report: Mapping) -> list[str]:
    """The signs of gradient masking in a report's figures, each a plain sentence with its
    numbers (empty: no sign). Reads what the measures put in the report, its ``masking``
    checks among them, and the thresholds in its ``settings``.

    - PGD at the radius of the whole pixel box leaves more than 1% accuracy; FGSM accuracy is
      more than 1 point below PGD's at a radius.
    - Square (gradient-free) breaks more than :data:`MASKING_SQUARE_SHARE` (2%, and more
      than 5 images) of the images the gradient attacks of AutoAttack left robust. On MNIST at
      0.3 (first 1,000 test images, docs/reproduction.md) it breaks 13 of 877 (1.5%) for the
      PGD-AT recipe's model and 38 of 818 (4.6%) for the FGSM-RS recipe's.
    - FGSM accuracy rises with the radius: accuracy at a radius exceeds the lowest accuracy
      at a smaller one (clean accuracy counts as radius 0) by more than
      :func:`noise_margin` (5 images, or 2 binomial standard errors). A catastrophically
      overfit FGSM-AT model on 500 MNIST test images: 92.4% at 0.05 up to 97.2% at 0.3.
    - FGSM overstates robustness: at a radius where PGD (or AutoAttack) was run, FGSM accuracy
      on the same images exceeds PGD's by more than :data:`MASKING_MIN_GAP` (30 points) *and*
      FGSM costs at most ``masking_fgsm_share`` (:data:`MASKING_FGSM_SHARE`, 10%) of the
      accuracy PGD costs: (clean - FGSM) <= share * (clean - PGD). The gap alone does not
      tell masking from a model robust to nothing. FGSM's share of AutoAttack's harm on MNIST
      at 0.3 (wide_mnist_cnn, README; FGSM / PGD / AA %): standard 21.6 / 0.0 / 0.0 (clean
      99.4: 78%), RAT 66.0 / 1.3 / 0.0 (33%), FGSM-AT 78.3 / 10.6 / 2.8 (21%: a weak model,
      not flagged), PGD-AT 72.3 / 44.6 / 17.4 (29%); mnist_cnn's four models 46% to 92%,
      CIFAR-10 FGSM-AT and PGD-AT at 8/255 71% and 66%. A collapsed FGSM-AT model, 97.2 / 0.0
      / 0.0, is under 3% whatever its clean accuracy; the collapsed tiny_cnn runs of the next
      rule are at 2%, below 0 and 8%. A plain gap threshold of 60 points
      would flag RAT and FGSM-AT above (66 and 75 points to AA) with PGD-AT at 55 close
      behind. The 30-point floor keeps a model that both attacks barely dent from being
      flagged for FGSM denting it less.
    - The training adversarial accuracy (``masking.training``: FGSM-AT / PGD-AT, the last
      epoch's accuracy on its adversarial training batches, from ``metrics.json``) exceeds
      held-out PGD accuracy at the training radius by more than ``masking_train_gap``
      (:data:`MASKING_TRAIN_GAP`, 50 points). The training attack is weaker than the report's
      PGD (FGSM-RS, or PGD from one start) and runs on training images, so honest runs show a
      gap too. tiny_cnn fine-tuned at 0.3 on 2,000 MNIST images (PGD-20 on 500 test images):
      FGSM-RS (step 1.25 eps) for 3 epochs 25.6% against PGD 0.8%, on 5,000 images 37.0%
      against 2.4% (35 points), PGD-AT 4.4% against 2.0%; FGSM-RS with step 2 eps after 15
      epochs 65.4% against 0.6% (FGSM 0.3 still 83.6%: partly collapsed, and only this rule
      says so), after 30 epochs 75.0 to 77.1% against 0.0% (three seeds, collapsed).

    Each difference must also exceed :func:`noise_margin` on the images it is measured on.
    """
    st = report.get("settings", {})
    m = report.get("masking") or {}
    flags = []
    box = m.get("box_accuracy")
    if box is not None and box > 0.01:
        flags.append(f"PGD at L-inf {m['box_radius']:g} (the whole pixel box) leaves "
                     f"{100 * box:.1f}% accuracy on {m['box_images']} images: gradients do not "
                     f"reach the decision (masking)")
    for eps, pgd in report.get("pgd_accuracy", {}).items():
        fgsm = report.get("pgd_fgsm_accuracy", {}).get(eps)
        if fgsm is not None and fgsm < pgd - 0.01:
            flags.append(f"FGSM accuracy {100 * fgsm:.1f}% is below PGD's "
                         f"{100 * pgd:.1f}% at {eps}: the iterative attack is weaker than "
                         f"one step (masking)")
    aa = report.get("autoattack")
    black = m.get("square_only_breaks", 0)
    if aa:
        left = black + round(aa["robust_accuracy"] * aa["num_images"])  # before Square
        if black > max(MASKING_MIN_IMAGES, MASKING_SQUARE_SHARE * left):
            flags.append(f"Square (gradient-free) broke {black} of the {left} images the "
                         f"gradient attacks left robust ({100 * black / max(left, 1):.1f}%, "
                         f"of {aa['num_images']}) (masking)")
    return (flags + _rising_fgsm(report)
            + _fgsm_overstates(report, float(st.get("masking_fgsm_share",
                                                    MASKING_FGSM_SHARE)))
            + _training_gap(report, float(st.get("masking_train_gap", MASKING_TRAIN_GAP))))


class _Masking(Measure):
    """Gradient-masking checks, said plainly (:func:`masking_flags`): a black-box attack
    beating the white-box ones, FGSM stronger than PGD at one radius, accuracy left at a
    radius covering the whole pixel box, FGSM accuracy rising with the radius, FGSM far above
    PGD and AutoAttack, and a training adversarial accuracy far above held-out PGD."""

    name = "masking"

    def stages(self, ctx):
        s = ctx.settings
        return [("masking", 2.0 * s.masking_steps * ctx.share(min(s.masking_n,
                                                                   len(ctx.x_test))))]

    def run(self, ctx, report):
        s, t0 = ctx.settings, time.time()
        n = min(s.masking_n, len(ctx.x_test))
        box = float(ops.PIXEL_RANGE[1] - ops.PIXEL_RANGE[0])
        step = ctx.step("box", lambda x, y, eps: attacks.pgd(
            ctx.model_fn, x, y, eps, steps=s.masking_steps, rand_init=True, seed=s.seed))
        box_acc = float(correct_on(step, ctx.x_test[:n], ctx.y_test[:n], s.batch_size,
                                   box).mean())
        checks: dict[str, Any] = {"box_radius": box, "box_accuracy": box_acc, "box_images": n}
        if report.get("pgd_accuracy"):  # clean accuracy on the images PGD ran on
            checks["clean_on_pgd_images"] = float(ctx.clean()[:ctx.n_pgd].mean())
        aa = report.get("autoattack")
        if aa:
            checks["square_only_breaks"] = aa["broken_by"].get("square", 0)
            fgsm = ctx.fgsm(aa["eps"], aa["num_images"]).mean()
            checks["clean_on_aa_images"] = float(ctx.clean()[:aa["num_images"]].mean())
            checks["fgsm_at_aa_eps"] = float(fgsm)
            checks["fgsm_to_aa_gap"] = float(fgsm - aa["robust_accuracy"])
        if ctx.training:
            checks["training"] = dict(ctx.training)
        checks["flags"] = masking_flags({**report, "masking": checks})
        ctx.done("masking", t0, float(len(checks["flags"])))
        return {"masking": checks}


for _measure in (_Clean(), _FGSM(), _PGD(), _PerClass(), _TUPGiven(), _TUPFresh(), _UAP(),
                 _AutoAttack(), _Masking()):
    register_measure(_measure)
MEASURES.freeze()


# --------------------------------------------------------------------------- the report
def robustness_report(model: keras.Model | str | Callable, x_test: np.ndarray,
                      y_test: np.ndarray, *, x_search: np.ndarray, y_search: np.ndarray,
                      perturbations: np.ndarray | str | None = None,
                      settings: EvalSettings | None = None,
                      class_names: Sequence[str] | None = None,
                      search_fingerprints: np.ndarray | None = None,
                      name: str | None = None, progress: bool = True,
                      strategy: tf.distribute.Strategy | None = None,
                      training: Mapping | None = None) -> Report:
    """Measure one model's robustness (docs/method.md, section 3) on held-out test images.

    ``perturbations`` are the targeted universal perturbations used in training (array
    [K,H,W,C] or an .npz from :func:`rat_tf.perturbation_files.save`); fresh ones are
    searched against this model on a balanced subset of ``x_search``. Raises ValueError if the
    test images overlap the search images (or the fingerprints stored with the perturbations).

    ``training``: the model's training metrics (what :func:`rat_tf.training.train` returns
    and writes to ``metrics.json``), whose final training adversarial accuracy the masking
    checks compare with held-out PGD; None: the ``metrics.json`` beside a model given as a
    path (:func:`training_metrics_path`), if there is one.

    Every measure runs under ``strategy`` (None: the current strategy): each global batch of
    ``settings.batch_size`` images (a multiple of the replicas) is split over the replicas and
    random starts are drawn for the whole batch, so the per-image results do not depend on the
    number of replicas. The universal searches all-reduce their sums over the replicas, adding
    them in another order than one device, so V can differ where a sum is near zero. Under
    MultiWorkerMirroredStrategy every worker must make the same call on the same arrays, and
    gets the whole report.
    """
    settings = settings or EvalSettings()
    strategy = strategy or tf.distribute.get_strategy()
    attacks.check_split(settings.batch_size, strategy, "batch_size")
    x_test = np.asarray(x_test, np.float32)
    y_test = np.asarray(y_test, np.int32)
    x_search = np.asarray(x_search, np.float32)
    y_search = np.asarray(y_search, np.int32)
    if x_test.ndim != 4 or y_test.shape != (len(x_test),):
        raise ValueError(f"expected x_test [N,H,W,C] and y_test [N], got {x_test.shape} and "
                         f"{y_test.shape}")
    if x_search.ndim != 4 or y_search.shape != (len(x_search),):
        raise ValueError(f"expected x_search [N,H,W,C] and y_search [N], got {x_search.shape} "
                         f"and {y_search.shape}")
    if x_search.shape[1:] != x_test.shape[1:]:
        raise ValueError(f"x_search images {x_search.shape[1:]} differ from x_test images "
                         f"{x_test.shape[1:]}")
    info = data.get_info(settings.dataset)
    if x_test.shape[1:] != tuple(info.image_shape):
        raise ValueError(f"images of shape {x_test.shape[1:]} are not {settings.dataset} images "
                         f"{tuple(info.image_shape)}: pass settings for their dataset")
    data.check_pixels(x_test, "x_test")
    data.check_pixels(x_search, "x_search")
    if settings.n_test is not None:
        x_test, y_test = x_test[:settings.n_test], y_test[:settings.n_test]

    given_v, given_meta = None, {}
    if isinstance(perturbations, (str, os.PathLike)):
        given_v, given_meta = perturbation_files.load(os.fspath(perturbations))
    elif perturbations is not None:
        given_v = np.asarray(perturbations, np.float32)
    if search_fingerprints is None and perturbation_files.FINGERPRINT_KEY in given_meta:
        search_fingerprints = given_meta[perturbation_files.FINGERPRINT_KEY]
    if given_v is not None and search_fingerprints is None:
        logging.warning("the given perturbations carry no fingerprints of the images they were "
                        "searched on: cannot check that the test images are not among them")
    lead = 0 if given_v is None else given_v.ndim - x_test.ndim + 1  # 1: per target, 2: source
    if given_v is not None and (lead not in (1, 2) or given_v.shape[lead:] != x_test.shape[1:]):
        raise ValueError(f"perturbations of shape {given_v.shape} do not fit images of shape "
                         f"{x_test.shape[1:]} ([K,...] per target or [K,K,...] per source)")

    num_classes = info.num_classes
    for what, labels in (("y_test", y_test), ("y_search", y_search)):
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"{what} labels must be in [0, {num_classes}), got range "
                             f"[{labels.min()}, {labels.max()}]")
    if given_v is not None and given_v.shape[:lead] != (num_classes,) * lead:
        raise ValueError(f"perturbations of shape {given_v.shape} do not hold one per class "
                         f"of {settings.dataset} ({num_classes} classes)")
    class_names = list(class_names) if class_names is not None else [
        str(c) for c in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")

    # Search on a balanced subset of x_search; refuse if any test image is among x_search.
    check_disjoint(x_test, x_search, search_fingerprints)
    counts = np.bincount(y_search, minlength=num_classes)
    if counts.min() == 0:
        raise ValueError(f"x_search holds no image of classes "
                         f"{np.flatnonzero(counts == 0).tolist()}: the search needs every class")
    n_per_class = min(settings.tup_n_per_class, int(counts.min()))
    xs, ys = data.balanced_subset(x_search, y_search, n_per_class, seed=settings.seed,
                                  num_classes=num_classes)

    model_fn, description = load_model_fn(model)
    source = "given"
    if training is None:
        source = training_metrics_path(model)
        training = read_training_metrics(source) if source else None
    n_pgd = len(x_test) if settings.n_pgd is None else min(int(settings.n_pgd), len(x_test))
    ctx = Context(model_fn=model_fn, x_test=x_test, y_test=y_test, x_search=xs, y_search=ys,
                  settings=settings, num_classes=num_classes, n_pgd=n_pgd,
                  perturbations=given_v, perturbation_meta=given_meta, strategy=strategy,
                  training=training_record(training, source) if training else None)
    units = [MEASURES[m] for m in settings.measures]
    stages = {stage: cost for unit in units for stage, cost in unit.stages(ctx)}
    bar = None
    if progress:
        print(f"evaluating {name or description}: {', '.join(stages)}", flush=True)
        # Progress in passes over the test set (a forward or a backward pass of every image,
        # roughly), so the ETA weighs PGD and the searches as they deserve; a stage may revise
        # its cost as it learns more (AutoAttack, as images fall). It shows the last result.
        bar = keras.utils.Progbar(sum(stages.values()), unit_name="pass",
                                  stateful_metrics=["stage", "result"])
    seconds: dict[str, float] = {}
    report = Report(name=name or description, model=description, dataset=settings.dataset,
                    num_test=int(len(x_test)), num_pgd=int(n_pgd), num_search=int(len(xs)),
                    test_fingerprint=hashlib.sha1("".join(data.fingerprints(x_test)).encode()
                                                  ).hexdigest()[:16],
                    settings=settings.to_dict(), class_names=class_names,
                    strategy=type(strategy).__name__,
                    num_replicas=int(strategy.num_replicas_in_sync))

    added: dict[str, float] = {}  # the cost of each stage already on the bar

    def progress_within(stage: str, done_cost: float, total_cost: float) -> None:
        if bar is not None and stage in stages:
            bar.target += total_cost - stages[stage]
            stages[stage] = total_cost
            bar.add(done_cost - added.get(stage, 0.0))
            added[stage] = done_cost

    def done(stage: str, t0: float, result: float | None = None) -> None:
        seconds[stage] = round(time.time() - t0, 2)
        logging.info("%s: stage %d/%d (%s) done in %.1fs%s", report["name"], len(seconds),
                     len(stages), stage, seconds[stage],
                     "" if result is None else f": {result:.4f}")
        if bar is not None:
            values = [("stage", len(seconds))] + ([] if result is None else [("result", result)])
            bar.add(stages.get(stage, 0.0) - added.get(stage, 0.0), values)

    ctx.done, ctx.progress = done, progress_within
    for unit in units:
        results = unit.run(ctx, report)
        report.update(results)
    report["seconds"] = seconds
    return report


def _jsonable_meta(meta: Mapping) -> dict:
    """The small, JSON-ready part of a perturbation file's metadata (no fingerprint lists)."""
    return {k: v for k, v in meta.items() if k != perturbation_files.FINGERPRINT_KEY
            and isinstance(v, (str, int, float, bool, type(None)))}


def _float_or_none(v: Any) -> float | None:
    return None if v is None else float(v)


def parse_models(spec: str | Sequence[str]) -> dict[str, str]:
    """``"name=path,name2=path2"`` (or a list of ``name=path``) as an ordered {name: path}."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: dict[str, str] = {}
    for item in (i.strip() for i in items):
        if not item:
            continue
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"model spec {item!r} is not name=path")
        if name.strip() in out:
            raise ValueError(f"model name {name.strip()!r} given twice")
        out[name.strip()] = path.strip()
    if not out:
        raise ValueError("no models given (expected name=path,...)")
    return out


def evaluate_models(models: Mapping[str, Any], *, dataset: str, data_dir: str | None = None,
                    data_source: str = "auto", settings: EvalSettings | None = None,
                    perturbations: np.ndarray | str | None = None,
                    out_dir: str | None = None, progress: bool = True,
                    strategy: tf.distribute.Strategy | None = None) -> dict[str, Report]:
    """Report on several models side by side: test split to measure, train split to search.

    ``models`` maps names to keras Models or paths; writes the report to ``out_dir`` if given.
    Every report runs under ``strategy`` (None: the current strategy), see
    :func:`robustness_report`.
    """
    info = data.get_info(dataset)
    settings = settings or EvalSettings.for_dataset(dataset)
    if settings.dataset != dataset:
        raise ValueError(f"evaluation settings are for {settings.dataset!r}, the data is "
                         f"{dataset!r}: use EvalSettings.for_dataset({dataset!r}, ...)")
    x_test, y_test = data.load_arrays(dataset, "test", data_source, data_dir)
    x_train, y_train = data.load_arrays(dataset, "train", data_source, data_dir)
    reports: dict[str, Report] = {}
    for name, model in models.items():
        logging.info("evaluating %s (%s)", name, model if isinstance(model, str) else "model")
        reports[name] = robustness_report(
            model, x_test, y_test, x_search=x_train, y_search=y_train,
            perturbations=perturbations, settings=settings, class_names=info.class_names,
            name=name, progress=progress, strategy=strategy)
    if out_dir:
        write_report(reports, out_dir, title=f"Robustness report: {dataset}")
    return reports


# --------------------------------------------------------------------------- output
def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _radius(eps: float | str, dataset: str) -> str:
    """A radius for a table header: k/d for a dataset with a radius denominator d (k/255 on
    CIFAR-10), plain decimals otherwise."""
    eps, d = float(eps), data.get_info(dataset).radius_denominator
    if d and abs(eps * d - round(eps * d)) < 1e-4:
        return f"{round(eps * d)}/{d}"
    return f"{eps:g}"


def markdown_table(reports: Mapping[str, Mapping]) -> str:
    """A Markdown table with one row per model and the columns of every measure (in %)."""
    if not reports:
        raise ValueError("no reports to tabulate")
    cells = []
    for r in reports.values():
        row: dict[str, str] = {}
        for m in r["settings"].get("measures", DEFAULT_MEASURES):
            if m in MEASURES:
                row.update(MEASURES[m].columns(r))
        cells.append(row)
    head = list(dict.fromkeys(h for row in cells for h in row))
    lines = ["| " + " | ".join(["model"] + head) + " |", "|" + "---|" * (len(head) + 1)]
    for name, row in zip(reports, cells):
        lines.append("| " + " | ".join([name] + [row.get(h, "-") for h in head]) + " |")
    return "\n".join(lines) + "\n"


def _class_table(reports: Mapping[str, Mapping]) -> str:
    first = next(iter(reports.values()))
    names = first["class_names"]
    head = ["model", "measure"] + list(names)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in reports.items():
        pc = r.get("per_class")
        if pc:
            lines.append("| " + " | ".join([name, "clean acc"] + [_pct(v) for v in pc["clean"]])
                         + " |")
            lines.append("| " + " | ".join(
                [name, f"FGSM {_radius(pc['fgsm_eps'], r['dataset'])} acc"]
                + [_pct(v) for v in pc["fgsm"]]) + " |")
        if r.get("tup_fresh"):
            lines.append("| " + " | ".join([name, "TUP fresh succ. (target)"]
                                           + [_pct(v) for v in r["tup_fresh"]["success_rate"]])
                         + " |")
        if r.get("tup_given"):
            lines.append("| " + " | ".join([name, "TUP given succ. (target)"]
                                           + [_pct(v) for v in r["tup_given"]["success_rate"]])
                         + " |")
    return "\n".join(lines) + "\n"


def _pgd_fgsm(reports: Mapping[str, Mapping]) -> str:
    """FGSM accuracy at the PGD radii on the PGD images, per model, for the report's text."""
    return "; ".join(f"{name} " + ", ".join(f"{_radius(e, r['dataset'])} {_pct(a)}"
                                            for e, a in r.get("pgd_fgsm_accuracy", {}).items())
                     for name, r in reports.items())


def _autoattack_section(reports: Mapping[str, Mapping]) -> str:
    """AutoAttack's breakdown: robust accuracy after each attack, per model."""
    rows = [(name, r["autoattack"]) for name, r in reports.items() if r.get("autoattack")]
    if not rows:
        return ""
    attacks_run = list(dict.fromkeys(a for _, aa in rows for a in aa["after_each"]))
    head = ["model", "images"] + [f"after {a}" for a in attacks_run]
    radius = _radius(rows[0][1]["eps"], next(iter(reports.values()))["dataset"])
    lines = ["\n## AutoAttack\n",
             f"Robust accuracy (%) at L-inf {radius} "
             f"after each attack of the sequence, each run only on the images still robust; "
             f"the last column is the AA figure (worst case per image). report.json keeps "
             f"what broke each image (`autoattack.per_image`, read by "
             f"`rat_tf.evaluation.aa_per_image`).\n",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, aa in rows:
        lines.append("| " + " | ".join([name, str(aa["num_images"])] + [
            _pct(aa["after_each"].get(a)) for a in attacks_run]) + " |")
    return "\n".join(lines) + "\n"


def _masking_facts(r: Mapping) -> str:
    """What the masking checks measured of one report, for its line in report.md."""
    m = r["masking"]
    facts = [f"PGD at L-inf {m['box_radius']:g} (the whole pixel box): "
             f"{_pct(m['box_accuracy'])}% accuracy on {m['box_images']} images"]
    if m.get("fgsm_to_aa_gap") is not None:
        facts.append(f"FGSM minus AA accuracy at the AA radius: "
                     f"{100 * m['fgsm_to_aa_gap']:.1f} points")
    t = m.get("training")
    if t:
        pgd = _training_pgd(r)
        facts.append(f"training adversarial accuracy ({t.get('method') or 'training'}, "
                     f"{t['norm']} {_radius_of(r, t['eps'])}, last epoch) "
                     f"{_pct(t['adversarial_accuracy'])}%, "
                     + (f"held-out PGD there {_pct(pgd[1])}%" if pgd else
                        "not compared: the report has no L-inf PGD at its radius"))
    return "; ".join(facts)


def _masking_section(reports: Mapping[str, Mapping]) -> str:
    """The gradient-masking checks, said plainly, per model: each flag on its own line, or
    that there is no sign of masking."""
    rows = [(name, r) for name, r in reports.items() if r.get("masking")]
    if not rows:
        return ""
    lines = ["\n## Gradient-masking checks\n"]
    for name, r in rows:
        flags = r["masking"]["flags"]
        if not flags:
            lines.append(f"- **{name}**: no sign of gradient masking. ({_masking_facts(r)}.)")
            continue
        lines.append(f"- **{name}**: {len(flags)} sign{'s' * (len(flags) > 1)} of gradient "
                     f"masking ({_masking_facts(r)}):")
        lines += [f"  - {flag}." for flag in flags]
    return "\n".join(lines) + "\n"


def report_markdown(reports: Mapping[str, Mapping], title: str = "Robustness report") -> str:
    """The whole report.md: main table, per-class table and the settings."""
    first = next(iter(reports.values()))
    st = first["settings"]
    parts = [f"# {title}\n",
             f"{first['num_test']} held-out test images ({first['dataset']}); universal "
             f"perturbations searched on {first['num_search']} other images. Accuracies and "
             f"TUP success / UAP fooling rates in %. TUP: mean over targets of the fraction of "
             f"images (label != target) sent to the target; 'given' = the perturbations used "
             f"in training, 'fresh' = searched again against each model."
             + (f" PGD runs on the first {first['num_pgd']} of the test images (FGSM on those "
                f"same images: {_pgd_fgsm(reports)})."
                if first.get("num_pgd", first["num_test"]) < first["num_test"] else "") + "\n",
             markdown_table(reports), _autoattack_section(reports), _masking_section(reports),
             "\n## Per class\n", _class_table(reports),
             "\n## Settings\n", "\n".join(f"- {k}: {json.dumps(v)}" for k, v in st.items())
             + "\n"]
    return "\n".join(parts)


def accuracy_figure(reports: Mapping[str, Mapping], path: str) -> str | None:
    """Write the PNG of FGSM accuracy against radius (lines) with PGD and AutoAttack
    (markers), one colour per model; return its path (None: no accuracy to draw)."""
    curves, points = {}, {}
    for name, r in reports.items():
        aa = r.get("autoattack")
        points[name] = {"PGD": [(float(e), a) for e, a in r.get("pgd_accuracy", {}).items()],
                        "AA": [(aa["eps"], aa["robust_accuracy"])] if aa else []}
        curve = {0.0: r["clean_accuracy"]} if "clean_accuracy" in r else {}
        curve.update({float(e): a for e, a in r.get("fgsm_accuracy", {}).items()})
        if curve:
            curves[name] = curve
    if not curves:
        return None
    return plots.accuracy_vs_radius(curves, path, points=points,
                                    title="FGSM accuracy (lines), PGD and AA (markers)")


def write_report(reports: Mapping[str, Mapping], out_dir: str,
                 title: str = "Robustness report", extra_markdown: str = "",
                 save_arrays: bool = True) -> dict[str, str]:
    """Write report.json, report.md and PNG figures for models side by side; return the paths.

    ``extra_markdown`` is appended to report.md (e.g. a training-cost table); with
    ``save_arrays`` the perturbations found are saved as perturbations_<model>.npz.
    """
    if not reports:
        raise ValueError("no reports to write")
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "report.json"),
             "markdown": os.path.join(out_dir, "report.md")}
    files.write_json(paths["json"], {name: dict(r) for name, r in reports.items()}, indent=1)
    files.write_bytes(paths["markdown"],
                      (report_markdown(reports, title) + extra_markdown).encode(), ".md")
    figure = accuracy_figure(reports, os.path.join(out_dir, "accuracy_vs_radius.png"))
    if figure:
        paths["accuracy_vs_radius"] = figure
    rows, labels = [], []
    for name, r in reports.items():
        arrays = getattr(r, "arrays", {})
        given = arrays.get("tup_given")
        label = "V of training" if len(reports) > 1 else f"{name}: given"
        if given is not None and given.ndim == 5:  # per source: show the mean over sources
            given = _by_target(given).sum(1) / max(1, given.shape[0] - 1)
            label += " (mean over sources)"
        if given is not None and not any(np.array_equal(given, x) for x in rows):
            rows.append(given)
            labels.append(label)
        if arrays.get("tup_fresh") is not None:
            rows.append(arrays["tup_fresh"])
            labels.append(f"{name}: fresh")
        if arrays and save_arrays:
            files.atomic_write(os.path.join(out_dir, f"perturbations_{_safe(name)}.npz"),
                               lambda p, a=arrays: np.savez_compressed(p, **a), ".npz")
    if rows:
        first = next(iter(reports.values()))
        paths["perturbations"] = plots.perturbation_grid(
            rows, os.path.join(out_dir, "perturbations.png"), titles=first["class_names"],
            row_labels=labels, dpi=80 if len(rows) <= 2 else 64)
    logging.info("wrote report to %s", out_dir)
    return paths


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
