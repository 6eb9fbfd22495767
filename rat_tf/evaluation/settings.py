"""The settings of a robustness report (:class:`EvalSettings`), its defaults and the
thresholds of the gradient-masking checks, and :class:`Report`."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np
import tensorflow as tf

from rat_tf import attacks, data, ops

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

ROUNDING = 1e-9  # accuracies are k / n: a difference equal to a threshold is not above it


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
    report, in order (:data:`MEASURES`). ``seed`` seeds the attacks' random starts.
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
        from rat_tf.evaluation.measures import MEASURES  # it imports this module

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
