"""Adversarial training: FGSM-AT (FGSM-RS, N-FGSM) and PGD-AT as a trainer,
:class:`AdversarialTrainingModel`."""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from rat_tf import attacks, ops
from rat_tf.standard_trainer import SERIALIZABLE, StandardModel

ATTACK_OF = {"fgsm_at": "fgsm", "pgd_at": "pgd"}  # the registered attack of each AT method

FGSM_RS_ALPHA = 1.25  # Wong et al. (2020): FGSM step = 1.25 eps from a uniform random start


@SERIALIZABLE
class AdversarialTrainingModel(StandardModel):
    """FGSM-AT with random init (Wong et al. 2020; N-FGSM, de Jorge et al. 2022) or PGD-AT
    (Madry et al. 2018).

    Each step replaces the batch by adversarial examples computed against the current
    weights and trains on them with their true labels: ``attacks.fgsm`` from a uniform start
    in the ball of radius ``init_scale * eps`` with step ``step_size`` (1.25 eps), its
    gradient taken at the unclipped start unless ``box_start`` (Wong et al.'s MNIST code) and
    the result projected to the eps ball unless ``project=False`` (N-FGSM: ``init_scale=2``,
    ``step_size=eps``, ``project=False``, ``box_start=True``); or ``attacks.pgd`` from a random
    start, each example frozen once misclassified with ``freeze_fooled`` (Wong et al.'s MNIST
    PGD training; ``init_scale``, ``box_start`` and ``project`` are FGSM-AT settings). The random
    starts
    are drawn per step from the seed for the global batch, so runs are reproducible and match
    across strategies. In the training logs the compiled metrics (and
    ``adversarial_accuracy``) are on the adversarial batch the step fits; validation is clean.
    """

    def __init__(self, classifier: keras.Model, method: str = "pgd_at", *, eps: float = 0.3,
                 norm: str = "linf", steps: int = 10, step_size: float | None = None,
                 init_scale: float = 1.0, box_start: bool = False, project: bool = True,
                 freeze_fooled: bool = False, name: str | None = None, **kwargs):
        checked = self.check_settings(method=method, eps=eps, norm=norm, steps=steps,
                                      step_size=step_size, init_scale=init_scale)
        super().__init__(classifier, name=name or f"{method}_trainer", **kwargs)
        self.eps, self.steps, self.step_size = checked
        self.method, self.norm = method, ops.check_norm(norm)
        self.init_scale, self.box_start = float(init_scale), bool(box_start)
        self.project, self.freeze_fooled = bool(project), bool(freeze_fooled)
        self.adversarial_accuracy = keras.metrics.SparseCategoricalAccuracy(
            name="adversarial_accuracy")

    @staticmethod
    def check_settings(*, method: str = "pgd_at", eps: float = 0.3, norm: str = "linf",
                       steps: int = 10, step_size: float | None = None,
                       init_scale: float = 1.0, box_start: bool = False, project: bool = True,
                       freeze_fooled: bool = False) -> tuple[float, int, float]:
        """(eps, steps, step size) of valid settings; ValueError naming the first bad one."""
        del box_start, project, freeze_fooled  # any bool is valid
        if method not in ("fgsm_at", "pgd_at"):
            raise ValueError(f"adversarial training method must be fgsm_at or pgd_at, got "
                             f"{method!r}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        if not (init_scale > 0 and math.isfinite(init_scale)):
            raise ValueError(f"init_scale must be positive, got {init_scale}")
        ops.check_norm(norm)
        if method == "fgsm_at":
            steps = 1
            step_size = step_size or FGSM_RS_ALPHA * eps
        if int(steps) < 1:
            raise ValueError(f"PGD steps must be >= 1, got {steps}")
        size = float(attacks.pgd_step_size(float(eps), int(steps), step_size or None))
        if not size > 0:
            raise ValueError(f"step_size must be positive, got {step_size}")
        return float(eps), int(steps), size

    def get_config(self) -> dict:
        return {**super().get_config(), "method": self.method, "eps": self.eps,
                "norm": self.norm, "steps": self.steps, "step_size": self.step_size,
                "init_scale": self.init_scale, "box_start": self.box_start,
                "project": self.project, "freeze_fooled": self.freeze_fooled}

    def adversarial_batch(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """Adversarial examples of (x, y) against the current weights (inference mode)."""
        model_fn = lambda z: self.logits(z, training=False)  # noqa: E731
        radius = self.eps * (self.init_scale if self.method == "fgsm_at" else 1.0)
        start = self._global_draw(2, tf.shape(x), lambda shape, seed: ops.random_in_ball(
            shape, radius, self.norm, seed, x.dtype))
        attack = attacks.get_attack(ATTACK_OF[self.method]).fn
        if self.method == "fgsm_at":
            x_adv = attack(model_fn, x, y, self.eps, norm=self.norm, rand_init=True,
                           step_size=self.step_size, init=start, init_scale=self.init_scale,
                           box_start=self.box_start, project=self.project,
                           clip_values=self.clip_values)
        else:
            x_adv = attack(model_fn, x, y, self.eps, step_size=self.step_size,
                           steps=self.steps, norm=self.norm, rand_init=True, restarts=1,
                           init=start, freeze_fooled=self.freeze_fooled,
                           clip_values=self.clip_values)
        return tf.stop_gradient(tf.cast(x_adv, x.dtype))

    def train_step(self, data):
        x, y, sw = self._unpack(data)
        x_adv = self.adversarial_batch(x, y)
        outputs = self._fit_on(x_adv, y, sw)
        self.compute_metrics(x_adv, y, outputs, sw)
        self.adversarial_accuracy.update_state(y, outputs, sample_weight=sw)
        return self._results(self.adversarial_accuracy)

    def settings(self) -> dict:
        out = {**super().settings(), "eps": self.eps, "norm": self.norm, "steps": self.steps,
               "step_size": self.step_size}
        if self.method == "fgsm_at":
            out.update(init_scale=self.init_scale, box_start=self.box_start,
                       project=self.project)
        else:
            out.update(freeze_fooled=self.freeze_fooled)
        return out
