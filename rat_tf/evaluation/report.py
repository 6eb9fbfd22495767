"""Robustness reports: :func:`robustness_report` of one model, :func:`evaluate_models` of
several, and :func:`write_report` (report.json, report.md and figures)."""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any, Callable, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from rat_tf import attacks, data, files, perturbation_files, plots
from rat_tf.evaluation.settings import EvalSettings, Report
from rat_tf.evaluation.common import (by_target, check_disjoint, load_model_fn,
                                      read_training_metrics, training_metrics_path, training_record)
from rat_tf.evaluation.measures import Context, MEASURES
from rat_tf.evaluation.render import accuracy_figure, report_markdown


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
            given = by_target(given).sum(1) / max(1, given.shape[0] - 1)
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
