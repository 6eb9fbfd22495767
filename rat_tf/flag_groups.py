"""The shared flag groups of the binaries (:mod:`rat_tf.cli` defines them): one :class:`Spec`
per flag name, the setting it means and its help, grouped by what the flags set."""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

from rat_tf import attacks, autoattack, data, distribute, evaluation, ops, trainers

DATA_SOURCES = ("auto", "files", "tfds")


@dataclasses.dataclass(frozen=True)
class Spec:
    """A shared flag: its kind and help, the field it sets in a target named otherwise (by the
    target's name), and whether the library default depends on the dataset."""

    kind: str
    help: str
    fields: Mapping[str, str] = dataclasses.field(default_factory=dict)
    values: Sequence[str] | None = None
    unset: str | None = None  # what None means in the library
    per_dataset: bool = False  # unset (None): the dataset's (rat_tf.data.DATASETS)
    zero_is_all: bool = False  # 0: every test image (the library's None)
    lower_bound: float | None = None


DATASET_FLAG = {"dataset": Spec("enum", "Dataset (rat_tf.data.DATASETS).",
                                fields={"load_arrays": "name"}, values=tuple(data.DATASETS))}


DATA_FLAGS = {
    "data_dir": Spec("string", "Folder holding the dataset files.",
                     unset=f"${data.ENV_DATA_DIR}"),
    "verify_checksums": Spec("bool", "Check every data file read against its official md5 (a "
                             "file that differs is an error naming it).",
                             fields={"set_verify_checksums": "verify"}),
    "data_source": Spec("enum", "Where the data comes from: the standard files below "
                        "--data_dir (auto, files) or tensorflow_datasets (tfds, which may "
                        "download).", fields={"load_arrays": "source"}, values=DATA_SOURCES),
}


SEARCH_FLAGS = {  # the targeted universal search of V (attacks.SearchSettings)
    "eps": Spec("float", "Radius xi of V.", per_dataset=True),
    "norm": Spec("enum", "Norm of V (and of the FGSM-AT / PGD-AT attacks where they are "
                 "trained).",
                 values=tuple(ops.NORMS)),
    "search_method": Spec("enum", "Search method of V.", fields={"SearchSettings": "method"},
                          values=tuple(attacks.TU_METHODS)),
    "search_passes": Spec("integer", "Maximum passes of the V search over its images.",
                          fields={"SearchSettings": "max_passes"}, lower_bound=1),
    "search_delta": Spec("float", "The V search stops a target once its success reaches "
                         "1 - delta.", fields={"SearchSettings": "delta"}),
    "search_step_size": Spec("float", "Step size of the V search.",
                             fields={"SearchSettings": "step_size"},
                             unset="eps/10 for sgd, eps/5 otherwise"),
    "search_inner_steps": Spec("integer", "Inner FGSM steps per image of the V search "
                               "(batched, reference).", fields={"SearchSettings": "inner_steps"},
                               lower_bound=1),
    "per_source": Spec("bool", "One V per (source class, target), V [K,K,H,W,C], instead of "
                       "one per target."),
}


RAT_FLAGS = {
    "refresh_every": Spec("integer", "RAT: search V again every N epochs (0: static V, the "
                          "paper).", lower_bound=0),
    "refresh_passes": Spec("integer", "RAT: passes of each refresh of V, continuing the "
                           "current V (0: search from zero with --search_passes).",
                           lower_bound=0),
    "targets_per_image": Spec("enum", "RAT: one random target per image, all K-1, or the worst "
                              "(highest-loss) one.", values=tuple(trainers.TARGET_MODES)),
    "perturbed_fraction": Spec("float", "RAT: weight of the perturbed examples in the loss "
                               "(append), or the probability that an image is swapped for its "
                               "perturbed copy (replace)."),
    "batch_mode": Spec("enum", "RAT: append the perturbed copies to the clean batch, or replace "
                       "images by them (the cost of a standard step).",
                       values=tuple(trainers.BATCH_MODES)),
    "online": Spec("bool", "RAT: update V online at every training step (it starts from "
                   "--perturbations_path if given, else from a search at the start)."),
    "online_step_size": Spec("float", "RAT: step size of the online V update (also of V "
                             "under --rat_init).", unset="eps / 10"),
    "rat_init": Spec("enum", "RAT: none trains on clip(x + V[t]) (the paper); class / target "
                     "start a per-image FGSM step at V[y] / V[t] (V[y, t] with --per_source) "
                     "and learn V from its gradient; zero / random start it at 0 / uniform.",
                     values=tuple(trainers.RAT_INITS)),
    "rat_step_size": Spec("float", "RAT: the FGSM step from the --rat_init start.",
                          unset="eps; 1.25 eps from random"),
    "rat_consistency": Spec("float", "RAT: weight of the logit-consistency penalty of the "
                            "--rat_init step (FGSM-UAP: 10)."),
    "rat_init_noise": Spec("float", "RAT: radius, in units of eps, of the uniform noise added "
                           "to the V start of the --rat_init step (class / target)."),
    "rat_step_loss": Spec("enum", "RAT: what the --rat_init step climbs: ce (the true-class "
                          "cross-entropy), margin (z_t - z_y toward the chosen target) or auto "
                          "(margin when a target is chosen, else ce).",
                          values=tuple(trainers.STEP_LOSSES)),
    "rat_carry": Spec("enum", "RAT: where an image's next --rat_init step starts: none (the "
                      "--rat_init start every time), last (where its last FGSM example "
                      "ended) or last_step (one step further, up the input gradient of the "
                      "weight update's loss).", values=tuple(trainers.CARRY_MODES)),
    "rat_carry_noise": Spec("float", "RAT: radius, in units of eps, of the uniform noise added "
                            "to a carried start (--rat_carry)."),
}


