"""Published adversarial-training recipes as ``TrainConfig`` presets (``bin/train.py --recipe``).

Each recipe holds the settings of a paper's reference code (model, attack, optimizer,
schedule, epochs, batch) and, where the paper or the AutoAttack paper gives them, its published
figures. ``*_cpu`` recipes are the same methods sized for 2 CPU cores (docs/experiments.md has
their measured figures); the others are written for a GPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import tensorflow as tf
from absl import logging

from rat_tf import data, evaluation, files, training


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A published training recipe: its ``TrainConfig`` settings, source and published
    figures (accuracy in percent, at the recipe's radius)."""

    settings: Mapping[str, Any]
    source: str
    published: Mapping[str, float] = dataclasses.field(default_factory=dict)
    gpu: bool = False  # sized for a GPU (runs on a CPU, slowly)

    @property
    def dataset(self) -> str:
        return self.settings["dataset"]


_WONG_MNIST = dict(dataset="mnist", model="wong_mnist_net", epochs=10, batch_size=100,
                   optimizer="adam", lr=5e-3, lr_schedule="onecycle", warmup_epochs=4.0,
                   adv_eps=0.3)  # the cyclic schedule of Wong et al.'s MNIST code
_RAT_START = dict(method="rat", train_subset=0)  # RAT on every training image, V learnt
# V[t] toward the runner-up class, plus uniform noise in the eps ball, starts an FGSM step.
_RAT_TARGET = dict(_RAT_START, rat_init="target", targets_per_image="runner_up",
                   rat_init_noise=1.0)
# mnist_rat_carry's start: carried from the image's last FGSM example, plus noise of eps/4
# (also the MNIST-like rat_fgsm of rat_tf.experiment_presets)
MNIST_CARRY = dict(rat_carry="last", rat_carry_noise=0.25)
_NFGSM = dict(adv_init_scale=2.0, adv_box_start=True, adv_project=False)
# Wong et al.'s CIFAR-10 code: SGD momentum 0.9, L2 weight decay 5e-4, cyclic lr peaking at
# half the epochs; here Nesterov momentum and decoupled decay (rat_tf's "momentum" optimizer).
_CIFAR_GPU = dict(dataset="cifar10", model="preact_resnet18", batch_size=128,
                  optimizer="momentum", weight_decay=5e-4, augment="crop_flip",
                  adv_eps=8 / 255)
_CIFAR_CPU = dict(dataset="cifar10", model="fast_cifar_net", epochs=10, batch_size=256,
                  optimizer="momentum", lr=0.2, lr_schedule="onecycle", warmup_epochs=5.0,
                  weight_decay=5e-4, augment="crop_flip", adv_eps=8 / 255)

