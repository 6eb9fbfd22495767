"""The resumable training run: :func:`train` behind ``bin/train.py`` and the experiment.

:func:`train` reads as its steps: prepare the run folder (resume or start over), load the
data, build and compile the trainer (:mod:`rat_tf.trainers`), set its perturbations (RAT),
fit with the callbacks (:mod:`rat_tf.callbacks`) and write the outputs (``model.keras``,
``metrics.json``, ``history.csv``, TensorBoard logs and, for RAT, ``perturbations.npz``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shutil
import sys
import time
from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from rat_tf import attacks, callbacks as callbacks_lib, distribute, evaluation, files
from rat_tf import keras_compat, models, ops, perturbation_files, trainers
from rat_tf import data as data_lib

METHODS = trainers.METHODS
LR_SCHEDULES = ("constant", "cosine", "onecycle", "step")
WARMUP_SCHEDULES = ("cosine", "onecycle")  # the schedules that take warmup_epochs
AUGMENTATIONS = data_lib.AUGMENTATIONS
OPTIMIZERS = ("adam", "sgd", "momentum")
SEARCH_METHODS = attacks.TU_METHODS
DEFAULT_RAT_SUBSET = 1000
SETTINGS_FILE = "run_settings.json"  # in a backup: the settings of the run that wrote it
Arrays = tuple[np.ndarray, np.ndarray]


class WorkerLostError(RuntimeError):
    """A multi-worker run stopped because a peer died or became unreachable (resumable)."""


@dataclasses.dataclass
class TrainConfig:
    """Everything :func:`train` needs; ``bin/train.py`` flags mirror these fields."""

    dataset: str = "mnist"
    data_dir: str | None = None
    data_source: str = "auto"
    model: str = "mnist_cnn"
    method: str = "standard"
    epochs: int = 1
    batch_size: int = 128  # GLOBAL batch size (split over replicas)
    steps_per_epoch: int = 0  # 0: one pass over the training set
    lr: float = 1e-3
    lr_schedule: str = "constant"  # onecycle: linear warm-up, then linear decay to 0
    warmup_epochs: float = 0.0  # linear warm-up from 0 to lr (cosine, onecycle)
    optimizer: str = "adam"  # momentum: SGD with Nesterov momentum 0.9
    weight_decay: float = 0.0  # decoupled: every step w -= lr * weight_decay * w (not BN, biases)
    label_smoothing: float = 0.0
    augment: str = "none"  # data.AUGMENTATIONS: crop_flip = 4-pixel reflect-pad crop + flip
    test_every: int = 0  # test accuracy every N epochs, in history.csv (0: at the end only)
    train_subset: int | None = None  # balanced subset size; None: 1000 for rat, all otherwise
    test_subset: int = 0  # first N test images for the final accuracy (0: all)
    seed: int = 0
    model_dir: str = "runs/default"
    init_from: str = ""  # .keras classifier to fine-tune from
    # RAT
    perturbations_path: str = ""  # .npz from bin/perturb.py; empty: search at start
    eps: float | None = None  # L-inf/L2 radius of V; None: the dataset's (data.DatasetInfo.eps)
    norm: str = "linf"
    search_method: str = "sgd"
    search_passes: int = 10
    search_delta: float = 0.2
    refresh_every: int = 0  # 0: static V (the paper)
    refresh_passes: int = 0  # >0: each refresh continues the current V for N passes
    targets_per_image: str = "one"
    perturbed_fraction: float = 0.5
    batch_mode: str = "append"  # or "replace": the cost of a standard step
    per_source: bool = False  # one V per (source class, target) instead of per target
    online: bool = False  # RAT: V updated online at every step (starts as given or searched)
    online_step_size: float | None = None  # None: the trainer's default
    rat_init: str = "none"  # trainers.RAT_INITS: "class"/"target": V starts an FGSM step
    rat_step_size: float | None = None  # that step; None: eps (1.25 eps from "random")
    rat_consistency: float = 0.0  # logit-consistency penalty of that step (FGSM-UAP: 10)
    # FGSM-AT / PGD-AT
    adv_eps: float | None = None  # attack radius; None: the dataset's (DatasetInfo.adv_eps)
    pgd_steps: int = 10
    pgd_step_size: float | None = None  # None: 1.25 eps (FGSM-AT), 2.5 eps / steps (PGD-AT)
    adv_init_scale: float = 1.0  # FGSM-AT: random start in the ball of radius scale * eps
    adv_box_start: bool = False  # FGSM-AT: gradient at the start clipped to the pixel box
    adv_project: bool = True  # FGSM-AT: project the step to the eps ball (False: N-FGSM)
    adv_freeze_fooled: bool = False  # PGD-AT: an example stops moving once misclassified
    early_stop_drop: float = 0.0  # >0: stop once held-out PGD accuracy falls this far from best
    early_stop_images: int = 1000  # training images held out for that check
    # performance
    precision: str = "float32"
    jit_compile: bool = False
    verbose: int | None = None  # None: progress bar when interactive, one line per epoch if not
    restart: bool = False  # drop a backup in model_dir and start over (else it is resumed)

    # Fields that do not change what is trained: a resume may differ in these.
    RESUME_FREE = ("data_dir", "data_source", "verbose", "restart", "model_dir", "test_every")

    def run_settings(self) -> dict:
        """The settings a resumed run must share with the run that wrote the backup."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RESUME_FREE}

    def resolved_eps(self) -> float:
        """``eps`` (radius of V), or the dataset's default."""
        return float(self.eps) if self.eps is not None else data_lib.get_info(self.dataset).eps

    def resolved_adv_eps(self) -> float:
        """``adv_eps`` (FGSM-AT / PGD-AT radius), or the dataset's default."""
        if self.adv_eps is not None:
            return float(self.adv_eps)
        return data_lib.get_info(self.dataset).adv_eps

    def resolved_subset(self) -> int:
        """Number of training images (0 = all)."""
        if self.train_subset is None:
            return DEFAULT_RAT_SUBSET if self.method == "rat" else 0
        return int(self.train_subset)

    def validate(self, num_replicas: int = 1) -> None:
        """Raise ValueError naming the first bad value."""
        info = data_lib.get_info(self.dataset)
        if self.model not in models.MODELS:
            raise ValueError(f"unknown model {self.model!r}; choose one of {sorted(models.MODELS)}")
        checks = [
            (self.method in METHODS, f"unknown method {self.method!r}; choose one of {METHODS}"),
            (int(self.epochs) >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (int(self.batch_size) >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (int(self.batch_size) % num_replicas == 0,
             f"global batch_size {self.batch_size} is not divisible by the {num_replicas} "
             f"replicas of the strategy"),
            (int(self.steps_per_epoch) >= 0,
             f"steps_per_epoch must be >= 0, got {self.steps_per_epoch}"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be positive, got {self.lr}"),
            (self.lr_schedule in LR_SCHEDULES,
             f"unknown lr_schedule {self.lr_schedule!r}; choose one of {LR_SCHEDULES}"),
            (math.isfinite(self.warmup_epochs) and 0 <= self.warmup_epochs < self.epochs,
             f"warmup_epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs}"),
            (not self.warmup_epochs or self.lr_schedule in WARMUP_SCHEDULES,
             f"warmup_epochs is for lr_schedule {' or '.join(WARMUP_SCHEDULES)}, not "
             f"{self.lr_schedule!r}"),
            (math.isfinite(self.weight_decay) and self.weight_decay >= 0,
             f"weight_decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.label_smoothing < 1,
             f"label_smoothing must be in [0, 1), got {self.label_smoothing}"),
            (self.augment in AUGMENTATIONS,
             f"unknown augment {self.augment!r}; choose one of {AUGMENTATIONS}"),
            (int(self.test_every) >= 0, f"test_every must be >= 0, got {self.test_every}"),
            (self.optimizer in OPTIMIZERS,
             f"unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}"),
            (self.train_subset is None or int(self.train_subset) >= 0,
             f"train_subset must be >= 0, got {self.train_subset}"),
            (self.resolved_subset() % info.num_classes == 0,
             f"train_subset {self.resolved_subset()} must be a multiple of the "
             f"{info.num_classes} classes (balanced subset)"),
            (int(self.test_subset) >= 0, f"test_subset must be >= 0, got {self.test_subset}"),
            (math.isfinite(self.early_stop_drop) and 0 <= self.early_stop_drop <= 1,
             f"early_stop_drop must be in [0, 1], got {self.early_stop_drop}"),
            (int(self.early_stop_images) >= 1,
             f"early_stop_images must be >= 1, got {self.early_stop_images}"),
            (self.resolved_eps() > 0, f"eps must be positive, got {self.eps}"),
            (self.norm in ops.NORMS, f"unknown norm {self.norm!r}; choose one of {ops.NORMS}"),
            (self.search_method in SEARCH_METHODS,
             f"unknown search_method {self.search_method!r}; choose one of {SEARCH_METHODS}"),
            (int(self.search_passes) >= 1,
             f"search_passes must be >= 1, got {self.search_passes}"),
            (0 <= self.search_delta < 1, f"search_delta must be in [0, 1), got "
                                         f"{self.search_delta}"),
            (int(self.refresh_every) >= 0,
             f"refresh_every must be >= 0, got {self.refresh_every}"),
            (int(self.refresh_passes) >= 0,
             f"refresh_passes must be >= 0, got {self.refresh_passes}"),
            (not self.refresh_passes or self.refresh_every,
             "refresh_passes needs refresh_every >= 1 (it sets how V is refreshed)"),
            (self.precision in distribute.PRECISIONS,
             f"unknown precision {self.precision!r}; choose one of {distribute.PRECISIONS}"),
            (bool(self.model_dir), "model_dir must be set"),
            (not self.init_from or os.path.isfile(self.init_from),
             f"init_from {self.init_from!r}: no such file"),
            (not self.perturbations_path or os.path.isfile(self.perturbations_path),
             f"perturbations_path {self.perturbations_path!r}: no such file"),
            (self.method == "rat" or not (self.perturbations_path or self.refresh_every
                                          or self.per_source or self.online
                                          or self.rat_init != "none"),
             "perturbations_path, refresh_every, per_source, online and rat_init are RAT "
             "settings (method=rat)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        # the settings of every method's trainer, checked by the trainer's own rules
        trainers.RATModel.check_settings(**self._rat_settings(), eps=self.resolved_eps())
        trainers.AdversarialTrainingModel.check_settings(**{**self._adv_settings(),
                                                            "method": "pgd_at"})

    def search_settings(self, eps: float | None = None, num_images: int = 128
                        ) -> attacks.SearchSettings:
        """The settings of the V search (radius ``eps``, default the resolved one) on
        ``num_images`` training images."""
        return attacks.SearchSettings(
            eps=self.resolved_eps() if eps is None else float(eps), norm=self.norm,
            method=self.search_method, max_passes=self.search_passes, delta=self.search_delta,
            batch_size=min(128, num_images), per_source=bool(self.per_source))

    def _rat_settings(self) -> dict:
        return trainers.RATSettings.of(self).asdict()

    def _adv_settings(self) -> dict:
        return {"method": self.method if self.method in ("fgsm_at", "pgd_at") else "pgd_at",
                "eps": self.resolved_adv_eps(), "norm": self.norm, "steps": self.pgd_steps,
                "step_size": self.pgd_step_size, "init_scale": self.adv_init_scale,
                "box_start": bool(self.adv_box_start), "project": bool(self.adv_project),
                "freeze_fooled": bool(self.adv_freeze_fooled)}

    def trainer_settings(self) -> dict:
        """The keyword settings of :func:`rat_tf.trainers.make_trainer` for this config."""
        if self.method == "rat":
            return {**self._rat_settings(), "seed": self.seed}
        if self.method in ("fgsm_at", "pgd_at"):
            settings = self._adv_settings()
            del settings["method"]
            return {**settings, "seed": self.seed}
        return {"seed": self.seed}


@keras.saving.register_keras_serializable("rat_tf")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then linear decay to 0 at
    ``total_steps``."""

    def __init__(self, peak: float, total_steps: int, warmup_steps: int = 0):
        self.peak, self.total_steps = float(peak), max(1, int(total_steps))
        self.warmup_steps = min(max(0, int(warmup_steps)), self.total_steps - 1)

    def __call__(self, step: tf.Tensor) -> tf.Tensor:
        step = tf.cast(step, tf.float32)
        up = step / float(max(1, self.warmup_steps))
        down = (self.total_steps - step) / float(self.total_steps - self.warmup_steps)
        return self.peak * tf.clip_by_value(tf.minimum(up, down), 0.0, 1.0)

    def get_config(self) -> dict:
        return {"peak": self.peak, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps}


def make_schedule(config: TrainConfig, total_steps: int, steps_per_epoch: int = 1) -> Any:
    """The learning rate of ``config`` over ``total_steps`` steps: a float or a Keras schedule
    (``steps_per_epoch`` turns ``warmup_epochs`` into steps)."""
    lr: Any = config.lr
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    if config.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(
            0.0 if warmup else config.lr, decay_steps=max(1, total_steps - warmup),
            warmup_target=config.lr if warmup else None, warmup_steps=warmup)
    elif config.lr_schedule == "onecycle":
        lr = OneCycle(config.lr, total_steps, warmup)
    elif config.lr_schedule == "step":
        bounds = [max(1, total_steps // 2), max(2, (3 * total_steps) // 4)]
        lr = keras.optimizers.schedules.PiecewiseConstantDecay(
            bounds, [config.lr, config.lr * 0.1, config.lr * 0.01])
    return lr


def make_optimizer(config: TrainConfig, total_steps: int, steps_per_epoch: int = 1
                   ) -> keras.optimizers.Optimizer:
    """The optimizer of ``config`` with its learning-rate schedule (:func:`make_schedule`)."""
    lr = make_schedule(config, total_steps, steps_per_epoch)
    decay = {"weight_decay": config.weight_decay} if config.weight_decay else {}
    if config.optimizer == "adam":
        optimizer = keras.optimizers.Adam(lr, **decay)
    elif config.optimizer == "momentum":
        optimizer = keras.optimizers.SGD(lr, momentum=0.9, nesterov=True, **decay)
    else:
        optimizer = keras.optimizers.SGD(lr, **decay)
    if decay:  # decay the weights of convolutions and dense layers only
        optimizer.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    return optimizer


@keras.saving.register_keras_serializable("rat_tf")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy of class-id (or one-hot) labels smoothed by ``label_smoothing``."""

    def __init__(self, label_smoothing: float = 0.0, from_logits: bool = True,
                 num_classes: int = 10, name: str = "smoothed_sparse_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing, self.from_logits = float(label_smoothing), bool(from_logits)
        self.num_classes = int(num_classes)

    def call(self, y_true, y_pred):
        if y_true.shape.rank == 2 and y_true.shape[-1] == self.num_classes:
            onehot = tf.cast(y_true, y_pred.dtype)
        else:
            onehot = tf.one_hot(tf.cast(tf.reshape(y_true, [-1]), tf.int32), self.num_classes,
                                dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(
            onehot, y_pred, from_logits=self.from_logits, label_smoothing=self.label_smoothing)

    def get_config(self) -> dict:
        return {**super().get_config(), "label_smoothing": self.label_smoothing,
                "from_logits": self.from_logits, "num_classes": self.num_classes}


class _TestAccuracy(keras.callbacks.Callback):
    """Every ``every`` epochs: ``test_accuracy`` and the epoch's fit seconds into the logs
    (``history.csv``), for accuracy against time."""

    def __init__(self, x: np.ndarray, y: np.ndarray, every: int):
        super().__init__()
        self.x, self.y, self.every, self.t0 = x, y, int(every), 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.t0 = time.time()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None:
            return
        logs["epoch_seconds"] = time.time() - self.t0
        if (epoch + 1) % self.every == 0:
            logs["test_accuracy"] = evaluation.accuracy(self.model.classifier, self.x, self.y)
            logging.info("epoch %d: test accuracy %.4f", epoch + 1, logs["test_accuracy"])


def accuracy_curve(history_path: str) -> list[tuple[float, float]]:
    """(training seconds so far, test accuracy) at every epoch of ``history.csv`` that has a
    test accuracy (a run with ``test_every``); the seconds add up every epoch's."""
    history = callbacks_lib.read_history(history_path)
    seconds = np.cumsum([s or 0.0 for s in history.get("epoch_seconds", [])])
    return [(float(t), float(a)) for t, a in zip(seconds, history.get("test_accuracy", []))
            if a is not None]


def train_stream(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int = 0,
                 start: int = 0, augment: str = "none") -> tf.data.Dataset:
    """Endless batches of a fresh seeded permutation per pass, from example ``start`` on,
    each batch augmented by ``augment`` (:func:`rat_tf.data.augment`).

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
        return data_lib.augment(xb, yb, tf.stack([tf.constant(seed, tf.int64), -1 - k]),
                                augment)

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
                                     steps_per_epoch)
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

    def build_trainer(self, eps: float, total_steps: int, steps_per_epoch: int
                      ) -> trainers.StandardModel:
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
        """NaN stop, test accuracy, V refresh, the caller's callbacks, timer, history, backup,
        TensorBoard."""
        c = self.config
        cbs: list = [callbacks_lib.RaiseOnNaN()]
        if c.test_every:
            cbs.append(_TestAccuracy(x_test, y_test, c.test_every))
        if c.method == "rat" and c.refresh_every:
            if c.refresh_passes:
                search = dataclasses.replace(search, max_passes=int(c.refresh_passes))
            cbs.append(callbacks_lib.RefreshPerturbations(
                x, y, c.refresh_every, search, seed=c.seed, progress=_verbose(c) == 1,
                warm_start=bool(c.refresh_passes)))
        cbs += extra + [timer]
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
                          augment=c.augment)
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
