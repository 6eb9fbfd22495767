"""Keras callbacks of rat_tf: V refresh, NaN stop, robustness monitor, early stopping on
held-out PGD accuracy, history, epoch timer."""

from __future__ import annotations

import csv
import json
import math
import os
import time

import keras
import numpy as np
from absl import logging

from rat_tf import attacks, evaluation, files, models, trainers


class RefreshPerturbations(keras.callbacks.Callback):
    """Every ``every`` epochs, search V again against the current weights (RAT refresh mode).

    The search starts from zero, or with ``warm_start`` from the model's current V (so a few
    passes continue it instead of redoing it). Place it before ``BackupAndRestore`` in the
    callback list so the backup holds the new V.
    """

    searches_perturbations = True  # RATModel.fit needs no V before the first epoch

    def __init__(self, x: np.ndarray, y: np.ndarray, every: int,
                 settings: attacks.SearchSettings, *, seed: int = 0, progress: bool = False,
                 warm_start: bool = False):
        super().__init__()
        if int(every) < 1:
            raise ValueError(f"refresh interval must be >= 1 epoch, got {every}")
        self.x, self.y, self.every, self.settings = x, y, int(every), settings
        self.seed, self.progress, self.warm_start = seed, progress, bool(warm_start)
        self.history: list[dict] = []
        self._cache: dict = {}  # the compiled search, traced once and reused every refresh

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if (epoch + 1) % self.every:
            return
        if not isinstance(self.model, trainers.RATModel):
            raise ValueError("RefreshPerturbations needs a RATModel")
        start = time.time()
        logging.info("epoch %d: refreshing V against the current weights (%d images, from %s)",
                     epoch + 1, len(self.x), "the current V" if self.warm_start else "zero")
        search = {**self.settings.kwargs(), "per_source": self.model.per_source}
        v, stats = attacks.targeted_universal(
            self.model, self.x, self.y, num_classes=self.model.num_classes,
            progress=self.progress, seed=self.seed + epoch + 1,
            strategy=self.model.distribute_strategy, cache=self._cache,
            clip_values=self.model.clip_values,
            init=self.model.get_perturbations() if self.warm_start else None, **search)
        self.model.set_perturbations(v)
        rate = attacks.mean_success_rate(stats)
        self.history.append({"epoch": epoch + 1, "success_rate": rate,
                             "seconds": time.time() - start})
        logging.info("epoch %d: refreshed V (mean targeted success %.3f, %.1fs)", epoch + 1,
                     rate, time.time() - start)
        if logs is not None:
            logs["refresh_success_rate"] = rate


class RaiseOnNaN(keras.callbacks.Callback):
    """Stop training with a clear ``FloatingPointError`` as soon as the loss is NaN or inf.

    Keras' ``TerminateOnNaN`` only stops ``fit``, which then returns normally: a run would
    write its diverged model as if it had finished.
    """

    def __init__(self):
        super().__init__()
        self._epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise FloatingPointError(
                f"NaN loss: training loss became {float(loss)} at epoch {self._epoch + 1}, "
                f"batch {batch + 1}; training diverged (lower the learning rate, check the "
                f"data and the precision policy)")


