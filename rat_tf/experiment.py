"""The paper's pipeline in one call: pretrain, search V, RAT and baselines, evaluate side by side.

Stages (each skipped when its outputs already exist, so a killed run resumes):

(a) standard training of the start model (:func:`rat_tf.training.train`, method ``standard``);
(b) targeted universal perturbations V searched against the start model on a balanced
    training subset (:func:`rat_tf.attacks.targeted_universal`);
(c) RAT fine-tuning of the start model on a small balanced subset (default 1,000 images)
    with that V (static, the paper; ``refresh_every`` > 0 searches V again every N epochs,
    from zero or, with ``refresh_passes`` > 0, continuing the current V);
(c') ``rat_fgsm``: RAT whose V, learnt online from random corners, starts a per-image FGSM
    step toward the runner-up class (``rat_init``, docs/method.md section 2b); on MNIST-like
    data each image's later starts are carried from its last FGSM example, plus a little
    uniform noise (``rat_carry``, ``rat_carry_noise``);
(d) FGSM-AT (random init) and PGD-AT baselines fine-tuned from the same start model on the
    same subset, for the same epochs;
(e) every model exported as a SavedModel and evaluated on held-out test images
    (:func:`rat_tf.evaluation.robustness_report`), side by side.

``budget`` presets (tiny | quick | small | full) set every size; single fields override them.
tiny: the smallest sizes, for tests and CI (static V); quick (MNIST and Fashion-MNIST, the
default): minutes on 2 CPU cores, every method fine-tuned on 10,000 images; small: sized for a
2-core CPU in hours (MNIST and
Fashion-MNIST with ``wide_mnist_cnn``; CIFAR-10 with ``fast_cifar_net`` pretrained on the
whole training set by the CIFAR-10 recipe: crop + flip, SGD with Nesterov momentum, one-cycle
schedule with warm-up, label smoothing, weight decay); full: paper-sized (GPU; CIFAR-10:
``resnet20``, 100 epochs of the recipe with a cosine schedule). docs/results.md gives the run
times.

MNIST RAT settings of small/full: the ``wide_mnist_cnn`` model; V radius 0.3; a start model
trained 3 epochs with a cosine schedule; one V per (source class, target) (``per_source``,
beyond the paper), searched again against the current model before every epoch, on the
fine-tuning subset (``refresh_every=1``, beyond the paper), with 3 search passes (small) or 5
(full); one random target per image; perturbed_fraction 0.5; 8 fine-tuning epochs (small) or 50
(full). The small presets of MNIST and CIFAR-10 evaluate on the whole test set, PGD on its
first 1,000 images (AutoAttack on the first 500 for MNIST, 1,000 for CIFAR-10).
docs/experiments.md holds the tuning runs behind these choices.

Result directory layout (``output_dir``)::

    config.json                  the resolved experiment config (a resume must match it)
    summary.json                 stage timings, training costs, the main numbers
    report.md / report.json      side-by-side robustness tables (+ training costs) / raw numbers
    accuracy_vs_radius.png       FGSM accuracy against radius, one line per model
    perturbations.png            V used in training, then V searched afresh against each model
    start/                       (a) model.keras, metrics.json, history.csv, logs/
    search/                      (b) perturbations.npz: V [K,H,W,C] + metadata (incl. the
                                 fingerprints of its images); perturbations.png; search.json
                                 (:func:`rat_tf.perturbation_files.write_search`)
    rat/ fgsm_at/ pgd_at/        (c)(d) model.keras, metrics.json, history.csv (rat: V used)
    saved_models/<model>/        (e) SavedModel of every classifier (serving_default, _uint8)
    evaluation/<model>.json|npz  (e) per-model report and the perturbations its evaluation
                                 found (a cache: reused on resume if the settings match)
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from rat_tf import attacks, data, evaluation, export, files, perturbation_files, trainers
from rat_tf import training
from rat_tf.experiment_presets import BUDGETS, PRESETS

FINETUNE_METHODS = ("rat", "rat_fgsm", "fgsm_at", "pgd_at", "standard")
# rat_fgsm: RAT whose V (learnt online from random corners) starts a per-image FGSM step
# toward the runner-up class, from V blurred by uniform noise of radius eps (docs/method.md);
# --rat_init, --rat_step_size, --rat_consistency, --rat_init_noise, --rat_step_loss,
# --rat_carry, --rat_carry_noise
RAT_FGSM = dict(targets_per_image="runner_up", per_source=False)
START = "start"

def budget_preset(dataset: str, budget: str) -> dict:
    """The preset of ``budget`` for ``dataset`` (a copy; "eval" holds evaluation settings)."""
    family = data.get_info(dataset).preset_family
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; choose one of {BUDGETS}")
    if family not in PRESETS:
        raise ValueError(f"dataset {dataset!r} has preset family {family!r}, which has no "
                         f"presets; choose one of {sorted(PRESETS)}")
    if budget not in PRESETS[family]:
        raise ValueError(f"budget {budget!r} has no preset for {dataset!r}; choose one of "
                         f"{sorted(PRESETS[family])}")
    preset = PRESETS[family][budget]
    return {**preset, "eval": dict(preset["eval"])}


@dataclasses.dataclass
class ExperimentConfig:
    """Settings of :func:`run`; fields left None come from the ``budget`` preset."""

    dataset: str = "mnist"
    budget: str = "quick"
    output_dir: str = "results/experiment"
    data_dir: str | None = None
    data_source: str = "auto"
    model: str | None = None
    seed: int = 0
    methods: tuple[str, ...] = ("rat", "rat_fgsm", "fgsm_at", "pgd_at")
    # (a) standard training of the start model
    pretrain_subset: int | None = None  # balanced subset size, 0 = the whole training set
    pretrain_epochs: int | None = None
    pretrain_batch_size: int | None = None
    pretrain_lr: float | None = None  # default 1e-3 (Adam)
    pretrain_optimizer: str | None = None  # default adam
    pretrain_lr_schedule: str | None = None  # default constant
    pretrain_warmup_epochs: float | None = None  # default 0
    pretrain_weight_decay: float | None = None  # default 0
    pretrain_label_smoothing: float | None = None  # default 0
    pretrain_augment: str | None = None  # default none
    # (b) targeted universal perturbations
    eps: float | None = None  # radius of V; None: the dataset's (data.DatasetInfo.eps)
    norm: str = "linf"
    search_method: str = "sgd"
    search_passes: int | None = None
    search_delta: float = 0.2
    # (c) RAT and (d) baselines, fine-tuned from the start model
    finetune_subset: int | None = None  # balanced; the same images for every method
    finetune_epochs: int | None = None
    finetune_batch_size: int | None = None
    finetune_lr: float | None = None  # default 5e-4 (Adam)
    refresh_every: int | None = None  # RAT: 0 = static V (the paper); default per preset
    refresh_passes: int | None = None  # RAT: >0 = each refresh continues V for N passes
    targets_per_image: str | None = None  # RAT: "one", "all" or "worst"; default per preset
    perturbed_fraction: float | None = None  # RAT: weight of the perturbed examples (0.5)
    batch_mode: str | None = None  # RAT: "append" (default) or "replace"
    per_source: bool | None = None  # RAT: one V per (source class, target); default per preset
    online: bool = False  # RAT: V updated online at every step, starting from the searched V
    online_step_size: float | None = None  # RAT: None: the trainer's default
    rat_init: str = "target"  # rat_fgsm: the start of its FGSM step (rat is the paper's)
    rat_step_size: float | None = None  # rat_fgsm: that step; default per preset, else eps
    rat_consistency: float | None = None  # rat_fgsm: that step's logit-consistency penalty
    rat_init_noise: float = 1.0  # rat_fgsm: uniform noise (x eps) added to its V start
    rat_step_loss: str = "auto"  # rat_fgsm: what its step climbs (trainers.STEP_LOSSES)
    rat_carry: str | None = None  # rat_fgsm: an image's start carried to its next step
    #                               (trainers.CARRY_MODES); default per preset, else none
    rat_carry_noise: float | None = None  # rat_fgsm: uniform noise (x eps) added to a carried
    #                                       start; default per preset (none without carry)
    adv_eps: float | None = None  # FGSM-AT / PGD-AT radius; None: DatasetInfo.adv_eps
    train_pgd_steps: int | None = None
    test_subset: int | None = None  # test images for the accuracy in each metrics.json
    # (e) evaluation: overrides of EvalSettings (None: budget preset, then dataset defaults)
    eval_overrides: dict = dataclasses.field(default_factory=dict)

    def resolved(self) -> "ExperimentConfig":
        """A copy with every None filled from the budget preset and the dataset defaults."""
        preset = budget_preset(self.dataset, self.budget)
        eval_preset = preset.pop("eval")
        defaults = dict(pretrain_lr=1e-3, pretrain_optimizer="adam",
                        pretrain_lr_schedule="constant", pretrain_warmup_epochs=0.0,
                        pretrain_weight_decay=0.0, pretrain_label_smoothing=0.0,
                        pretrain_augment="none", finetune_lr=5e-4, refresh_every=0,
                        refresh_passes=0,
                        targets_per_image="one", perturbed_fraction=0.5, batch_mode="append",
                        per_source=False, rat_consistency=0.0, rat_carry="none",
                        rat_carry_noise=0.0,
                        eps=data.get_info(self.dataset).eps,
                        adv_eps=data.get_info(self.dataset).adv_eps)
        values = dataclasses.asdict(self)
        if self.rat_carry_noise is None and self.rat_carry == "none":
            values["rat_carry_noise"] = 0.0  # a preset's noise blurs only the preset's carry
        for key, value in {**defaults, **preset}.items():
            if values.get(key) is None:
                values[key] = value
        values["methods"] = tuple(self.methods)
        values["eval_overrides"] = {**eval_preset, "tup_eps": values["eps"],
                                    "tup_norm": self.norm,
                                    **{k: v for k, v in self.eval_overrides.items()
                                       if v is not None}}
        for key in ("fgsm_eps", "pgd_eps"):  # radii given as strings (flags) become floats
            radii = values["eval_overrides"].get(key)
            if radii is not None:
                try:
                    values["eval_overrides"][key] = [float(e) for e in radii]
                except (TypeError, ValueError) as e:
                    raise ValueError(f"{key} must be a list of numbers, got {radii!r}") from e
        for key in ("n_test", "n_pgd", "aa_n"):  # 0 = every test image
            if values["eval_overrides"].get(key) == 0:
                values["eval_overrides"][key] = None
        out = ExperimentConfig(**values)
        out.validate()
        return out

    def validate(self) -> None:
        """Raise ValueError naming the first bad value of a resolved config."""
        info = data.get_info(self.dataset)
        k = info.num_classes
        bad = [m for m in self.methods if m not in FINETUNE_METHODS]
        if bad or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {FINETUNE_METHODS}, got "
                             f"{list(self.methods)}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods repeat: {list(self.methods)}")
        if self.finetune_subset < k or self.finetune_subset % k:
            raise ValueError(f"finetune_subset must be a positive multiple of the {k} classes, "
                             f"got {self.finetune_subset}")
        if self.pretrain_subset < 0 or self.pretrain_subset % k:
            raise ValueError(f"pretrain_subset must be 0 (all) or a multiple of the {k} "
                             f"classes, got {self.pretrain_subset}")
        for name in ("pretrain_epochs", "pretrain_batch_size", "finetune_epochs",
                     "finetune_batch_size", "search_passes", "train_pgd_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if int(self.refresh_every) < 0:
            raise ValueError(f"refresh_every must be >= 0 (0: static V), got {self.refresh_every}")
        # the pretraining and RAT stages' settings, checked now rather than after pretraining
        self.pretrain_config(self.output_dir).validate()
        self.train_config("rat", self.output_dir, **self._rat_settings()).validate()
        if "rat_fgsm" in self.methods:
            if self.rat_init not in ("class", "target"):
                raise ValueError(f"rat_fgsm learns V as the start of its FGSM step: rat_init "
                                 f"must be class or target, got {self.rat_init!r}")
            self.train_config("rat", self.output_dir,
                              **self._rat_settings("rat_fgsm")).validate()
        if not float(self.finetune_lr) > 0:
            raise ValueError(f"finetune_lr must be positive, got {self.finetune_lr}")
        if self.finetune_batch_size > self.finetune_subset:
            raise ValueError(f"finetune_batch_size {self.finetune_batch_size} exceeds the "
                             f"finetune_subset of {self.finetune_subset} images")
        if not self.output_dir:
            raise ValueError("output_dir must be set")
        self.eval_settings()  # validates the evaluation overrides

    def _rat_settings(self, method: str = "rat") -> dict:
        """The RAT-only TrainConfig fields of stage (c) for ``method`` (rat or rat_fgsm)."""
        rat = trainers.RATSettings.of(self)
        if method == "rat_fgsm":
            return dataclasses.replace(rat, online=False, **RAT_FGSM).asdict()
        return dict(refresh_every=self.refresh_every, refresh_passes=self.refresh_passes,
                    **dataclasses.replace(rat, rat_init="none", rat_step_size=None,
                                          rat_consistency=0.0, rat_init_noise=0.0,
                                          rat_step_loss="auto",
                                          rat_carry="none",
                                          rat_carry_noise=0.0).asdict())

    def pretrain_config(self, model_dir: str) -> training.TrainConfig:
        """The :class:`rat_tf.training.TrainConfig` of stage (a), the start model."""
        return self.train_config(
            "standard", model_dir, epochs=self.pretrain_epochs,
            batch_size=self.pretrain_batch_size, lr=self.pretrain_lr,
            optimizer=self.pretrain_optimizer, lr_schedule=self.pretrain_lr_schedule,
            warmup_epochs=self.pretrain_warmup_epochs, weight_decay=self.pretrain_weight_decay,
            label_smoothing=self.pretrain_label_smoothing, augment=self.pretrain_augment,
            train_subset=self.pretrain_subset)

    def eval_settings(self) -> evaluation.EvalSettings:
        """The evaluation settings of a resolved config (n_test / n_pgd None: every image)."""
        settings = evaluation.EvalSettings.for_dataset(self.dataset, seed=self.seed,
                                                       **self.eval_overrides)
        every = {k: None for k in ("n_test", "n_pgd", "aa_n")
                 if k in self.eval_overrides and self.eval_overrides[k] is None}
        return dataclasses.replace(settings, **every)

    def train_config(self, method: str, model_dir: str, **kwargs: Any) -> training.TrainConfig:
        """The :class:`rat_tf.training.TrainConfig` of a stage."""
        return training.TrainConfig(
            dataset=self.dataset, data_dir=self.data_dir, data_source=self.data_source,
            model=self.model, method=method, seed=self.seed, model_dir=model_dir,
            eps=self.eps, norm=self.norm, search_method=self.search_method,
            search_passes=self.search_passes, search_delta=self.search_delta,
            adv_eps=self.adv_eps, pgd_steps=self.train_pgd_steps,
            test_subset=self.test_subset or 0, **kwargs)


def _training_part(config: ExperimentConfig) -> dict:
    """The fields that decide the trained models (evaluation settings may change on resume)."""
    d = dataclasses.asdict(config)
    for key in ("eval_overrides", "output_dir", "data_dir", "data_source"):
        d.pop(key)
    d["methods"] = list(d["methods"])
    return d


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _check_resume(config: ExperimentConfig, out: str) -> None:
    """Refuse to resume into a directory made with different training settings."""
    path = os.path.join(out, "config.json")
    if os.path.isfile(path):
        old = _read_json(path).get("training")
        new = json.loads(json.dumps(_training_part(config)))
        if old is not None and old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ValueError(f"{out} holds an experiment with other training settings "
                             f"({', '.join(diff)}); use another output_dir or delete it")
    files.write_json(path, {"training": _training_part(config),
                       "config": dataclasses.asdict(config)})


def _stage(name: str, done: bool, timings: dict, fn, *args, **kwargs):
    """Run one stage unless ``done``; log and time it."""
    if done:
        logging.info("stage %s: outputs exist, skipped", name)
        timings[name] = "skipped (resumed)"
        return None
    logging.info("stage %s: start", name)
    t0 = time.time()
    result = fn(*args, **kwargs)
    timings[name] = round(time.time() - t0, 1)
    logging.info("stage %s: done in %.1fs", name, timings[name])
    return result


def _search(config: ExperimentConfig, classifier_path: str, out_dir: str,
            strategy: tf.distribute.Strategy, x_train: np.ndarray, y_train: np.ndarray) -> None:
    """Stage (b): V against the start model on the balanced fine-tuning subset; npz + png."""
    info = data.get_info(config.dataset)
    # The same balanced subset train() fine-tunes on (same function, size and seed).
    xs, ys = data.balanced_subset(x_train, y_train, config.finetune_subset // info.num_classes,
                                  config.seed)
    rat = config.train_config("rat", out_dir, **config._rat_settings())
    with strategy.scope():
        classifier = keras.models.load_model(classifier_path, compile=False)
    v, stats = attacks.targeted_universal(
        classifier, xs, ys, num_classes=info.num_classes, seed=config.seed, strategy=strategy,
        progress=True, **rat.search_settings(num_images=len(xs)).kwargs())
    report = perturbation_files.write_search(out_dir, v, stats, xs, class_names=info.class_names,
                                  settings={"dataset": config.dataset, "seed": config.seed})
    logging.info("V: mean targeted success %.3f on the %d search images after %d passes",
                 report["mean_success_search"], len(xs), stats["passes"])


def _export(model_path: str, saved_dir: str, x_check: np.ndarray) -> None:
    classifier = keras.models.load_model(model_path, compile=False)
    export.export_saved_model(classifier, saved_dir, overwrite=True)
    export.verify_export(saved_dir, classifier, x_check, atol=1e-4)


def _cached_report(path: str, settings: evaluation.EvalSettings, v: np.ndarray
                   ) -> evaluation.Report | None:
    """A per-model report saved by an earlier run with the same settings and the same V ``v``
    (of its "TUP given" measure), else None."""
    if not (os.path.isfile(path + ".json") and os.path.isfile(path + ".npz")):
        return None
    saved = _read_json(path + ".json")
    if saved.get("settings") != json.loads(json.dumps(settings.to_dict())):
        return None
    report = evaluation.Report(saved)
    with np.load(path + ".npz", allow_pickle=False) as f:
        report.arrays = {k: f[k] for k in f.files}
    given = report.arrays.get("tup_given")
    if given is not None and not np.array_equal(given, v):
        logging.info("%s was evaluated with another V: evaluating again", path)
        return None
    return report


def _part(report: evaluation.Report, measure: str, key: str) -> Any:
    """``report[measure][key]``, or None when the report has no such measure."""
    section = report.get(measure)
    return section[key] if section else None


def _training_table(metrics: dict[str, dict]) -> str:
    lines = ["\n## Training\n",
             "Fine-tuning starts from the `start` model; every method sees the same balanced "
             "subset for the same epochs. Seconds are wall time of `fit` on this machine.\n",
             "| model | method | train images | epochs | fit seconds | images/s | "
             "test acc. (metrics.json) |", "|---|---|---|---|---|---|---|"]
    for name, m in metrics.items():
        epochs = len(m.get("history", {}).get("epoch", [])) or m["config"]["epochs"]
        ips = m.get("images_per_sec")
        lines.append(f"| {name} | {m['config']['method']} | {m['train_images']} | {epochs} | "
                     f"{m['fit_seconds']:.1f} | {'-' if ips is None else f'{ips:.0f}'} | "
                     f"{100 * m['test_accuracy']:.1f} |")
    return "\n".join(lines) + "\n"


def run(config: ExperimentConfig, strategy: tf.distribute.Strategy | None = None) -> dict:
    """Run (or resume) the whole pipeline into ``config.output_dir``; return the summary."""
    config = config.resolved()
    strategy = strategy or tf.distribute.get_strategy()
    out = os.path.abspath(config.output_dir)
    os.makedirs(out, exist_ok=True)
    _check_resume(config, out)
    info = data.get_info(config.dataset)
    logging.info("experiment %s/%s (budget %s, model %s) into %s", config.dataset,
                 ",".join(config.methods), config.budget, config.model, out)
    timings: dict[str, Any] = {}
    start_dir = os.path.join(out, START)
    start_model = os.path.join(start_dir, "model.keras")
    v_path = os.path.join(out, "search", "perturbations.npz")
    t_all = time.time()
    # Read once, passed to every stage.
    train_data = data.load_arrays(config.dataset, "train", config.data_source, config.data_dir)
    test_data = data.load_arrays(config.dataset, "test", config.data_source, config.data_dir)
    splits = dict(train_data=train_data, test_data=test_data)

    # (a) the start model
    _stage("a_pretrain", os.path.isfile(start_model), timings, training.train,
           config.pretrain_config(start_dir), strategy, **splits)
    # (b) V against the start model
    _stage("b_search", os.path.isfile(v_path), timings, _search, config, start_model,
           os.path.dirname(v_path), strategy, *train_data)
    # (c) RAT and (d) baselines from the same start model, subset and epochs
    model_dirs = {START: start_dir}
    for method in config.methods:
        name = "standard_ft" if method == "standard" else method
        model_dir = os.path.join(out, name)
        model_dirs[name] = model_dir
        extra = {}
        if method == "rat":
            extra = dict(perturbations_path=v_path, **config._rat_settings())
        elif method == "rat_fgsm":
            extra = config._rat_settings(method)
        _stage(f"c_{name}", os.path.isfile(os.path.join(model_dir, "model.keras")), timings,
               training.train,
               config.train_config("rat" if method == "rat_fgsm" else method, model_dir,
                                   epochs=config.finetune_epochs,
                                   batch_size=config.finetune_batch_size, lr=config.finetune_lr,
                                   train_subset=config.finetune_subset, init_from=start_model,
                                   **extra), strategy, **splits)

    # (e) export, then evaluate the SavedModels side by side on held-out test images
    (x_train, y_train), (x_test, y_test) = train_data, test_data
    saved = {}
    for name, model_dir in model_dirs.items():
        saved[name] = os.path.join(out, "saved_models", name)
        _stage(f"e_export_{name}",
               os.path.isfile(os.path.join(saved[name], "saved_model.pb")), timings, _export,
               os.path.join(model_dir, "model.keras"), saved[name], x_test[:64])
    settings = config.eval_settings()
    reports: dict[str, evaluation.Report] = {}
    os.makedirs(os.path.join(out, "evaluation"), exist_ok=True)
    v_given = perturbation_files.load(v_path)[0]
    metrics = {name: _read_json(os.path.join(d, "metrics.json")) for name, d in model_dirs.items()}
    for name, path in saved.items():
        cache = os.path.join(out, "evaluation", name)
        report = _cached_report(cache, settings, v_given)
        if report is None:
            t0 = time.time()
            report = evaluation.robustness_report(
                path, x_test, y_test, x_search=x_train, y_search=y_train, perturbations=v_path,
                settings=settings, class_names=info.class_names, name=name,
                training=metrics[name])
            timings[f"e_evaluate_{name}"] = round(time.time() - t0, 1)
            files.write_json(cache + ".json", dict(report))
            np.savez_compressed(cache + ".npz", **report.arrays)
        else:
            timings[f"e_evaluate_{name}"] = "skipped (cached)"
        reports[name] = report
        logging.info("%s: clean %.3f, FGSM %s, PGD %s", name, report["clean_accuracy"],
                     report.get("fgsm_accuracy"), report.get("pgd_accuracy"))

    paths = evaluation.write_report(
        reports, out, title=f"Region adversarial training: {config.dataset}, budget "
                            f"{config.budget}", extra_markdown=_training_table(metrics),
        save_arrays=False)
    summary = {
        "dataset": config.dataset, "budget": config.budget, "model": config.model,
        "output_dir": out, "stages": timings, "wall_seconds": round(time.time() - t_all, 1),
        "files": {k: os.path.relpath(v, out) for k, v in paths.items()},
        "results": {name: {"clean": r["clean_accuracy"], "fgsm": r.get("fgsm_accuracy"),
                           "pgd": r.get("pgd_accuracy"), "num_test": r["num_test"],
                           "num_pgd": r.get("num_pgd"),
                           "tup_given": _part(r, "tup_given", "mean"),
                           "tup_fresh": _part(r, "tup_fresh", "mean"),
                           "uap": _part(r, "uap", "fooling_rate"),
                           "aa": _part(r, "autoattack", "robust_accuracy"),
                           "masking_flags": _part(r, "masking", "flags"),
                           "fit_seconds": metrics[name]["fit_seconds"]}
                    for name, r in reports.items()},
    }
    files.write_json(os.path.join(out, "summary.json"), summary)
    logging.info("experiment done in %.1fs; report: %s", summary["wall_seconds"],
                 paths["markdown"])
    return summary


__all__ = ["ExperimentConfig", "run", "budget_preset", "BUDGETS", "FINETUNE_METHODS"]