RECIPES: dict[str, Recipe] = {
    "mnist_fgsm_rs": Recipe(
        {**_WONG_MNIST, "method": "fgsm_at", "pgd_step_size": 0.375},
        "Wong, Rice, Kolter 2020, 'Fast is better than free' (MNIST code: FGSM from a uniform "
        "start, step 0.375, Adam, cyclic lr 5e-3, 10 epochs)",
        {"clean": 98.5, "pgd_50_10": 88.8, "autoattack": 82.9}),
    "mnist_nfgsm": Recipe(
        {**_WONG_MNIST, **_NFGSM, "method": "fgsm_at", "pgd_step_size": 0.3},
        "de Jorge et al. 2022, 'Make some noise' (N-FGSM: start in 2 eps, step eps, no "
        "projection), on the MNIST model and schedule of Wong et al."),
    "mnist_pgd_at": Recipe(
        dict(dataset="mnist", model="madry_mnist_cnn", method="pgd_at", epochs=84,
             batch_size=50, optimizer="adam", lr=1e-4, adv_eps=0.3, pgd_steps=40,
             pgd_step_size=0.01),
        "Madry et al. 2018 (MNIST challenge: 100,000 steps of batch 50 = 84 epochs, Adam "
        "1e-4, PGD 40 x 0.01 from a random start)",
        {"clean": 98.5, "pgd_100": 89.6, "autoattack": 88.5}, gpu=True),
    "mnist_pgd_at_cpu": Recipe(
        {**_WONG_MNIST, "method": "pgd_at", "pgd_steps": 40, "pgd_step_size": 0.01,
         "adv_freeze_fooled": True},
        "Wong et al.'s MNIST PGD training (PGD 40 x 0.01, an example frozen once "
        "misclassified) with their model and cyclic schedule (10 epochs)"),
    "mnist_rat_class": Recipe(
        {**_WONG_MNIST, **_RAT_START, "rat_init": "class"},
        "RAT with V as the start of a per-image FGSM step, one V per true class (the start "
        "of FGSM-UAP, Pan et al. 2024), on the MNIST model and schedule of Wong et al."),
    "mnist_rat_target": Recipe(
        {**_WONG_MNIST, **_RAT_TARGET},
        "RAT with V[t] (t: the runner-up class) plus uniform noise in the eps ball as the "
        "start of a per-image FGSM step toward t, on the MNIST model and schedule of Wong et "
        "al."),
    "mnist_rat_carry": Recipe(
        {**_WONG_MNIST, **_RAT_TARGET, **MNIST_CARRY},
        "mnist_rat_target whose FGSM step, once an image has been seen, starts where that "
        "image's last FGSM example ended plus uniform noise of radius eps/4 (a per-image "
        "start carried across epochs, as ATTA and FGSM-PGI carry theirs); V[t] plus noise "
        "starts each image's first step"),
    "cifar10_fgsm_rs": Recipe(
        {**_CIFAR_GPU, "method": "fgsm_at", "epochs": 15, "lr": 0.2,
         "lr_schedule": "onecycle", "warmup_epochs": 7.5, "pgd_step_size": 10 / 255,
         "adv_box_start": True},
        "Wong et al. 2020 (CIFAR-10 code: PreAct ResNet-18, FGSM step 10/255 from a uniform "
        "start clipped to the box, SGD momentum, cyclic lr 0.2, 15 epochs)",
        {"clean": 83.3, "pgd_50_10": 46.1, "autoattack": 43.2}, gpu=True),
    "cifar10_nfgsm": Recipe(
        {**_CIFAR_GPU, **_NFGSM, "method": "fgsm_at", "epochs": 30, "lr": 0.2,
         "lr_schedule": "onecycle", "warmup_epochs": 15.0, "pgd_step_size": 8 / 255},
        "de Jorge et al. 2022 (CIFAR-10: PreAct ResNet-18, N-FGSM, SGD momentum, cyclic lr "
        "0.2, 30 epochs)", gpu=True),
    "cifar10_pgd_at": Recipe(
        {**_CIFAR_GPU, "method": "pgd_at", "epochs": 200, "lr": 0.1, "lr_schedule": "step",
         "pgd_steps": 10, "pgd_step_size": 2 / 255},
        "Madry et al. 2018 / Rice et al. 2020 (PreAct ResNet-18, PGD 10 x 2/255, SGD momentum "
        "lr 0.1 divided by 10 at epochs 100 and 150, 200 epochs)",
        {"clean": 87.1, "pgd_20": 47.0}, gpu=True),
    "cifar10_rat_target": Recipe(
        {**_CIFAR_GPU, **_RAT_TARGET, "rat_consistency": 10.0, "eps": 8 / 255, "epochs": 30,
         "lr": 0.2, "lr_schedule": "onecycle", "warmup_epochs": 15.0},
        "RAT with V[t] (t: the runner-up class) plus uniform noise in the eps ball as the "
        "start of a per-image FGSM step, with FGSM-UAP's logit-consistency penalty (10), on "
        "the PreAct ResNet-18 and schedule of the N-FGSM recipe", gpu=True),
    "cifar10_rat_target_cpu": Recipe(
        {**_CIFAR_CPU, **_RAT_TARGET, "rat_consistency": 10.0, "eps": 8 / 255,
         "rat_step_size": 10 / 255},
        "RAT with V[t] (t: the runner-up class) plus uniform noise in the eps ball as the "
        "start of a per-image FGSM step of 10/255 (FGSM-RS's), with FGSM-UAP's "
        "logit-consistency penalty (10), on fast_cifar_net, 10 epochs"),
    "cifar10_fgsm_rs_cpu": Recipe(
        {**_CIFAR_CPU, "method": "fgsm_at", "pgd_step_size": 10 / 255,
         "adv_box_start": True},
        "Wong et al.'s CIFAR-10 FGSM-RS on fast_cifar_net, 10 epochs"),
    "cifar10_nfgsm_cpu": Recipe(
        {**_CIFAR_CPU, **_NFGSM, "method": "fgsm_at", "pgd_step_size": 8 / 255},
        "N-FGSM on fast_cifar_net, 10 epochs"),
}


