"""The run itself: :func:`train` and its steps (:class:`_Run`), the shuffled training stream
and the accuracy curve of a finished run."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import sys
import time
from typing import Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from rat_tf import attacks, callbacks as callbacks_lib, distribute, evaluation, files
from rat_tf import keras_compat, models, perturbation_files, trainers
from rat_tf import data as data_lib
from rat_tf.training.config import (AUGMENTATIONS, Arrays, SETTINGS_FILE, TrainConfig,
                                    WorkerLostError)
from rat_tf.training.optim import SmoothedSparseCrossentropy, make_optimizer


class _TestAccuracy(keras.callbacks.Callback):
    """Every ``every`` epochs: ``test_accuracy`` into the logs (``history.csv``), for accuracy
    against time (it runs after the epoch timer, so its evaluation is not training time)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, every: int):
        super().__init__()
        self.x, self.y, self.every = x, y, int(every)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None and (epoch + 1) % self.every == 0:
            logs["test_accuracy"] = evaluation.accuracy(self.model.classifier, self.x, self.y)
            logging.info("epoch %d: test accuracy %.4f", epoch + 1, logs["test_accuracy"])


def accuracy_curve(history_path: str) -> list[tuple[float, float]]:
    """(training seconds so far, test accuracy) at every epoch of ``history.csv`` that has a
    test accuracy (a run with ``test_every``); the seconds add up every epoch's."""
    history = callbacks_lib.read_history(history_path)
    seconds = np.cumsum([s or 0.0 for s in history.get("epoch_seconds", [])])
    return [(float(t), float(a)) for t, a in zip(seconds, history.get("test_accuracy", []))
            if a is not None]


def _all_epochs_seconds(history: Mapping[str, list]) -> float | None:
    """The training seconds of every epoch of ``history`` (read_history), added up; None when
    an epoch has no time (one run before the history kept it)."""
    seconds = history.get("epoch_seconds", [])
    if not seconds or len(seconds) != len(history.get("epoch", [])) or None in seconds:
        return None
    return float(sum(seconds))


