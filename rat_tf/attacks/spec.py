"""The attack registry: one :class:`Attack` entry per name, added by the attack's own module.

An entry carries everything a user of attacks by name needs: the attack function (trainers,
evaluation), a uniform call on one batch (the contract test of every attack), and, for the
attacks the AutoAttack driver (:mod:`rat_tf.autoattack`) can run, one run on a batch, how
many runs it makes and its cost. Adding an attack to AutoAttack is one module that calls
:func:`register` with such an entry.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import tensorflow as tf

from rat_tf import ops, registry


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The settings of an attack called by name: radius, norm, pixel box and budgets."""

    eps: Any = None
    norm: str = "linf"
    clip: tuple[float, float] = ops.PIXEL_RANGE
    steps: int = 100
    n_queries: int = 5000
    n_target_classes: int = 9
    restarts: int = 1
    p_init: float = 0.8
    rho: float = 0.75


def one_run(settings: RunSettings) -> int:
    """One run per call: the default :attr:`Attack.runs`."""
    del settings
    return 1


@dataclasses.dataclass(frozen=True)
class Attack:
    """A registered attack.

    ``fn``: the attack function, ``fn(model_fn, x, y, eps, **kwargs) -> x_adv``.
    ``call(model_fn, x, y, eps, settings, seed, strategy) -> x_adv``: the attack on one batch
    with the budgets of ``settings`` (a :class:`RunSettings`); ``per_replica``: it is pure
    TensorFlow and gives each image the same result on any split of the batch over replicas
    (run it inside a :class:`rat_tf.attacks.ReplicaStep`), else it is a Python driver that
    takes the ``strategy`` itself.
    AutoAttack (``run`` not None): ``run(model_fn, x, y, todo, logits, r, seed, settings)``
    is run ``r`` of the attack on a batch, ``todo`` the images still to attack, ``logits``
    their clean logits and ``seed`` a stateless seed [2]; it returns (fooled, x_found,
    x_best, score) per image (see :func:`rat_tf.attacks.runs.over_runs`). ``runs(settings)``
    is the number of runs AutoAttack makes, ``passes_per_step`` the forward passes of one
    image per iteration (a backward pass counts as one) and ``budget`` the setting that
    counts the iterations of a run (``"steps"`` or ``"n_queries"``). ``linf_only``: the
    attack supports norm linf only; ``targeted``: it attacks the ``n_target_classes`` top
    classes; ``min_classes``: the classes its loss needs (0: any).
    """

    name: str
    fn: Callable[..., tf.Tensor]
    call: Callable[..., tf.Tensor]
    per_replica: bool = True
    run: Callable[..., tuple] | None = None
    runs: Callable[[RunSettings], int] = one_run
    passes_per_step: float = 1.0
    budget: str = "steps"
    linf_only: bool = False
    targeted: bool = False
    min_classes: int = 0

    def iterations(self, settings: RunSettings) -> int:
        """The iterations of one run under ``settings``."""
        return getattr(settings, self.budget)


REGISTRY: registry.Registry[Attack] = registry.Registry("attack")


def register(attack: Attack) -> Attack:
    """Add ``attack`` to the registry under its name (a ValueError if the name is taken)."""
    if attack.budget not in ("steps", "n_queries"):
        raise ValueError(f"budget must be 'steps' or 'n_queries', got {attack.budget!r}")
    return REGISTRY.add(attack.name, attack)


def unregister(name: str) -> None:
    """Remove an attack registered after the built-in ones."""
    REGISTRY.remove(name)


def get_attack(name: str) -> Attack:
    """The registered attack ``name``, or a ValueError listing the known names."""
    return REGISTRY.get_entry(name)


def autoattack_names() -> tuple[str, ...]:
    """The registered attacks the AutoAttack driver can run, in registration order."""
    return tuple(name for name, attack in REGISTRY.items() if attack.run is not None)