def get(name: str) -> Recipe:
    """The recipe called ``name``; ValueError naming the known ones otherwise."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name]


def train_config(name: str, **overrides: Any) -> training.TrainConfig:
    """The ``TrainConfig`` of recipe ``name``, with ``overrides`` (e.g. the flags given on the
    command line) on top."""
    fields = {f.name for f in dataclasses.fields(training.TrainConfig)}
    unknown = set(overrides) - fields
    if unknown:
        raise ValueError(f"no TrainConfig settings {sorted(unknown)}")
    return training.TrainConfig(**{**get(name).settings, **overrides})


# The evaluation of a reproduction: Wong et al.'s PGD-50-10 (step 0.01 on MNIST, 2/255 on
# CIFAR-10) and AutoAttack (standard) at the training radius, with FGSM over the dataset's
# radii and the gradient-masking checks.
REPRODUCTION_MEASURES = ("clean", "fgsm", "pgd", "autoattack", "masking")
_PGD_EVAL_STEP = {"mnist": 0.01, "fashion_mnist": 0.01, "cifar10": 2 / 255}


def reproduction_settings(name: str, n_test: int = 1000, **overrides: Any
                          ) -> evaluation.EvalSettings:
    """The evaluation of recipe ``name``'s model: clean, FGSM, PGD-50-10, AutoAttack and the
    masking checks at the recipe's radius on the first ``n_test`` test images (0: all)."""
    n_test = int(n_test) or None
    config = train_config(name)
    eps = config.resolved_adv_eps()
    settings = dict(measures=REPRODUCTION_MEASURES, n_test=n_test, pgd_eps=(eps,),
                    pgd_steps=50, pgd_restarts=10, pgd_step_size=_PGD_EVAL_STEP[config.dataset],
                    aa_eps=eps, aa_n=n_test, aa_version="standard")
    return evaluation.EvalSettings.for_dataset(config.dataset, **{**settings, **overrides})


def _train_seconds(metrics: Mapping[str, Any]) -> float | None:
    """A run's training seconds over all its sessions (None: a resumed run whose earlier
    epochs were not timed)."""
    total = metrics.get("train_seconds_all_epochs")
    if total is None and not metrics.get("resumed"):
        total = metrics.get("fit_seconds")
    return total


def _time_text(recipe: Mapping[str, Any]) -> str:
    """The training time of a reproduction, for its report.md."""
    total, epochs = recipe["train_seconds"], len(recipe["epoch_seconds"] or [])
    if total is None or not epochs:
        return ""
    return (f"Training: {epochs} epoch{'s' * (epochs > 1)} in {total:,.0f} s "
            f"({total / epochs:,.0f} s an epoch).\n\n")


def _settings_text(settings: Mapping[str, Any]) -> str:
    """Settings as ``k=v`` pairs for a sentence of a report."""
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in settings.items())


def reproduce(name: str, output_dir: str, *, n_test: int = 1000, data_dir: str | None = None,
              data_source: str = "auto", strategy: tf.distribute.Strategy | None = None,
              eval_overrides: Mapping[str, Any] | None = None, **overrides: Any) -> dict:
    """Train recipe ``name`` into ``output_dir/model`` (resumed after a kill; skipped once a
    finished run with the same settings is there), evaluate it with
    :func:`reproduction_settings` and write report.json / report.md beside the published
    figures. Returns the report."""
    recipe = get(name)
    config = train_config(name, model_dir=os.path.join(output_dir, "model"),
                          data_dir=data_dir, data_source=data_source, **overrides)
    settings = reproduction_settings(name, n_test, **dict(eval_overrides or {}))
    model_path = os.path.join(config.model_dir, "model.keras")
    metrics_path = os.path.join(config.model_dir, "metrics.json")
    done = False
    if os.path.isfile(model_path) and os.path.isfile(metrics_path):
        with open(metrics_path) as f:
            saved = json.load(f).get("config", {})
        wanted = json.loads(json.dumps(config.run_settings()))
        done = {k: saved.get(k) for k in wanted} == wanted
    if done:
        logging.info("%s: the trained model in %s is reused", name, config.model_dir)
    else:
        training.train(config, strategy)
    reports = evaluation.evaluate_models({name: model_path}, dataset=config.dataset,
                                         data_dir=data_dir, data_source=data_source,
                                         settings=settings, strategy=strategy)
    report = reports[name]
    with open(metrics_path) as f:
        metrics = json.load(f)
    base = train_config(name)
    changed = {k: v for k, v in overrides.items() if getattr(base, k) != v}
    epoch_seconds = metrics.get("history", {}).get("epoch_seconds", metrics.get("epoch_seconds"))
    report["recipe"] = {"name": name, "source": recipe.source, "published": dict(recipe.published),
                        "changed": changed, "train_seconds": _train_seconds(metrics),
                        "epoch_seconds": epoch_seconds, "settings": metrics.get("settings")}
    info = data.get_info(config.dataset)
    published = ", ".join(f"{k} {v:g}" for k, v in recipe.published.items()) or "none given"
    evaluation.write_report(reports, output_dir, title=f"Reproduction of {name} on "
                            f"{info.name}", extra_markdown=f"\n{recipe.source}.\n\n"
                            + (f"Changed here from the recipe: {_settings_text(changed)}.\n\n"
                               if changed else "") + _time_text(report["recipe"])
                            + f"Published (%): {published}.\n")
    files.write_json(os.path.join(output_dir, "recipe.json"), report["recipe"])
    return report