RECIPE_FLAGS = {  # the training recipe beyond optimizer and learning rate
    "augment": Spec("enum", "Augmentation of the training batches (crop_flip: random crop "
                    "of the 4-pixel reflect-padded image and horizontal flip).",
                    values=tuple(data.AUGMENTATIONS)),
    "warmup_epochs": Spec("float", "Linear learning-rate warm-up from 0 (lr_schedule cosine "
                          "or onecycle).", lower_bound=0),
    "weight_decay": Spec("float", "Decoupled weight decay of conv and dense kernels: every "
                         "step w -= lr * weight_decay * w.", lower_bound=0),
    "label_smoothing": Spec("float", "Label smoothing of the cross-entropy, in [0, 1)."),
    "ema_momentum": Spec("float", "Momentum of a moving average of the trainable weights that "
                         "becomes the saved model, in [0, 1) (0: none; FGSM-UAP: 0.999).",
                         lower_bound=0),
    "test_every": Spec("integer", "Test accuracy every N epochs, into history.csv (0: at the "
                       "end only).", lower_bound=0),
}


ADV_FLAGS = {  # the attack of FGSM-AT / PGD-AT training
    "adv_eps": Spec("float", "FGSM-AT / PGD-AT radius.", per_dataset=True),
    "adv_steps": Spec("integer", "PGD-AT steps.", lower_bound=1,
                      fields={"TrainConfig": "pgd_steps", "ExperimentConfig": "train_pgd_steps"}),
    "adv_step_size": Spec("float", "FGSM-AT / PGD-AT step size.",
                          fields={"TrainConfig": "pgd_step_size"},
                          unset="1.25 eps for FGSM-AT, 2.5 eps / steps for PGD-AT"),
    "adv_init_scale": Spec("float", "FGSM-AT: the random start is uniform in the ball of "
                           "radius adv_init_scale * eps (1: FGSM-RS; 2: N-FGSM).",
                           lower_bound=0),
    "adv_box_start": Spec("bool", "FGSM-AT: take the gradient at the random start clipped to "
                          "the pixel box (N-FGSM, Wong et al.'s CIFAR code), not at the "
                          "unclipped start (Wong et al.'s MNIST code)."),
    "adv_project": Spec("bool", "FGSM-AT: project the step back to the eps ball (FGSM-RS); "
                        "--noadv_project for N-FGSM."),
    "adv_freeze_fooled": Spec("bool", "PGD-AT: an example stops moving once the model gets "
                              "it wrong (Wong et al.'s MNIST PGD training)."),
    "early_stop_drop": Spec("float", "Stop training when the PGD accuracy on held-out "
                            "training images falls this far below its best (Wong et al.'s "
                            "guard against catastrophic overfitting), keeping the best "
                            "weights (0: off).", lower_bound=0),
    "early_stop_images": Spec("integer", "Training images held out (not trained on) for "
                              "--early_stop_drop's check.", lower_bound=1),
}


STRATEGY_FLAGS = {
    "strategy": Spec("enum", "tf.distribute strategy.", fields={"get_strategy": "name"},
                     values=tuple(distribute.STRATEGIES)),
    "num_cpu_devices": Spec("integer", "Split the CPU into N logical devices (strategy "
                            "mirrored).", lower_bound=0),
    "tpu": Spec("string", "TPU name or address (strategy tpu)."),
}


