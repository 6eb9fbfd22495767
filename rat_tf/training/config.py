"""The settings of a training run (:class:`TrainConfig`), their vocabularies and defaults."""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from rat_tf import attacks, distribute, models, ops, trainers
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
    ema_momentum: float = 0.0  # >0: the saved model is the moving average of the weights
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
    rat_init_noise: float = 0.0  # uniform noise (x eps) added to the V start of that step
    rat_step_loss: str = "auto"  # what that step climbs: trainers.STEP_LOSSES
    rat_carry: str = "none"  # trainers.CARRY_MODES: an image's start carried to its next step
    rat_carry_noise: float = 0.0  # uniform noise (x eps) added to that carried start
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
            (math.isfinite(self.ema_momentum) and 0 <= self.ema_momentum < 1,
             f"ema_momentum must be in [0, 1), got {self.ema_momentum}"),
            (not (self.ema_momentum and self.early_stop_drop),
             "ema_momentum and early_stop_drop do not go together: the moving average would "
             "replace the best epoch's weights that early stopping restores"),
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
