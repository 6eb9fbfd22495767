"""Robustness reports: clean, FGSM sweep, PGD, targeted and untargeted universal perturbations.

The protocol of METHOD.md section 3. Every number is measured on held-out test images; the
universal perturbations are searched on *other* images (``x_search``, e.g. training images)
and :func:`robustness_report` refuses to run when the two sets share an image. A report is a
JSON-ready dict that also records every setting; :func:`write_report` turns several reports
(models side by side) into ``report.json``, ``report.md`` and PNG figures.
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

from rat_tf import attacks, data, files, models, ops, plots

ModelFn = Callable[[tf.Tensor], tf.Tensor]

# Per-dataset defaults: FGSM sweep, PGD radii, per-class FGSM radius, TUP radius (the RAT
# radius of rat_tf.training.DEFAULT_EPS, so "given" and "fresh" perturbations are comparable).
_DEFAULTS = {
    "mnist": dict(fgsm_eps=(0.05, 0.1, 0.2, 0.3), pgd_eps=(0.1, 0.3), class_eps=0.1,
                  tup_eps=0.3),
    "fashion_mnist": dict(fgsm_eps=(0.05, 0.1, 0.2, 0.3), pgd_eps=(0.1,), class_eps=0.1,
                          tup_eps=0.1),
    "cifar10": dict(fgsm_eps=(2 / 255, 4 / 255, 8 / 255), pgd_eps=(8 / 255,), class_eps=8 / 255,
                    tup_eps=8 / 255),
}


@dataclasses.dataclass
class EvalSettings:
    """Attack settings of a robustness report; :meth:`for_dataset` fills per-dataset defaults.

    All radii are L-inf except the universal ones, which use ``tup_norm``. ``class_eps`` is the
    FGSM radius of the per-class breakdown; ``uap_eps`` (None: ``tup_eps``) the radius of the
    untargeted universal perturbation; ``n_test`` limits the test images (None: all); PGD, the
    costly attack, runs on the first ``n_pgd`` of them (None: all), and the report then also
    holds FGSM at the PGD radii on those same images (``pgd_fgsm_accuracy``).
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
    seed: int = 0

    @classmethod
    def for_dataset(cls, dataset: str, **overrides: Any) -> "EvalSettings":
        """Settings with the defaults of ``dataset``, then the overrides that are not None."""
        data.get_info(dataset)
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown evaluation settings {sorted(unknown)}")
        base = dict(_DEFAULTS[dataset], dataset=dataset)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def __post_init__(self) -> None:
        for name in ("fgsm_eps", "pgd_eps"):
            radii = tuple(float(e) for e in np.atleast_1d(getattr(self, name)))
            if not radii or not all(math.isfinite(e) and e > 0 for e in radii):
                raise ValueError(f"{name} must be a non-empty list of positive radii, got "
                                 f"{getattr(self, name)}")
            setattr(self, name, radii)
        for name in ("class_eps", "tup_eps", "uap_eps", "pgd_step_size", "tup_step_size"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(float(value)) and float(value) > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value}")
        for name in ("pgd_steps", "pgd_restarts", "tup_passes", "tup_n_per_class",
                     "uap_passes", "batch_size", "tup_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        ops.check_norm(self.tup_norm)
        if self.tup_method not in attacks.TU_METHODS:
            raise ValueError(f"tup_method must be one of {attacks.TU_METHODS}, got "
                             f"{self.tup_method!r}")
        if not 0.0 <= self.tup_delta <= 1.0:
            raise ValueError(f"tup_delta must be in [0, 1], got {self.tup_delta}")
        for name in ("n_test", "n_pgd"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        """The settings as a JSON-ready dict (with the resolved UAP radius)."""
        d = dataclasses.asdict(self)
        d["fgsm_eps"], d["pgd_eps"] = list(self.fgsm_eps), list(self.pgd_eps)
        d["uap_eps"] = float(self.uap_eps or self.tup_eps)
        return d


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


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    if len(a) == size:
        return a
    return np.concatenate([a, np.zeros((size - len(a),) + a.shape[1:], a.dtype)])


def correct_fn(model_fn: ModelFn, attack: Callable | None = None) -> Callable:
    """A compiled (x, y, eps) -> correct [B] of a fixed-size batch, attacked if ``attack``.

    ``eps`` is a tensor argument, so one trace serves every radius of a sweep.
    """
    @tf.function
    def step(xb, yb, eps):
        if attack is not None:
            xb = attack(xb, yb, eps)
        return tf.equal(tf.argmax(model_fn(xb), -1, output_type=tf.int32), yb)

    return step


def correct_on(step: Callable, x: np.ndarray, y: np.ndarray, batch_size: int,
             eps: float = 0.0) -> np.ndarray:
    """Boolean [N]: whether each image is classified correctly by compiled ``step``."""
    out = []
    for start in range(0, len(x), batch_size):
        n = min(batch_size, len(x) - start)
        ok = step(tf.constant(_pad(x[start:start + n], batch_size)),
                  tf.constant(_pad(y[start:start + n], batch_size)), tf.constant(eps, tf.float32))
        out.append(ok.numpy()[:n])
    return np.concatenate(out) if out else np.zeros([0], bool)


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


# --------------------------------------------------------------------------- the report
def robustness_report(model: keras.Model | str | Callable, x_test: np.ndarray,
                      y_test: np.ndarray, *, x_search: np.ndarray, y_search: np.ndarray,
                      perturbations: np.ndarray | str | None = None,
                      settings: EvalSettings | None = None,
                      class_names: Sequence[str] | None = None,
                      search_fingerprints: np.ndarray | None = None,
                      name: str | None = None, progress: bool = True) -> Report:
    """Measure one model's robustness (METHOD.md section 3) on held-out test images.

    ``perturbations`` are the targeted universal perturbations used in training (array
    [K,H,W,C] or an .npz from :func:`rat_tf.attacks.save_perturbations`); fresh ones are
    searched against this model on a balanced subset of ``x_search``. Raises ValueError if the
    test images overlap the search images (or the fingerprints stored with the perturbations).
    """
    settings = settings or EvalSettings()
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
        given_v, given_meta = attacks.load_perturbations(os.fspath(perturbations))
    elif perturbations is not None:
        given_v = np.asarray(perturbations, np.float32)
    if search_fingerprints is None and attacks.FINGERPRINT_KEY in given_meta:
        search_fingerprints = given_meta[attacks.FINGERPRINT_KEY]
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
    s, bs = settings, settings.batch_size
    stages = (["clean"] + [f"fgsm {e:g}" for e in s.fgsm_eps] + [f"pgd {e:g}" for e in s.pgd_eps]
              + (["tup given"] if given_v is not None else []) + ["tup fresh", "uap"])
    # Progress in units of cost (forward+backward passes over the test set, roughly), so the
    # ETA weighs PGD and the searches as they deserve; the bar shows the last stage's result.
    n_pgd_share = (len(x_test) if s.n_pgd is None else min(int(s.n_pgd), len(x_test))) / max(
        1, len(x_test))
    search_share = len(xs) * num_classes / max(1, len(x_test))
    cost = {"clean": 1.0, "tup given": float(num_classes), "uap": 2.0 * s.uap_passes *
            len(xs) / max(1, len(x_test)) + 2.0, "tup fresh": 2.0 * s.tup_passes * search_share
            + num_classes}
    cost.update({f"fgsm {e:g}": 3.0 for e in s.fgsm_eps})
    cost.update({f"pgd {e:g}": 2.0 * s.pgd_steps * s.pgd_restarts * n_pgd_share
                 for e in s.pgd_eps})
    bar = None
    if progress:
        print(f"evaluating {name or description}: {', '.join(stages)}", flush=True)
        bar = keras.utils.Progbar(sum(cost[st] for st in stages), unit_name="cost",
                                  stateful_metrics=["stage", "result"])
    seconds: dict[str, float] = {}
    n_pgd = len(x_test) if s.n_pgd is None else min(int(s.n_pgd), len(x_test))
    report = Report(name=name or description, model=description, dataset=s.dataset,
                    num_test=int(len(x_test)), num_pgd=int(n_pgd), num_search=int(len(xs)),
                    test_fingerprint=hashlib.sha1("".join(data.fingerprints(x_test)).encode()
                                                  ).hexdigest()[:16],
                    settings=s.to_dict(), class_names=class_names)

    def done(stage: str, t0: float, result: float | None = None) -> None:
        seconds[stage] = round(time.time() - t0, 2)
        logging.info("%s: stage %d/%d (%s) done in %.1fs%s", report["name"], len(seconds),
                     len(stages), stage, seconds[stage],
                     "" if result is None else f": {result:.4f}")
        if bar is not None:
            values = [("stage", len(seconds))] + ([] if result is None else [("result", result)])
            bar.add(cost[stage], values)

    clean_step = correct_fn(model_fn)
    fgsm_step = correct_fn(model_fn, lambda x, y, eps: attacks.fgsm(model_fn, x, y, eps))
    pgd_step = correct_fn(model_fn, lambda x, y, eps: attacks.pgd(
        model_fn, x, y, eps, step_size=attacks.pgd_step_size(eps, s.pgd_steps, s.pgd_step_size),
        steps=s.pgd_steps, rand_init=True, restarts=s.pgd_restarts, seed=s.seed))

    t0 = time.time()
    clean = correct_on(clean_step, x_test, y_test, bs)
    report["clean_accuracy"] = float(clean.mean())
    done("clean", t0, report["clean_accuracy"])

    fgsm_ok: dict[str, np.ndarray] = {}
    for eps in s.fgsm_eps:
        t0 = time.time()
        fgsm_ok[f"{eps:g}"] = correct_on(fgsm_step, x_test, y_test, bs, eps)
        done(f"fgsm {eps:g}", t0, float(fgsm_ok[f"{eps:g}"].mean()))

    def fgsm_at(eps: float, n: int) -> np.ndarray:
        """FGSM correctness on the first n test images (from the sweep when it has eps)."""
        if f"{eps:g}" in fgsm_ok:
            return fgsm_ok[f"{eps:g}"][:n]
        return correct_on(fgsm_step, x_test[:n], y_test[:n], bs, eps)

    report["fgsm_accuracy"] = {k: float(ok.mean()) for k, ok in fgsm_ok.items()}
    fgsm_class = fgsm_at(s.class_eps, len(x_test))

    pgd_acc, pgd_fgsm = {}, {}
    for eps in s.pgd_eps:
        t0 = time.time()
        pgd_acc[f"{eps:g}"] = float(
            correct_on(pgd_step, x_test[:n_pgd], y_test[:n_pgd], bs, eps).mean())
        pgd_fgsm[f"{eps:g}"] = float(fgsm_at(eps, n_pgd).mean())
        done(f"pgd {eps:g}", t0, pgd_acc[f"{eps:g}"])
    report["pgd_accuracy"] = pgd_acc
    report["pgd_fgsm_accuracy"] = pgd_fgsm  # FGSM at the PGD radii on the PGD images

    report["per_class"] = {
        "count": np.bincount(y_test, minlength=num_classes).astype(int).tolist(),
        "clean": _per_class(clean, y_test, num_classes),
        "fgsm": _per_class(fgsm_class, y_test, num_classes), "fgsm_eps": float(s.class_eps)}

    report["tup_given"] = None
    if given_v is not None:
        t0 = time.time()
        rates = np.asarray(attacks.targeted_success_rate(model_fn, x_test, y_test, given_v,
                                                         batch_size=bs * 2), np.float64)
        report["tup_given"] = {"success_rate": files.floats(rates),
                               "mean": _mean_over_targets(rates, given_v),
                               "linf": _linf(given_v), "meta": _jsonable_meta(given_meta)}
        report.arrays["tup_given"] = given_v
        done("tup given", t0, report["tup_given"]["mean"])

    t0 = time.time()
    fresh_v, stats = attacks.targeted_universal(
        model_fn, xs, ys, s.tup_eps, num_classes=num_classes, norm=s.tup_norm, method=s.tup_method,
        delta=s.tup_delta, max_passes=s.tup_passes, step_size=s.tup_step_size,
        batch_size=s.tup_batch_size, seed=s.seed)
    fresh_v = np.asarray(fresh_v, np.float32)
    rates = np.asarray(attacks.targeted_success_rate(model_fn, x_test, y_test, fresh_v,
                                                     batch_size=bs * 2), np.float64)
    report["tup_fresh"] = {
        "success_rate": files.floats(rates), "mean": _mean_over_targets(rates, fresh_v),
        "search_success_rate": files.floats(stats.get("success_rate", [])),
        "passes": int(stats.get("passes", 0)), "linf": _linf(fresh_v),
        "norm": files.floats(stats.get("norm", []))}
    report.arrays["tup_fresh"] = fresh_v
    done("tup fresh", t0, report["tup_fresh"]["mean"])

    t0 = time.time()
    uap_eps = float(s.uap_eps or s.tup_eps)
    v, ustats = attacks.untargeted_universal(model_fn, xs, ys, uap_eps, norm=s.tup_norm,
                                             max_passes=s.uap_passes,
                                             batch_size=s.tup_batch_size, seed=s.seed)
    v = np.asarray(v, np.float32)
    report["uap"] = {"fooling_rate": float(attacks.fooling_rate(model_fn, x_test, v,
                                                                batch_size=bs)),
                     "eps": uap_eps, "norm": s.tup_norm,
                     "search_fooling_rate": _float_or_none(ustats.get("fooling_rate")),
                     "passes": int(ustats.get("passes", 0))}
    report.arrays["uap"] = v
    done("uap", t0, report["uap"]["fooling_rate"])
    report["seconds"] = seconds
    return report


def _jsonable_meta(meta: Mapping) -> dict:
    """The small, JSON-ready part of a perturbation file's metadata (no fingerprint lists)."""
    return {k: v for k, v in meta.items() if k != attacks.FINGERPRINT_KEY
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
                    out_dir: str | None = None, progress: bool = True) -> dict[str, Report]:
    """Report on several models side by side: test split to measure, train split to search.

    ``models`` maps names to keras Models or paths; writes the report to ``out_dir`` if given.
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
            name=name, progress=progress)
    if out_dir:
        write_report(reports, out_dir, title=f"Robustness report: {dataset}")
    return reports


# --------------------------------------------------------------------------- output
def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _radius(eps: float | str, dataset: str) -> str:
    """A radius for a table header: k/255 on CIFAR-10, plain decimals otherwise."""
    eps = float(eps)
    if dataset == "cifar10" and abs(eps * 255 - round(eps * 255)) < 1e-4:
        return f"{round(eps * 255)}/255"
    return f"{eps:g}"


def markdown_table(reports: Mapping[str, Mapping]) -> str:
    """A Markdown table with one row per model: clean, FGSM sweep, PGD, TUP and UAP (in %)."""
    if not reports:
        raise ValueError("no reports to tabulate")
    first = next(iter(reports.values()))
    st = first["settings"]
    radii = list(first["fgsm_accuracy"])
    pgd_radii = list(first["pgd_accuracy"])
    steps = f"PGD-{st['pgd_steps']}x{st['pgd_restarts']}"
    if first.get("num_pgd", first["num_test"]) < first["num_test"]:
        steps += f" (first {first['num_pgd']})"
    ds = st["dataset"]
    tup = _radius(st["tup_eps"], ds) + ("" if st["tup_norm"] == "linf" else f" {st['tup_norm']}")
    head = (["model", "clean"] + [f"FGSM {_radius(r, ds)}" for r in radii]
            + [f"{steps} {_radius(r, ds)}" for r in pgd_radii]
            + [f"TUP given {tup} (succ.)", f"TUP fresh {tup} (succ.)",
               f"UAP {_radius(st['uap_eps'], ds)} (fool.)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in reports.items():
        given = r.get("tup_given")
        row = ([name, _pct(r["clean_accuracy"])]
               + [_pct(r["fgsm_accuracy"].get(e)) for e in radii]
               + [_pct(r["pgd_accuracy"].get(e)) for e in pgd_radii]
               + [_pct(given["mean"] if given else None), _pct(r["tup_fresh"]["mean"]),
                  _pct(r["uap"]["fooling_rate"])])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _class_table(reports: Mapping[str, Mapping]) -> str:
    first = next(iter(reports.values()))
    names = first["class_names"]
    head = ["model", "measure"] + list(names)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in reports.items():
        pc = r["per_class"]
        lines.append("| " + " | ".join([name, "clean acc"] + [_pct(v) for v in pc["clean"]])
                     + " |")
        lines.append("| " + " | ".join([name, f"FGSM {_radius(pc['fgsm_eps'], r['dataset'])} acc"]
                                       + [_pct(v) for v in pc["fgsm"]]) + " |")
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
                                            for e, a in r["pgd_fgsm_accuracy"].items())
                     for name, r in reports.items())


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
             markdown_table(reports), "\n## Per class\n", _class_table(reports),
             "\n## Settings\n", "\n".join(f"- {k}: {json.dumps(v)}" for k, v in st.items())
             + "\n"]
    return "\n".join(parts)


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
    curves = {}
    for name, r in reports.items():
        curve = {0.0: r["clean_accuracy"]}
        curve.update({float(e): a for e, a in r["fgsm_accuracy"].items()})
        curves[name] = curve
    paths["accuracy_vs_radius"] = plots.accuracy_vs_radius(
        curves, os.path.join(out_dir, "accuracy_vs_radius.png"))
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