COMPUTE_FLAGS = {
    "precision": Spec("enum", "Keras dtype policy (mixed_*: half-precision compute, float32 "
                      "variables and logits).", values=tuple(distribute.PRECISIONS)),
    "jit_compile": Spec("bool", "XLA-compile the compiled steps."),
}


EVAL_FLAGS = {  # one per evaluation.EvalSettings field, named as the field
    "measures": Spec("list", "Measures of the report, in order, from "
                     f"{', '.join(evaluation.MEASURES)}."),
    "n_test": Spec("integer", "Test images used: the first N of the test split (0: all).",
                   fields={"TrainConfig": "test_subset"}, zero_is_all=True, lower_bound=0),
    "fgsm_eps": Spec("list", "FGSM radii (L-inf).", per_dataset=True),
    "pgd_eps": Spec("list", "PGD radii (L-inf).", per_dataset=True),
    "pgd_steps": Spec("integer", "PGD steps.", lower_bound=1),
    "pgd_restarts": Spec("integer", "PGD random restarts.", lower_bound=1),
    "pgd_step_size": Spec("float", "PGD step size.", unset="2.5 eps / steps"),
    "n_pgd": Spec("integer", "PGD on the first N test images used (0: all).", unset="all",
                  zero_is_all=True, lower_bound=0),
    "class_eps": Spec("float", "FGSM radius of the per-class breakdown.", per_dataset=True),
    "tup_eps": Spec("float", "Radius of the fresh targeted universal perturbations (TUP).",
                    per_dataset=True),
    "tup_norm": Spec("enum", "Norm of the universal perturbations.", values=tuple(ops.NORMS)),
    "tup_method": Spec("enum", "Search method of the fresh TUP.",
                       values=tuple(attacks.TU_METHODS)),
    "tup_passes": Spec("integer", "Maximum passes of the fresh TUP search.", lower_bound=1),
    "tup_delta": Spec("float", "The fresh TUP search stops a target at 1 - delta success."),
    "tup_step_size": Spec("float", "Step size of the fresh TUP search.",
                          unset="the search's, as --search_step_size"),
    "tup_n_per_class": Spec("integer", "Training images per class the fresh TUP search runs "
                            "on.", lower_bound=1),
    "tup_batch_size": Spec("integer", "Images per step of the fresh TUP search.", lower_bound=1),
    "uap_eps": Spec("float", "Radius of the untargeted universal perturbation.",
                    unset="--tup_eps"),
    "uap_passes": Spec("integer", "Passes of the untargeted universal search.", lower_bound=1),
    "aa_eps": Spec("float", "AutoAttack radius.", unset="the largest --pgd_eps"),
    "aa_n": Spec("integer", "AutoAttack on the first N test images used (0: all).",
                 zero_is_all=True, lower_bound=0),
    "aa_steps": Spec("integer", "AutoAttack: APGD and FAB steps.", lower_bound=1),
    "aa_queries": Spec("integer", "AutoAttack: Square queries.", lower_bound=1),
    "aa_restarts": Spec("integer", "AutoAttack: random restarts of APGD-CE (and APGD-DLR); "
                        "APGD-T and FAB-T run once per target class.", lower_bound=1),
    "aa_attacks": Spec("list", "AutoAttack's attacks, from "
                       f"{', '.join(autoattack.ATTACKS)}.", unset="the --aa_version's"),
    "aa_version": Spec("enum", "AutoAttack version (its sequence of attacks).",
                       values=tuple(autoattack.VERSIONS)),
    "masking_steps": Spec("integer", "Gradient-masking check: PGD steps at the radius of the "
                          "whole pixel box.", lower_bound=1),
    "masking_n": Spec("integer", "Gradient-masking check: test images.", lower_bound=1),
    "masking_fgsm_share": Spec("float", "Gradient-masking check: flag FGSM far above PGD or "
                               "AutoAttack at a radius when it costs at most this share of "
                               "the accuracy they cost."),
    "masking_train_gap": Spec("float", "Gradient-masking check: flag a final training "
                              "adversarial accuracy (the run's metrics.json) above "
                              "held-out PGD at the training radius by more than this."),
    "batch_size": Spec("integer", "Evaluation batch size.", lower_bound=1),
    "seed": Spec("integer", "Seed of the random starts and searches."),
}