class RobustnessMonitor(keras.callbacks.Callback):
    """After every epoch, the robustness of the classifier on held-out images (logged).

    Measures clean accuracy and FGSM accuracy at ``eps``; with ``pgd_eps``, PGD accuracy
    (``pgd_steps``, one random start); with ``tup_eps``, the mean success rate on ``x`` of
    targeted universal perturbations searched afresh against the current classifier on
    ``tup_images`` (x, y; ``tup_passes`` passes). ``train_seconds`` counts every second since
    ``fit`` began (V searches by other callbacks included) except this monitor's own. Stops
    training once FGSM accuracy reaches ``target`` with clean accuracy at least
    ``clean_target``, or after ``time_limit`` seconds of training; ``records`` holds one dict
    per epoch.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, eps: float, *, norm: str = "linf",
                 target: float | None = None, clean_target: float = 0.0,
                 time_limit: float | None = None, batch_size: int = 500,
                 pgd_eps: float | None = None, pgd_steps: int = 20,
                 tup_eps: float | None = None,
                 tup_images: tuple[np.ndarray, np.ndarray] | None = None,
                 tup_passes: int = 3):
        super().__init__()
        if tup_eps is not None and tup_images is None:
            raise ValueError("tup_eps needs tup_images (x, y) to search the perturbations on")
        self.x, self.y, self.eps, self.norm = x, y, float(eps), norm
        self.target, self.clean_target = target, float(clean_target)
        self.time_limit, self.batch_size = time_limit, batch_size
        self.pgd_eps, self.pgd_steps = pgd_eps, int(pgd_steps)
        self.tup_eps, self.tup_images, self.tup_passes = tup_eps, tup_images, int(tup_passes)
        self.records: list[dict] = []
        self.time_to_target: float | None = None
        self.train_seconds = 0.0
        self._begin = 0.0
        self._own = 0.0  # seconds spent measuring
        self._steps: dict = {}
        self._search_cache: dict = {}  # the compiled fresh-TUP search, reused every epoch
        self._rate_cache: dict = {}  # the compiled success-rate step, reused every epoch

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._begin, self._own = time.time(), 0.0

    def _step(self, name: str, build):
        if name not in self._steps:  # compiled once, reused every epoch
            model_fn = models.as_model_fn(getattr(self.model, "classifier", self.model))
            self._steps[name] = build(model_fn)
        return self._steps[name]

    def measure(self) -> dict:
        """The monitored figures of the classifier now."""
        x, y = np.asarray(self.x, np.float32), np.asarray(self.y, np.int32)
        out = {"clean_accuracy": float(evaluation.correct_on(
            self._step("clean", evaluation.correct_fn), x, y, self.batch_size).mean())}
        out["fgsm_accuracy"] = float(evaluation.correct_on(self._step(
            "fgsm", lambda f: evaluation.fgsm_correct_fn(f, self.norm)), x, y,
            self.batch_size, self.eps).mean())
        if self.pgd_eps is not None:
            out["pgd_accuracy"] = float(evaluation.correct_on(self._step(
                "pgd", lambda f: evaluation.pgd_correct_fn(f, steps=self.pgd_steps,
                                                           restarts=1)),
                x, y, self.batch_size, float(self.pgd_eps)).mean())
        if self.tup_eps is not None:
            classifier = getattr(self.model, "classifier", self.model)
            xs, ys = self.tup_images
            v, _ = attacks.targeted_universal(classifier, xs, ys, float(self.tup_eps),
                                              norm=self.norm, max_passes=self.tup_passes,
                                              seed=1, cache=self._search_cache)
            out["tup_success"] = float(np.mean(attacks.targeted_success_rate(
                classifier, x, y, v, cache=self._rate_cache)))
        return out

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        t = time.time()
        self.train_seconds = t - self._begin - self._own
        figures = self.measure()
        self._own += time.time() - t
        self.records.append({"epoch": epoch + 1, "train_seconds": self.train_seconds,
                             **figures})
        logging.info("epoch %d after %.1fs of training: %s", epoch + 1, self.train_seconds,
                     ", ".join(f"{k} {v:.4f}" for k, v in figures.items()))
        if logs is not None:
            logs.update(figures)
        if (self.target is not None and self.time_to_target is None
                and figures["fgsm_accuracy"] >= self.target
                and figures["clean_accuracy"] >= self.clean_target):
            self.time_to_target = self.train_seconds
            self.model.stop_training = True
        if self.time_limit is not None and self.train_seconds >= self.time_limit:
            self.model.stop_training = True


class RobustEarlyStopping(keras.callbacks.Callback):
    """Wong et al. (2020)'s guard against catastrophic overfitting: after every epoch, PGD
    accuracy on held-out images (``steps`` steps of 2.5 eps / steps, one random start, logged
    as ``early_stop_pgd_accuracy``, L-inf); once it falls more than ``drop`` below its best,
    training stops and the classifier gets back the weights of its best epoch.

    ``state_dir`` (optional) keeps the best weights and figures on disk, written atomically,
    so a resumed run still knows them.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, eps: float, *, drop: float,
                 steps: int = 10, batch_size: int = 500,
                 state_dir: str | None = None, seed: int = 0):
        super().__init__()
        if not 0 < drop <= 1:
            raise ValueError(f"early-stopping drop must be in (0, 1], got {drop}")
        if len(x) == 0:
            raise ValueError("early stopping needs held-out images, got none")
        self.x, self.y = np.asarray(x, np.float32), np.asarray(y, np.int32)
        self.eps, self.drop, self.steps = float(eps), float(drop), int(steps)
        self.batch_size, self.seed = int(batch_size), int(seed)
        self.state_dir = state_dir
        self.best_accuracy, self.best_epoch, self.stopped_epoch = -1.0, 0, 0
        self._best_weights: list | None = None
        self._step = None
        self._load_state()

    def _paths(self) -> tuple[str, str]:
        return (os.path.join(self.state_dir, "early_stop_best.weights.h5"),
                os.path.join(self.state_dir, "early_stop.json"))

    def _load_state(self) -> None:
        if self.state_dir and os.path.isfile(self._paths()[1]):
            with open(self._paths()[1]) as f:
                state = json.load(f)
            self.best_accuracy, self.best_epoch = state["best_accuracy"], state["best_epoch"]

    def _classifier(self) -> keras.Model:
        return getattr(self.model, "classifier", self.model)

    def pgd_accuracy(self) -> float:
        """PGD accuracy of the classifier now on the held-out images."""
        if self._step is None:  # compiled once, reused every epoch
            self._step = evaluation.pgd_correct_fn(models.as_model_fn(self._classifier()),
                                                   steps=self.steps, restarts=1, seed=self.seed)
        return float(evaluation.correct_on(self._step, self.x, self.y, self.batch_size,
                                           self.eps).mean())

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        accuracy = self.pgd_accuracy()
        if logs is not None:
            logs["early_stop_pgd_accuracy"] = accuracy
        if accuracy > self.best_accuracy:
            self.best_accuracy, self.best_epoch = accuracy, epoch + 1
            self._best_weights = self._classifier().get_weights()
            if self.state_dir:
                weights, state = self._paths()
                files.atomic_write(weights, self._classifier().save_weights, ".weights.h5")
                files.write_json(state, {"best_accuracy": accuracy, "best_epoch": epoch + 1})
        elif accuracy < self.best_accuracy - self.drop:
            logging.warning("epoch %d: held-out PGD accuracy %.3f fell more than %.2f below "
                            "its best %.3f (epoch %d): catastrophic overfitting; stopping with "
                            "the weights of epoch %d", epoch + 1, accuracy, self.drop,
                            self.best_accuracy, self.best_epoch, self.best_epoch)
            if self._best_weights is not None:
                self._classifier().set_weights(self._best_weights)
            else:
                self._classifier().load_weights(self._paths()[0])
            self.stopped_epoch = epoch + 1
            self.model.stop_training = True


