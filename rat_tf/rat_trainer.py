"""RAT as a Keras model: :class:`RATModel` and its settings (:class:`RATSettings`).

The paper's RAT fine-tunes on clean images mixed with clip(x + V[t]); ``rat_init`` makes V the
start of a per-image FGSM step instead (docs/method.md, sections 2 and 2b).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import keras
import numpy as np
import tensorflow as tf

from rat_tf import ops, perturbation_files
from rat_tf.adversarial_trainer import FGSM_RS_ALPHA
from rat_tf.standard_trainer import SERIALIZABLE, StandardModel, replicas

TARGET_MODES = ("one", "all", "worst", "runner_up")  # RAT targets per image per step
BATCH_MODES = ("append", "replace")
RAT_INITS = ("none", "zero", "random", "class", "target")  # what V is to a RAT step
STEP_LOSSES = ("auto", "ce", "margin")  # what the FGSM step of a rat_init step climbs
CARRY_MODES = ("none", "last", "last_step")  # what an image's next rat_init start is


@dataclasses.dataclass(frozen=True)
class RATSettings:
    """The RAT settings of :class:`RATModel` beyond V, its radius and norm: the one list of
    them that the trainer, ``TrainConfig``, ``ExperimentConfig`` and the flags share."""

    targets_per_image: str = "one"  # TARGET_MODES
    perturbed_fraction: float = 0.5
    batch_mode: str = "append"  # BATCH_MODES
    per_source: bool = False  # V[s, t] instead of V[t]
    online: bool = False  # rat_init "none": V learnt at every step
    online_step_size: float | None = None  # the step of V when learnt; None: eps / 10
    rat_init: str = "none"  # RAT_INITS: "none" trains on clip(x + V[t]); else V starts FGSM
    rat_step_size: float | None = None  # the FGSM step from the start; None: eps (1.25 eps
    #                                     from a random start)
    rat_consistency: float = 0.0  # weight of the logit-consistency penalty (FGSM-UAP: 10)
    rat_init_noise: float = 0.0  # uniform noise of this radius (x eps) added to a V start
    rat_step_loss: str = "auto"  # STEP_LOSSES: "auto": the margin z_t - z_y when a target
    #                              is chosen, else the cross-entropy of the true class
    rat_carry: str = "none"  # CARRY_MODES: "last": an image starts where its last FGSM
    #                          example ended; "last_step": one step of the weight update's
    #                          input gradient further
    rat_carry_noise: float = 0.0  # uniform noise of this radius (x eps) added to a carried start

    @property
    def chooses_target(self) -> bool:
        """Whether a ``rat_init`` step picks a target class per image."""
        return self.rat_init == "target" or (
            self.rat_init in ("zero", "random")
            and self.targets_per_image in ("runner_up", "worst"))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The setting names, in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def of(cls, source: Any) -> "RATSettings":
        """The settings read off the same-named attributes of ``source`` (a config)."""
        return cls(**{n: getattr(source, n) for n in cls.names()})

    def asdict(self) -> dict:
        """The settings as keyword arguments of :class:`RATModel`."""
        return dataclasses.asdict(self)

    def check(self, eps: float | None = None, norm: str = "linf") -> None:
        """Raise ValueError naming the first bad setting (``eps``: V's radius, if known)."""
        if self.targets_per_image not in TARGET_MODES:
            raise ValueError(f"targets_per_image must be one of {TARGET_MODES}, got "
                             f"{self.targets_per_image!r}")
        if self.batch_mode not in BATCH_MODES:
            raise ValueError(f"batch_mode must be one of {BATCH_MODES}, got "
                             f"{self.batch_mode!r}")
        if self.rat_init not in RAT_INITS:
            raise ValueError(f"rat_init must be one of {RAT_INITS}, got {self.rat_init!r}")
        if self.rat_step_loss not in STEP_LOSSES:
            raise ValueError(f"rat_step_loss must be one of {STEP_LOSSES}, got "
                             f"{self.rat_step_loss!r}")
        if self.rat_carry not in CARRY_MODES:
            raise ValueError(f"rat_carry must be one of {CARRY_MODES}, got {self.rat_carry!r}")
        if self.batch_mode == "replace" and self.targets_per_image == "all":
            raise ValueError("batch_mode 'replace' swaps an image for ONE perturbed copy: use "
                             "targets_per_image 'one', 'worst' or 'runner_up'")
        if not 0.0 <= float(self.perturbed_fraction) <= 1.0:
            raise ValueError(f"perturbed_fraction must be in [0, 1], got "
                             f"{self.perturbed_fraction}")
        if eps is not None:
            ops.check_radius(eps)
        ops.check_norm(norm)
        if self.online and eps is None:
            raise ValueError("online=True needs eps, the radius V is projected onto")
        if self.online and float(self.perturbed_fraction) == 0.0:
            raise ValueError("online=True with perturbed_fraction 0 never uses V: raise the "
                             "fraction or drop online")
        for name in ("online_step_size", "rat_step_size"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(float(value)) and float(value) > 0):
                raise ValueError(f"{name} must be positive, got {value}")
        for name in ("rat_consistency", "rat_init_noise", "rat_carry_noise"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.rat_init == "none":
            if (self.rat_step_size is not None or self.rat_consistency or self.rat_init_noise
                    or self.rat_step_loss != "auto" or self.rat_carry != "none"):
                raise ValueError("rat_step_size, rat_consistency, rat_init_noise, "
                                 "rat_step_loss and rat_carry are settings of an FGSM step "
                                 "from V: set rat_init (class, target, zero or random)")
            return
        if self.rat_step_loss == "margin" and not self.chooses_target:
            raise ValueError(f"rat_step_loss 'margin' steps toward a target: rat_init 'target',"
                             f" or targets_per_image 'runner_up' / 'worst' with rat_init "
                             f"'zero' / 'random' (got rat_init={self.rat_init!r}, "
                             f"targets_per_image={self.targets_per_image!r})")
        if self.rat_carry_noise and self.rat_carry == "none":
            raise ValueError("rat_carry_noise blurs a carried start: set rat_carry (last or "
                             "last_step)")
        if self.rat_init_noise and self.rat_init not in ("class", "target"):
            raise ValueError(f"rat_init_noise blurs a V start: rat_init 'class' or 'target', "
                             f"got {self.rat_init!r}")
        if eps is None:
            raise ValueError(f"rat_init={self.rat_init!r} needs eps, the radius of the step")
        if self.targets_per_image == "all":
            raise ValueError(f"rat_init={self.rat_init!r} starts one step per image: "
                             f"targets_per_image 'all' does not apply")
        if self.rat_init == "class" and self.per_source:
            raise ValueError("rat_init='class' uses V[y], one row per true class: per_source "
                             "(V[s, t]) needs rat_init='target'")
        if self.online:
            raise ValueError(f"rat_init={self.rat_init!r} learns V from its own step: drop "
                             f"online (that is rat_init 'none''s online update)")


@SERIALIZABLE
class RATModel(StandardModel):
    """Region adversarial training: fine-tune on clean images mixed with clip(x + V[t]).

    ``perturbations`` V [K,H,W,C] is a non-trainable variable (checkpointed, saved in the
    ``.keras`` file, identical on all replicas); ``eps`` (optional) is its radius, checked
    whenever V is set. Each step every image gets one random target t != label
    (``targets_per_image="one"``) or all K-1 targets (``"all"``); perturbed copies keep the
    TRUE label. ``"worst"`` (beyond the paper; worst-of-k as in Engstrom et al. 2019) gives each
    image the one target whose perturbed copy has the highest loss under the current weights
    (K-1 extra inference passes, no gradient through the choice). ``batch_mode="append"``
    trains on the clean batch plus its perturbed copies with the loss
    ``(1 - perturbed_fraction) * CE(clean) + perturbed_fraction * CE(perturbed)``;
    ``"replace"`` (one target per image) swaps each image for its perturbed copy with
    probability ``perturbed_fraction``, so a step costs what a standard step costs. Sample
    weights follow each image to its perturbed copies. ``per_source=True`` (beyond the paper)
    holds one perturbation per (source class, target), V [K,K,H,W,C]: an image of label s gets
    V[s, t] (see :func:`rat_tf.attacks.targeted_universal`).

    V stays fixed (static, the paper) unless a callback searches it again
    (:class:`rat_tf.callbacks.RefreshPerturbations`) or ``online=True`` (beyond the paper, in
    the spirit of universal adversarial training, Shafahi et al. 2020): then every step also
    moves the V rows used in the batch by one projected signed (L-inf) or normalised (L2)
    step of ``online_step_size`` (default eps / 10) that lowers the cross-entropy of each
    perturbed copy toward its target, computed from the training forward pass (one extra
    input gradient), summed over replicas so V stays identical on all of them; it needs
    ``eps``. ``fit`` refuses to start without a V unless V is learnt (online or by a callback).

    ``rat_init`` other than "none" (beyond the paper) makes V the START of a per-image FGSM
    step, as FGSM-UAP (Pan et al. 2024) does with one V per true class: each image starts at
    x + V[y] ("class"), x + V[t] or x + V[y, t] with ``per_source`` ("target", t from
    ``targets_per_image``: random, "runner_up" (the most likely wrong class) or "worst"), or
    at zero / uniform in the ball ("zero", "random": the ablation's FGSM and FGSM-RS, toward
    the runner-up or worst class if ``targets_per_image`` names one), takes one signed step
    of ``rat_step_size`` up the true-class cross-entropy (with a target: up the logit margin
    z_t - z_y; ``rat_step_loss`` "ce" / "margin" chooses), is projected to the eps ball and
    trained on alone, with its TRUE label, plus ``rat_consistency`` times the mean squared
    logit change from the start (FGSM-UAP's penalty; the start's forward pass then runs in
    training mode, as the adversarial one). The same input gradient moves each V row used,
    as the online update does (step ``online_step_size``). V starts as given, else at random
    corners of the ball; ``rat_init_noise`` adds uniform noise of that radius (in eps) to
    each V start.
    ``rat_carry`` (beyond the paper, as ATTA (Zheng et al. 2020) and FGSM-PGI (Jia et al.
    2022) carry a per-image perturbation across epochs) starts an image seen before where its
    last FGSM example ended ("last"), or one step of ``rat_step_size`` further up the input
    gradient of the weight update's own loss ("last_step": its backward pass also takes the
    input gradient), plus uniform noise of radius ``rat_carry_noise`` (in eps) projected back
    to the ball; its first start is the ``rat_init`` one. It keeps a [``carry_images``, H, W, C]
    variable and needs each image's index in [0, ``carry_images``): fit on batches
    ``({"image": x, "index": i}, y)`` (:func:`rat_tf.training.train_stream` with
    ``with_index=True``).
    The logs add ``adversarial_accuracy``, on the batch the step fits.
    """

    method = "rat"

    def __init__(self, classifier: keras.Model, perturbations: np.ndarray | None = None, *,
                 targets_per_image: str = "one", perturbed_fraction: float = 0.5,
                 batch_mode: str = "append", per_source: bool = False,
                 eps: float | None = None, norm: str = "linf", online: bool = False,
                 online_step_size: float | None = None, rat_init: str = "none",
                 rat_step_size: float | None = None, rat_consistency: float = 0.0,
                 rat_init_noise: float = 0.0, rat_step_loss: str = "auto",
                 rat_carry: str = "none", rat_carry_noise: float = 0.0,
                 carry_images: int = 0, **kwargs):
        super().__init__(classifier, **kwargs)
        rat = RATSettings(targets_per_image=targets_per_image,
                          perturbed_fraction=float(perturbed_fraction), batch_mode=batch_mode,
                          per_source=bool(per_source), online=bool(online),
                          online_step_size=None if online_step_size is None
                          else float(online_step_size), rat_init=rat_init,
                          rat_step_size=None if rat_step_size is None else float(rat_step_size),
                          rat_consistency=float(rat_consistency),
                          rat_init_noise=float(rat_init_noise), rat_step_loss=rat_step_loss,
                          rat_carry=rat_carry, rat_carry_noise=float(rat_carry_noise))
        rat.check(eps=eps, norm=norm)
        self.carry_images = int(carry_images)
        if rat.rat_carry != "none" and self.carry_images < 1:
            raise ValueError(f"rat_carry={rat.rat_carry!r} keeps one start per training image: "
                             f"set carry_images to the number of training images, got "
                             f"{carry_images}")
        self.rat = rat
        self.targets_per_image, self.batch_mode = rat.targets_per_image, rat.batch_mode
        self.perturbed_fraction, self.per_source = rat.perturbed_fraction, rat.per_source
        self.online, self.online_step_size = rat.online, rat.online_step_size
        self.rat_init, self.rat_consistency = rat.rat_init, rat.rat_consistency
        self.eps, self.norm = (None if eps is None else float(eps)), ops.check_norm(norm)
        rows = (self.num_classes,) * (2 if self.per_source else 1)
        self.perturbations = self.add_weight(
            name="perturbations", shape=(*rows, *self.image_shape),
            initializer="zeros", trainable=False, aggregation="only_first_replica")
        self.perturbed_accuracy = keras.metrics.SparseCategoricalAccuracy(
            name="perturbed_accuracy")
        if self.starts_fgsm:
            self.adversarial_accuracy = keras.metrics.SparseCategoricalAccuracy(
                name="adversarial_accuracy")
            self.consistency_loss = keras.metrics.Mean(name="consistency_loss")
            if perturbations is None and self.learns_start:
                perturbations = self.random_corners()
        if perturbations is not None:
            self.set_perturbations(perturbations)
        if self.carries:  # each image's next start, and whether it has one yet
            self.carried_starts = self.add_weight(
                name="carried_starts", shape=(self.carry_images, *self.image_shape),
                initializer="zeros", trainable=False, aggregation="only_first_replica")
            self.carried = self.add_weight(
                name="carried", shape=(self.carry_images,), initializer="zeros",
                trainable=False, aggregation="only_first_replica")

    @property
    def carries(self) -> bool:
        """Whether an image's start is carried from its last step (``rat_carry``)."""
        return self.rat.rat_carry != "none"

    @property
    def starts_fgsm(self) -> bool:
        """Whether a step is FGSM from a start (``rat_init`` other than "none")."""
        return self.rat_init != "none"

    @property
    def learns_start(self) -> bool:
        """Whether V is the start of the FGSM step, learnt from its gradient."""
        return self.rat_init in ("class", "target")

    @property
    def rat_step_size(self) -> float | None:
        """The FGSM step from the start (None for rat_init "none")."""
        if not self.starts_fgsm:
            return None
        if self.rat.rat_step_size is not None:
            return self.rat.rat_step_size
        return self.eps * (FGSM_RS_ALPHA if self.rat_init == "random" else 1.0)

    def random_corners(self) -> np.ndarray:
        """A V of random signs times eps (L-inf; L2: a random direction of norm eps), drawn
        from the seed: the start V learns from when none is given, as FGSM-UAP's."""
        rng = np.random.default_rng(self.seed)
        shape = tuple(self.perturbations.shape)
        v = rng.choice(np.float32([-1.0, 1.0]), size=shape)
        if self.norm == "l2":
            axes = tuple(range(len(shape) - len(self.image_shape), len(shape)))
            v = v / np.sqrt(np.sum(v * v, axis=axes, keepdims=True))
        return (np.float32(self.eps) * v * np.float32(1 - 1e-6)).astype(np.float32)

    @staticmethod
    def check_settings(*, eps: float | None = None, norm: str = "linf", **settings) -> None:
        """Raise ValueError naming the first bad RAT setting (see :class:`RATSettings`)."""
        RATSettings(**settings).check(eps=eps, norm=norm)

    def get_config(self) -> dict:
        return {**super().get_config(), **self._own_settings(), "eps": self.eps,
                "norm": self.norm}

    def _own_settings(self) -> dict:
        return {**self.rat.asdict(), "carry_images": self.carry_images}

    def set_perturbations(self, perturbations: np.ndarray) -> None:
        """Assign V (float [K,H,W,C]); call in cross-replica context (e.g. a callback).

        Refused if V is not finite, exceeds ``eps`` (when set) or spans more than the pixel
        range.
        """
        v = np.asarray(perturbations, np.float32)
        if v.shape != tuple(self.perturbations.shape):
            raise ValueError(f"perturbations have shape {v.shape}, the model needs "
                             f"{tuple(self.perturbations.shape)} ("
                             f"{'source, target' if self.per_source else 'num_classes'}, H, W, C)")
        lo, hi = self.clip_values
        perturbation_files.check_bound(v, hi - lo, "linf", what="perturbations (beyond the pixel range)")
        if self.eps is not None:
            perturbation_files.check_bound(v, self.eps, self.norm)
        self.perturbations.assign(v)

    def get_perturbations(self) -> np.ndarray:
        """The current V as a numpy array."""
        return np.asarray(keras.ops.convert_to_numpy(self.perturbations))

    def fit(self, *args, **kwargs):
        """``Model.fit``, refused if V is all zero once training begins (after callbacks such
        as ``BackupAndRestore`` restored theirs), unless V is learnt: ``online``, a callback
        that searches it (:class:`rat_tf.callbacks.RefreshPerturbations`) or a ``rat_init``
        step."""
        callbacks = list(kwargs.pop("callbacks", None) or [])
        needs_v = not self.starts_fgsm and self.perturbed_fraction > 0 and not self.online
        if needs_v and not any(
                getattr(c, "searches_perturbations", False) for c in callbacks):
            callbacks.append(_RequirePerturbations())
        return super().fit(*args, callbacks=callbacks, **kwargs)

    def perturbed_batch(self, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """The perturbed copies clip(x + V[t]) for targets t != y, with their TRUE labels."""
        v = tf.convert_to_tensor(self.perturbations)
        targets = self._targets(x, y, v)
        y_p, _, _ = self._copy_index(y, targets)
        return self._copies(x, y, targets, v), y_p

    def _targets(self, x: tf.Tensor, y: tf.Tensor, v: tf.Tensor) -> tf.Tensor:
        """The targets of this step's copies: [B] (one per image) or [B, K-1] (``"all"``)."""
        k = self.num_classes
        if self.targets_per_image == "one":
            offset = self._global_draw(0, tf.shape(y), lambda shape, seed: (
                tf.random.stateless_uniform(shape, seed, minval=1, maxval=k, dtype=tf.int32)))
            return (y + offset) % k
        if self.targets_per_image == "runner_up":  # the most likely wrong class of x
            logits = tf.stop_gradient(self.logits(x, training=False))
            logits = tf.where(tf.one_hot(y, k) > 0, tf.cast(-np.inf, logits.dtype), logits)
            return tf.argmax(logits, axis=1, output_type=tf.int32)
        every = (y[:, None] + tf.range(1, k, dtype=y.dtype)[None, :]) % k  # [B, K-1]
        if self.targets_per_image == "all":
            return every
        # "worst": the copy with the highest loss under the current weights, one per image.
        logits = tf.stop_gradient(self.logits(self._copies(x, y, every, v), training=False))
        losses = keras.losses.sparse_categorical_crossentropy(
            tf.repeat(y, k - 1), logits, from_logits=True)
        worst = tf.argmax(tf.reshape(losses, (-1, k - 1)), axis=1, output_type=tf.int32)
        return tf.gather(every, worst, axis=1, batch_dims=1)

    def _copies(self, x: tf.Tensor, y: tf.Tensor, targets: tf.Tensor, v: tf.Tensor
                ) -> tf.Tensor:
        """The perturbed copies clip(x + V[t]) as one flat batch (source-major)."""
        k = self.num_classes
        if self.per_source:  # V[s, t] is row s * K + t
            v = tf.reshape(v, (k * k, *self.image_shape))
            rows = (y if targets.shape.rank == 1 else y[:, None]) * k + targets
        else:
            rows = targets
        images = x if targets.shape.rank == 1 else x[:, None]
        copies = ops.apply_perturbation(images, tf.gather(v, rows), self.clip_values)
        return tf.reshape(copies, tf.concat([[-1], tf.shape(x)[1:]], 0))

    @staticmethod
    def _copy_index(y: tf.Tensor, targets: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """(TRUE label, index in the batch of its source, target) of every copy, flat."""
        index = tf.range(tf.shape(y)[0])
        if targets.shape.rank == 1:
            return y, index, targets
        n = tf.shape(targets)[1]
        return tf.repeat(y, n), tf.repeat(index, n), tf.reshape(targets, [-1])

    def _toward(self, targets: tf.Tensor, outputs: tf.Tensor,
                weight: tf.Tensor | None = None) -> tf.Tensor:
        """Summed cross-entropy of perturbed copies toward their targets (what V lowers)."""
        losses = keras.losses.sparse_categorical_crossentropy(
            targets, tf.cast(outputs, tf.float32), from_logits=self.from_logits)
        return tf.reduce_sum(losses if weight is None else losses * weight)

    def _step(self, inputs: Callable[[tf.Tensor], tf.Tensor], y: tf.Tensor,
              weights: tf.Tensor | None, v: tf.Tensor,
              toward: Callable[[tf.Tensor], tf.Tensor]) -> tf.Tensor:
        """The weight update on ``inputs(v)`` and, when online, the V update; the outputs."""
        if not self.online:
            return self._fit_on(inputs(v), y, weights)
        outputs, grad = self._fit_on(inputs, y, weights, watched=v, side_loss=toward)
        self.learn_perturbations(v, grad)
        return outputs

    def _inputs(self, x: tf.Tensor, y: tf.Tensor, targets: tf.Tensor
                ) -> tuple[Callable[[tf.Tensor], tf.Tensor], tf.Tensor | None]:
        """(the images the step fits on, as a function of V; the replace-mode swap mask)."""
        if self.batch_mode == "replace":
            swap = self._global_draw(1, tf.shape(y), lambda shape, seed: (
                tf.random.stateless_uniform(shape, seed))) < self.perturbed_fraction
            return (lambda v: tf.where(swap[:, None, None, None],
                                       tf.cast(self._copies(x, y, targets, v), x.dtype), x)), swap
        return (lambda v: tf.concat([x, tf.cast(self._copies(x, y, targets, v), x.dtype)], 0),
                None)

    def training_batch(self, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(images, labels) a train step on (x, y) fits the classifier on: x and its perturbed
        copies (append mode) or x with some images swapped for them (replace), drawn as the
        step draws them."""
        x, y, _ = self._unpack((x, y))
        v = tf.convert_to_tensor(self.perturbations)
        targets = self._targets(x, y, v)
        inputs, swap = self._inputs(x, y, targets)
        if swap is not None:
            return inputs(v), y
        return inputs(v), tf.concat([y, self._copy_index(y, targets)[0]], 0)

    def learn_perturbations(self, v: tf.Tensor, grad: tf.Tensor) -> None:
        """One projected step of V (now ``v``) down the targeted loss whose gradient is
        ``grad``, summed over replicas: the online update of every train step."""
        grad = tf.convert_to_tensor(grad)  # IndexedSlices from the row gather -> dense
        ctx = tf.distribute.get_replica_context()
        if ctx is not None and replicas() > 1:
            grad = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grad)
        shape = tf.shape(v)
        rows = (-1, *self.image_shape)
        size = self.online_step_size or self.eps / 10.0
        step = ops.normalized_step(tf.reshape(grad, rows), self.norm)
        lo, hi = self.clip_values
        moved = ops.project(tf.reshape(v, rows) - size * step, self.eps, self.norm)
        moved = tf.clip_by_value(moved, lo - hi, hi - lo)
        self.perturbations.assign(tf.reshape(moved, shape))

    def start(self, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor | None,
                                                          tf.Tensor | None]:
        """(the start of the FGSM step of (x, y), the V rows it took or None, the targets or
        None): zero, uniform in the ball, V[y], or V[t] / V[y, t] for this step's targets (plus
        uniform noise of radius ``rat_init_noise`` * eps, projected to the ball)."""
        v = tf.convert_to_tensor(self.perturbations)
        if self.rat_init in ("zero", "random"):  # V unused; a chosen target still steers
            targets = (self._targets(x, y, v)
                       if self.targets_per_image in ("runner_up", "worst") else None)
            if self.rat_init == "zero":
                return tf.zeros_like(x), None, targets
            return self._global_draw(2, tf.shape(x), lambda shape, seed: ops.random_in_ball(
                shape, self.eps, self.norm, seed, x.dtype)), None, targets
        targets = None
        if self.rat_init == "class":
            rows = y
        else:
            targets = self._targets(x, y, v)
            rows = y * self.num_classes + targets if self.per_source else targets
        flat = tf.reshape(v, (-1, *self.image_shape))
        delta0 = tf.cast(tf.gather(flat, rows), x.dtype)
        if self.rat.rat_init_noise:  # V plus uniform noise, back in the ball
            noise = self._global_draw(3, tf.shape(x), lambda shape, seed: ops.random_in_ball(
                shape, self.rat.rat_init_noise * self.eps, self.norm, seed, x.dtype))
            delta0 = ops.project(delta0 + noise, self.eps, self.norm)
        return delta0, rows, targets

    def _step_objective(self, logits: tf.Tensor, y: tf.Tensor,
                        targets: tf.Tensor | None) -> tf.Tensor:
        """What the FGSM step raises, summed: the cross-entropy of the true class, or with
        targets the logit margin z_t - z_y (toward the target, away from the label)."""
        logits = tf.cast(logits, tf.float32)
        if targets is None:
            return tf.reduce_sum(keras.losses.sparse_categorical_crossentropy(
                y, logits, from_logits=True))
        return tf.reduce_sum(tf.gather(logits, targets, batch_dims=1)
                             - tf.gather(logits, y, batch_dims=1))

    def adversarial_batch(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """The FGSM examples a ``rat_init`` step of (x, y) trains on (inference mode)."""
        delta0, _, targets = self.start(x, y)
        x_adv, _, _ = self._fgsm_from(x, y, delta0, targets)
        return tf.stop_gradient(x_adv)

    def _fgsm_from(self, x: tf.Tensor, y: tf.Tensor, delta0: tf.Tensor,
                   targets: tf.Tensor | None, training: bool = False
                   ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """(the FGSM example from x + delta0, the logits at the start, the input gradient
        there): one projected step of ``rat_step_size`` up :meth:`_step_objective`, its
        gradient taken at the unclipped start as ``attacks.fgsm(box_start=False)`` does, with
        the classifier in inference mode unless ``training``."""
        if self.rat.rat_step_loss == "ce":
            targets = None  # V[t] (or the runner-up) picks the start; the step climbs the CE
        x0 = x + delta0  # not clipped: see attacks.fgsm's box_start
        with tf.GradientTape() as tape:
            tape.watch(x0)
            logits0 = self.logits(x0, training=training)
            objective = self._step_objective(logits0, y, targets)
        grad = tf.stop_gradient(tape.gradient(objective, x0))
        step = tf.cast(self.rat_step_size, x.dtype) * ops.normalized_step(grad, self.norm)
        delta = ops.project(delta0 + step, self.eps, self.norm)
        return (tf.stop_gradient(ops.apply_perturbation(x, delta, self.clip_values)), logits0,
                grad)

    def _split_index(self, data) -> tuple[tuple, tf.Tensor]:
        """(the batch with plain images, the images' indices) of a ``rat_carry`` batch."""
        x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
        if not (isinstance(x, dict) and set(x) == {"image", "index"}):
            raise ValueError("rat_carry needs each training image's index: fit on batches "
                             "({'image': x, 'index': i}, y), e.g. from "
                             "rat_tf.training.train_stream(..., with_index=True)")
        index = tf.cast(tf.reshape(x["index"], [-1]), tf.int32)
        message = f"image indices must be in [0, carry_images={self.carry_images})"
        with tf.control_dependencies([
                tf.debugging.assert_non_negative(index, message=message),
                tf.debugging.assert_less(index, self.carry_images, message=message)]):
            index = tf.identity(index)
        return keras.utils.pack_x_y_sample_weight(x["image"], y, sw), index

    def _carried_start(self, delta0: tf.Tensor, index: tf.Tensor) -> tf.Tensor:
        """The start of each image: its carried start (plus ``rat_carry_noise``, back in the
        ball) once it has one, else ``delta0``."""
        seen = tf.gather(self.carried.value, index) > 0
        last = tf.cast(tf.gather(self.carried_starts.value, index), delta0.dtype)
        if self.rat.rat_carry_noise:
            noise = self._global_draw(5, tf.shape(delta0), lambda shape, seed: ops.random_in_ball(
                shape, self.rat.rat_carry_noise * self.eps, self.norm, seed, delta0.dtype))
            last = ops.project(last + noise, self.eps, self.norm)
        return tf.where(tf.reshape(seen, [-1] + [1] * len(self.image_shape)), last, delta0)

    def _carry(self, index: tf.Tensor, delta: tf.Tensor, grad: tf.Tensor | None) -> None:
        """Store each image's next start, from every replica: its FGSM perturbation
        ``delta``, moved one projected step up ``grad`` if given ("last_step")."""
        if grad is not None:
            step = tf.cast(self.rat_step_size, delta.dtype) * ops.normalized_step(
                tf.cast(grad, delta.dtype), self.norm)
            delta = ops.project(delta + step, self.eps, self.norm)
        ctx = tf.distribute.get_replica_context()
        if ctx is not None and replicas() > 1:
            index, delta = ctx.all_gather(index, axis=0), ctx.all_gather(delta, axis=0)
        self.carried_starts.value.scatter_update(
            tf.IndexedSlices(tf.cast(delta, self.carried_starts.dtype), index))
        self.carried.value.scatter_update(
            tf.IndexedSlices(tf.ones_like(index, self.carried.dtype), index))

    def _train_from_start(self, x: tf.Tensor, y: tf.Tensor, sw: tf.Tensor | None,
                          index: tf.Tensor | None = None) -> dict:
        """A ``rat_init`` step: FGSM from the start (carried, with ``index``), the weight
        update on the FGSM batch (plus the consistency penalty), V moved up the same input
        gradient, and each image's next start carried."""
        delta0, rows, targets = self.start(x, y)
        if index is not None:
            delta0 = self._carried_start(delta0, index)
        penalty = self.rat_consistency > 0
        last_step = index is not None and self.rat.rat_carry == "last_step"
        with tf.GradientTape() as tape:
            if penalty:  # the penalty's gradient flows through the start's logits too, taken
                # in training mode as the adversarial logits are (one set of batch-norm stats)
                x_adv, logits0, grad = self._fgsm_from(x, y, delta0, targets, training=True)
            else:
                with tape.stop_recording():
                    x_adv, logits0, grad = self._fgsm_from(x, y, delta0, targets)
            if last_step:
                tape.watch(x_adv)
            outputs = self.classifier(x_adv, training=True)
            loss = self._track_loss(x_adv, y, outputs, sw, training=True)
            if penalty:
                gap = tf.reduce_mean(tf.square(
                    tf.cast(self.logits(x_adv, training=True) if not self.from_logits
                            else outputs, tf.float32) - logits0), axis=-1)
                if sw is not None:
                    gap = gap * sw
                gap = tf.reduce_mean(gap)
                self.consistency_loss.update_state(gap)
                loss = loss + self.rat_consistency * gap / tf.cast(replicas(), tf.float32)
            scaled = self.optimizer.scale_loss(loss)
        weights = self.trainable_weights
        grads = tape.gradient(scaled, weights + [x_adv] if last_step else weights)
        self.optimizer.apply_gradients(zip(grads[:len(weights)], weights))
        if index is not None:
            self._carry(index, x_adv - x, grads[-1] if last_step else None)
        if rows is not None:  # V rows move up the gradient at their start (sum over images)
            v = tf.convert_to_tensor(self.perturbations)
            n_rows = int(np.prod(self.perturbations.shape[:-len(self.image_shape)]))
            row_grad = tf.math.unsorted_segment_sum(tf.cast(grad, tf.float32), rows, n_rows)
            self.learn_perturbations(v, -tf.reshape(row_grad, tf.shape(v)))
        self.compute_metrics(x_adv, y, outputs, sw)
        self.adversarial_accuracy.update_state(y, outputs, sample_weight=sw)
        if penalty:
            return self._results(self.adversarial_accuracy, self.consistency_loss)
        return self._results(self.adversarial_accuracy)

    def train_step(self, data):
        index = None
        if self.carries:
            data, index = self._split_index(data)
        x, y, sw = self._unpack(data)
        if self.starts_fgsm:
            return self._train_from_start(x, y, sw, index)
        f = self.perturbed_fraction
        if f == 0.0:
            return super().train_step(data)
        v = tf.convert_to_tensor(self.perturbations)
        targets = self._targets(x, y, v)
        y_p, source, t_p = self._copy_index(y, targets)
        inputs, swap = self._inputs(x, y, targets)
        if swap is not None:
            swapped = tf.cast(swap, tf.float32)
            outputs = self._step(inputs, y, sw, v,
                                 lambda outputs: self._toward(targets, outputs, swapped))
            w = tf.ones_like(swapped) if sw is None else sw
            self.compute_metrics(x, y, outputs, w * (1.0 - swapped))
            self.perturbed_accuracy.update_state(y, outputs, sample_weight=w * swapped)
            return self._results(self.perturbed_accuracy)
        n_clean, n_pert = tf.shape(x)[0], tf.shape(y_p)[0]
        n_all = tf.cast(n_clean + n_pert, tf.float32)
        weights = tf.concat([
            tf.fill([n_clean], (1.0 - f) * n_all / tf.cast(n_clean, tf.float32)),
            tf.fill([n_pert], f * n_all / tf.cast(n_pert, tf.float32))], 0)
        if sw is not None:
            weights *= tf.concat([sw, tf.gather(sw, source)], 0)
        outputs = self._step(inputs, tf.concat([y, y_p], 0), weights, v,
                             lambda outputs: self._toward(t_p, outputs[n_clean:]))
        self.compute_metrics(x, y, outputs[:n_clean], sw)
        self.perturbed_accuracy.update_state(
            y_p, outputs[n_clean:], sample_weight=None if sw is None else tf.gather(sw, source))
        return self._results(self.perturbed_accuracy)

    def settings(self) -> dict:
        return {**super().settings(), **self._own_settings(), "eps": self.eps,
                "norm": self.norm}


class _RequirePerturbations(keras.callbacks.Callback):
    """Stops a RAT fit before its first step if the trainer holds no V (all zero)."""

    def on_train_begin(self, logs: dict | None = None) -> None:
        if not np.any(self.model.get_perturbations()):
            raise ValueError(
                "RATModel has no perturbations (V is all zero): pass perturbations= (e.g. "
                "from rat_tf.attacks.targeted_universal) or call set_perturbations(V) first")