def train_stream(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int = 0,
                 start: int = 0, augment: str = "none", with_index: bool = False
                 ) -> tf.data.Dataset:
    """Endless batches of a fresh seeded permutation per pass, from example ``start`` on,
    each batch augmented by ``augment`` (:func:`rat_tf.data.augment`); ``with_index``:
    batches ``({"image": x, "index": i}, y)`` with each image's index in ``x``.

    The order is a pure function of (seed, pass) and a batch's augmentation of (seed, batch
    number), so both are the same under every strategy (however often the dataset is
    iterated) and a resumed run continues where it stopped. Batches are global
    (``drop_remainder``); the pipeline is auto-sharded by DATA.
    """
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augment {augment!r}; choose one of {AUGMENTATIONS}")
    n = len(x)
    if n < batch_size:
        raise ValueError(f"{n} training images make no full batch of {batch_size}")
    images, labels = tf.constant(np.asarray(x, np.float32)), tf.constant(np.asarray(y, np.int32))

    def one_pass(p):
        perm = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), seed=tf.stack([tf.constant(seed, tf.int64), p]))
        return tf.data.Dataset.from_tensor_slices(perm)

    ds = tf.data.Dataset.counter(dtype=tf.int64).flat_map(one_pass).skip(start)
    def batch(k, i):
        xb, yb = tf.gather(images, i), tf.gather(labels, i)
        # a seed of its own per batch, apart from the permutations' (seed, pass)
        xb, yb = data_lib.augment(xb, yb, tf.stack([tf.constant(seed, tf.int64), -1 - k]),
                                  augment)
        if with_index:
            return {"image": xb, "index": tf.cast(i, tf.int32)}, yb
        return xb, yb

    ds = ds.batch(batch_size, drop_remainder=True).enumerate(start=start // batch_size)
    ds = ds.map(batch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    opts = tf.data.Options()
    opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    opts.deterministic = True
    return ds.with_options(opts).prefetch(tf.data.AUTOTUNE)


def _verbose(config: TrainConfig) -> int:
    if config.verbose is not None:
        return config.verbose
    return 1 if sys.stdout.isatty() else 2


def train(config: TrainConfig, strategy: tf.distribute.Strategy | None = None,
          callbacks: Sequence[keras.callbacks.Callback] = (), *,
          train_data: Arrays | None = None, test_data: Arrays | None = None) -> dict:
    """Train per ``config`` (resuming from ``model_dir/backup`` if present) and write outputs.

    ``train_data`` / ``test_data``: the dataset's whole train / test split as (images, labels)
    arrays already loaded by the caller (default: read per ``config``). Writes
    ``model_dir/model.keras`` (the classifier), ``metrics.json``, ``history.csv``, TensorBoard
    logs and, for RAT, ``perturbations.npz``; under multi-worker only the chief writes them.
    Returns the metrics dict.
    """
    strategy = strategy or tf.distribute.get_strategy()
    config.validate(strategy.num_replicas_in_sync)
    previous_policy = keras.mixed_precision.global_policy().name
    distribute.set_precision(config.precision)
    try:
        return _Run(config, strategy).execute(list(callbacks), train_data, test_data)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


class _Run:
    """One call of :func:`train`: its folders, data, trainer and outputs, step by step."""

    def __init__(self, config: TrainConfig, strategy: tf.distribute.Strategy):
        self.config, self.strategy = config, strategy
        self.chief = distribute.is_chief(strategy)
        self.model_dir = os.path.abspath(config.model_dir)
        self.work_dir = distribute.worker_dir(self.model_dir, strategy)
        self.backup_dir = os.path.join(self.work_dir, "backup")
        self.chief_backup = os.path.join(self.model_dir, "backup")  # what every worker restores
        self.history_path = os.path.join(self.work_dir, "history.csv")
        self.info = data_lib.get_info(config.dataset)
        self.resuming = False
        self.early_stop_dir = os.path.join(self.work_dir, "early_stop")
        self.held_out: Arrays | None = None  # the early-stopping check's images
        self.early_stop: callbacks_lib.RobustEarlyStopping | None = None

    def execute(self, extra_callbacks: list, train_data: Arrays | None,
                test_data: Arrays | None) -> dict:
        start = time.time()
        self.prepare_folders()
        keras.utils.set_random_seed(self.config.seed)
        x_train, y_train, x_test, y_test = self.load_data(train_data, test_data)
        steps_per_epoch = self.config.steps_per_epoch or len(x_train) // self.config.batch_size
        if steps_per_epoch < 1:
            raise ValueError(f"{len(x_train)} training images make no full batch of "
                             f"{self.config.batch_size}; lower batch_size or enlarge "
                             f"train_subset")
        logging.info("%s on %s/%s: %d training images, %d steps/epoch x %d epochs, global "
                     "batch %d over %d replicas%s", self.config.method, self.config.dataset,
                     self.config.init_from or self.config.model, len(x_train), steps_per_epoch,
                     self.config.epochs, self.config.batch_size,
                     self.strategy.num_replicas_in_sync, " (resuming)" if self.resuming else "")
        eps, given_v, given_meta = self.given_perturbations()
        search = self.config.search_settings(eps, len(x_train))
        trainer = self.build_trainer(eps, steps_per_epoch * self.config.epochs,
                                     steps_per_epoch, len(x_train))
        search_seconds, search_stats = self.set_perturbations(trainer, given_v, search,
                                                              x_train, y_train)
        timer = callbacks_lib.EpochTimer()
        cbs = self.callbacks(search, x_train, y_train, x_test, y_test, timer,
                             extra_callbacks)
        fit_seconds = self.fit(trainer, cbs, x_train, y_train, steps_per_epoch)
        metrics = self.metrics(trainer, timer, x_train, x_test, y_test, steps_per_epoch)
        metrics.update(fit_seconds=fit_seconds, search_seconds=search_seconds,
                       wall_seconds=time.time() - start)
        epochs_run = len(timer.seconds)
        images = epochs_run * steps_per_epoch * self.config.batch_size
        metrics["images_per_sec"] = images / fit_seconds if epochs_run else None
        if search_stats is not None:
            metrics["search_success_rate"] = search_stats["success_rate"]
        logging.info("done: test accuracy %.4f, %.1f images/s, %.1fs", metrics["test_accuracy"],
                     metrics["images_per_sec"] or 0.0, metrics["wall_seconds"])
        self.write_outputs(trainer, metrics, eps, given_meta, x_train)
        return metrics

    def prepare_folders(self) -> None:
        """Start over (``restart``) or check the backup to resume; drop stale temporaries."""
        os.makedirs(self.work_dir, exist_ok=True)
        if self.config.restart and self.chief:
            shutil.rmtree(self.chief_backup, ignore_errors=True)
        if self.chief:
            _remove_stale_temporaries(self.model_dir, self.chief_backup)
        self.resuming = os.path.exists(os.path.join(self.chief_backup, "training_metadata.json"))
        if self.resuming:
            _check_resume(os.path.join(self.chief_backup, SETTINGS_FILE), self.config)
        else:  # a fresh run: drop the history and early-stopping state of an earlier run
            if os.path.exists(self.history_path):
                os.remove(self.history_path)
            shutil.rmtree(self.early_stop_dir, ignore_errors=True)

    def load_data(self, train_data: Arrays | None, test_data: Arrays | None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The training subset and the test images of the final accuracy."""
        c = self.config
        x_train, y_train = train_data or data_lib.load_arrays(c.dataset, "train",
                                                              c.data_source, c.data_dir)
        x_test, y_test = test_data or data_lib.load_arrays(c.dataset, "test", c.data_source,
                                                           c.data_dir)
        if c.early_stop_drop:  # the last images of the split are held out, never trained on
            n = int(c.early_stop_images)
            if n >= len(x_train):
                raise ValueError(f"early_stop_images {n} leaves none of the {len(x_train)} "
                                 f"training images to train on")
            self.held_out = x_train[-n:], y_train[-n:]
            x_train, y_train = x_train[:-n], y_train[:-n]
        subset = c.resolved_subset()
        if subset:
            x_train, y_train = data_lib.balanced_subset(
                x_train, y_train, subset // self.info.num_classes, c.seed)
        if c.test_subset:
            x_test, y_test = x_test[:c.test_subset], y_test[:c.test_subset]
        return x_train, y_train, x_test, y_test

    def given_perturbations(self) -> tuple[float, np.ndarray | None, dict]:
        """(radius of V, V from ``perturbations_path`` or None, its metadata)."""
        c = self.config
        if c.method != "rat" or not c.perturbations_path:
            return c.resolved_eps(), None, {}
        v, meta = perturbation_files.load(c.perturbations_path)
        eps = float(meta.get("eps", c.resolved_eps()))  # V is checked against its own radius
        logging.info("loaded V %s from %s (eps %g)", v.shape, c.perturbations_path, eps)
        return eps, v, meta

    def build_trainer(self, eps: float, total_steps: int, steps_per_epoch: int,
                      num_images: int) -> trainers.StandardModel:
        """The classifier (zoo or ``init_from``) in its compiled trainer, under the strategy."""
        c, info = self.config, self.info
        with self.strategy.scope():
            if c.init_from:
                classifier = trainers.load_classifier(c.init_from, info.image_shape,
                                                      info.num_classes)
            else:
                classifier = models.build_model(c.model, c.dataset)
            settings = c.trainer_settings()
            if c.method == "rat":
                settings["eps"] = eps
                if c.rat_carry != "none":  # one carried start per training image
                    settings["carry_images"] = num_images
            trainer = trainers.make_trainer(c.method, classifier, **settings)
            trainer.build((None, *info.image_shape))
            loss = None
            if c.label_smoothing:
                loss = SmoothedSparseCrossentropy(c.label_smoothing, trainer.from_logits,
                                                  info.num_classes)
            trainer.compile(optimizer=make_optimizer(c, total_steps, steps_per_epoch),
                            loss=loss, jit_compile=c.jit_compile)
        return trainer

    def set_perturbations(self, trainer: trainers.StandardModel, given_v: np.ndarray | None,
                          search: attacks.SearchSettings, x: np.ndarray, y: np.ndarray
                          ) -> tuple[float, dict | None]:
        """RAT: the given V, or one searched against the start weights unless a ``rat_init``
        step learns it (a resumed run restores V from its backup). Returns (seconds, search
        stats or None)."""
        if self.config.method != "rat" or self.resuming:
            return 0.0, None
        if given_v is None and self.config.rat_init != "none":
            return 0.0, None  # V starts at the trainer's random corners (or is not used)
        t, stats = time.time(), None
        if given_v is not None:
            v = given_v
        else:
            logging.info("searching targeted universal perturbations (%s, eps %g, %s)",
                         search.norm, search.eps, search.method)
            v, stats = attacks.targeted_universal(
                trainer, x, y, num_classes=self.info.num_classes, seed=self.config.seed,
                strategy=self.strategy, progress=_verbose(self.config) == 1,
                **search.kwargs())
            logging.info("V found in %.1fs: mean targeted success %.3f on the training subset",
                         time.time() - t, attacks.mean_success_rate(stats))
        trainer.set_perturbations(v)
        return time.time() - t, stats

    def callbacks(self, search: attacks.SearchSettings, x: np.ndarray, y: np.ndarray,
                  x_test: np.ndarray, y_test: np.ndarray, timer: keras.callbacks.Callback,
                  extra: list) -> list:
        """NaN stop, V refresh, the caller's callbacks, timer, test accuracy, early stopping,
        history, backup, TensorBoard."""
        c = self.config
        cbs: list = [callbacks_lib.RaiseOnNaN()]
        if c.method == "rat" and c.refresh_every:
            if c.refresh_passes:
                search = dataclasses.replace(search, max_passes=int(c.refresh_passes))
            cbs.append(callbacks_lib.RefreshPerturbations(
                x, y, c.refresh_every, search, seed=c.seed, progress=_verbose(c) == 1,
                warm_start=bool(c.refresh_passes)))
        cbs += extra + [timer]
        if c.test_every:
            cbs.append(_TestAccuracy(x_test, y_test, c.test_every))
        if c.early_stop_drop:
            os.makedirs(self.early_stop_dir, exist_ok=True)
            self.early_stop = callbacks_lib.RobustEarlyStopping(
                *self.held_out, c.resolved_adv_eps(), drop=c.early_stop_drop,
                state_dir=self.early_stop_dir, seed=c.seed)
            cbs.append(self.early_stop)
        cbs += [
            # History before backup: a kill between the two re-runs the epoch (its row is
            # written again; read_history keeps the last) instead of losing a backed-up row.
            callbacks_lib.HistoryCSV(self.history_path),
            keras_compat.ClusterBackupAndRestore(self.backup_dir, restore_dir=self.chief_backup,
                                                 settings=c.run_settings(),
                                                 settings_file=SETTINGS_FILE),
        ]
        if importlib.util.find_spec("tensorboard") is not None:
            cbs.append(keras.callbacks.TensorBoard(os.path.join(self.work_dir, "logs")))
        else:
            logging.warning("tensorboard is not installed: no TensorBoard logs "
                            "(pip install tensorboard); history.csv has the per-epoch metrics")
        return cbs

    def fit(self, trainer: trainers.StandardModel, cbs: list, x: np.ndarray, y: np.ndarray,
            steps_per_epoch: int) -> float:
        """``trainer.fit`` from the resumed epoch on; returns its seconds. A lost worker is a
        :class:`WorkerLostError` saying how to resume."""
        c = self.config
        initial_epoch = 0
        if self.resuming:
            with open(os.path.join(self.chief_backup, "training_metadata.json")) as f:
                initial_epoch = int(json.load(f).get("epoch", 0))
        ds = train_stream(x, y, c.batch_size, c.seed,
                          start=initial_epoch * steps_per_epoch * c.batch_size,
                          augment=c.augment, with_index=getattr(trainer, "carries", False))
        t0 = time.time()
        try:
            trainer.fit(ds, epochs=c.epochs, steps_per_epoch=steps_per_epoch, callbacks=cbs,
                        shuffle=False, verbose=_verbose(c))
        except (tf.errors.UnavailableError, tf.errors.AbortedError,
                tf.errors.DeadlineExceededError) as e:
            if not keras_compat.multi_worker(self.strategy):
                raise
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            cause = next((line for line in lines if "unhealthy" in line
                          or "abort" in line.lower()), lines[0] if lines else "")
            raise WorkerLostError(
                f"multi-worker training lost a worker or its connection ({type(e).__name__}: "
                f"{cause}). Finished epochs are in {self.chief_backup}: restart every worker "
                f"with the same command to resume.") from e
        return time.time() - t0

    def metrics(self, trainer: trainers.StandardModel, timer: callbacks_lib.EpochTimer,
                x_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                steps_per_epoch: int) -> dict:
        """What ``metrics.json`` records of the run (timings are added by the caller)."""
        c = self.config
        steady = timer.seconds[1:]
        history = callbacks_lib.read_history(self.history_path)
        adversarial = [a for a in history.get("adversarial_accuracy", []) if a is not None]
        return {
            "config": dataclasses.asdict(c),
            "settings": trainer.settings(),
            "strategy": type(self.strategy).__name__,
            "num_replicas": self.strategy.num_replicas_in_sync,
            "train_images": len(x_train),
            "steps_per_epoch": steps_per_epoch,
            "epochs_run_this_session": len(timer.seconds),
            "resumed": self.resuming,
            "history": history,
            # FGSM-AT / PGD-AT: accuracy on the adversarial training batches of the last
            # epoch (the gradient-masking check of a report compares it with held-out PGD)
            "train_adversarial_accuracy": adversarial[-1] if adversarial else None,
            "test_accuracy": evaluation.accuracy(trainer.classifier, x_test, y_test),
            "test_images": len(x_test),
            "epoch_seconds": timer.seconds,
            # every epoch's seconds, resumed sessions included (None: an epoch has none)
            "train_seconds_all_epochs": _all_epochs_seconds(history),
            "images_per_sec_steady": (len(steady) * steps_per_epoch * c.batch_size
                                      / sum(steady)) if steady else None,
            **({"early_stop": {"best_epoch": self.early_stop.best_epoch,
                               "best_pgd_accuracy": self.early_stop.best_accuracy,
                               "stopped_epoch": self.early_stop.stopped_epoch,
                               "held_out_images": len(self.held_out[0])}}
               if c.early_stop_drop else {}),
        }

    def write_outputs(self, trainer: trainers.StandardModel, metrics: dict, eps: float,
                      given_meta: dict, x_train: np.ndarray) -> None:
        """The chief writes model, V and metrics, then drops the backup; others clean up."""
        c = self.config
        if not self.chief:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            return
        os.makedirs(self.model_dir, exist_ok=True)
        files.atomic_write(os.path.join(self.model_dir, "model.keras"),
                           trainer.classifier.save, ".keras")
        if c.method == "rat":
            # Fingerprints of the images V was searched on, so evaluation refuses them.
            meta = {"search_images": x_train}
            if c.perturbations_path and not c.refresh_every:  # V was searched elsewhere
                meta = {perturbation_files.FINGERPRINT_KEY: given_meta.get(perturbation_files.FINGERPRINT_KEY, [])}
            perturbation_files.save(os.path.join(self.model_dir, "perturbations.npz"),
                                       trainer.get_perturbations(), eps=eps, norm=c.norm,
                                       **meta)
        files.write_json(os.path.join(self.model_dir, "metrics.json"), metrics)
        shutil.rmtree(self.chief_backup, ignore_errors=True)  # every output is written
        shutil.rmtree(self.early_stop_dir, ignore_errors=True)


def _remove_stale_temporaries(*folders: str) -> None:
    """Delete the temporary files of atomic writes a killed run left in ``folders``."""
    for folder in folders:
        if os.path.isdir(folder):
            for name in os.listdir(folder):
                if name.startswith(".tmp_"):
                    os.remove(os.path.join(folder, name))


def _check_resume(settings_path: str, config: TrainConfig) -> None:
    """Refuse to resume a backup written by a run with other settings, naming each one."""
    if not os.path.isfile(settings_path):
        logging.warning("resuming a backup with no %s: its settings cannot be checked",
                        SETTINGS_FILE)
        return
    with open(settings_path) as f:
        saved = json.load(f)
    now = json.loads(json.dumps(config.run_settings(), default=files.jsonable))
    diffs = [f"{k}: backup {saved.get(k)!r}, now {now.get(k)!r}"
             for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diffs:
        raise ValueError(
            f"{os.path.dirname(settings_path)} holds the backup of a run with other settings "
            f"({'; '.join(diffs)}): rerun with the same settings to resume it, or start over "
            f"with --restart (restart=True) or another --model_dir")