class HistoryCSV(keras.callbacks.Callback):
    """Per-epoch logs in a CSV file, one row per epoch, rewritten atomically every epoch.

    Columns are the union of every epoch's keys (a key missing in an epoch is empty), and a
    re-run epoch replaces its row, so a resumed run whose logs gain or lose a key (e.g. an
    epoch that refreshes V) never shifts a column. (Keras' ``CSVLogger`` fixes its columns at
    the first epoch and appends, so a resumed run could shift them or leave half a row.)
    """

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        rows: dict[int, dict] = {}
        if os.path.isfile(self.path):
            with open(self.path, newline="") as f:
                rows = {int(r["epoch"]): r for r in csv.DictReader(f)}
        rows[epoch] = {"epoch": epoch, **{k: float(np.mean(v)) for k, v in
                                          (logs or {}).items()}}
        keys = ["epoch"] + sorted({k for r in rows.values() for k in r} - {"epoch"})

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                out = csv.DictWriter(f, fieldnames=keys, restval="")
                out.writeheader()
                for e in sorted(rows):
                    out.writerow(rows[e])
        files.atomic_write(self.path, write, ".csv")


def read_history(path: str) -> dict[str, list[float]]:
    """Per-epoch history from a CSVLogger file (last row wins when an epoch was re-run)."""
    if not os.path.isfile(path):
        return {}
    rows: dict[int, dict] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows[int(row["epoch"])] = row
    history: dict[str, list] = {}
    for epoch in sorted(rows):
        for key, value in rows[epoch].items():
            value = None if value in ("NA", "", None) else (
                int(value) if key == "epoch" else float(value))
            history.setdefault(key, []).append(value)
    return {k: v for k, v in history.items() if any(x is not None for x in v)}


class EpochTimer(keras.callbacks.Callback):
    """Wall seconds of every epoch run in this session; also put in the epoch's logs as
    ``epoch_seconds``, so a history file keeps every epoch's time across resumed sessions."""

    def __init__(self):
        super().__init__()
        self.seconds: list[float] = []
        self._t0 = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._t0 = time.time()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.seconds.append(time.time() - self._t0)
        if logs is not None:
            logs["epoch_seconds"] = self.seconds[-1]
