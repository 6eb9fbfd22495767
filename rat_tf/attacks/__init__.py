"""Attacks: FGSM, PGD, APGD, FAB-T, Square and (targeted) universal perturbations, one module
each, and the registry that names them (:mod:`rat_tf.attacks.spec`).

``model_fn`` is a Keras classifier (logits or a final softmax: see
:func:`rat_tf.models.describe`), a trainer wrapping one, or any callable mapping a batch of
images to logits (inside a ``train_step`` pass ``lambda x: model(x, training=False)``). Images
lie in ``clip_values`` ([0, 1] by default; radii are in the same units); labels are integer
class ids (one-hot rows are accepted). Everything after ``(model_fn, x, y, eps)`` is
keyword-only. :func:`fgsm`, :func:`pgd`, :func:`apgd`, :func:`fab` and :func:`square` are pure
TensorFlow (no numpy, no Python side effects): they trace inside ``tf.function``, XLA and
replica contexts. The universal searches are Python drivers over compiled passes with fixed
shapes: each pass is one ``tf.function`` that loops over padded, masked batches of a
distributed dataset, so nothing retraces between passes.

Seeded random starts called per replica (inside ``strategy.run``) are drawn for the whole
global batch and each replica keeps its rows (:func:`rat_tf.ops.replica_rows`), so they do not
depend on how a batch is split. The evaluation loops run a :class:`ReplicaStep`: fixed-size
global batches, each replica on its slice, the per-image results put back together in order.

Each attack module registers its attack (:func:`register`, an :class:`Attack` entry) when it
is imported; :data:`REGISTRY` holds them by name (``fgsm``, ``pgd``, ``apgd-ce``,
``apgd-dlr``, ``apgd-t``, ``fab-t``, ``square``, ``uap``), and the AutoAttack driver
(:mod:`rat_tf.autoattack`) runs any entry that has a ``run``.
"""

from rat_tf.attacks.core import ModelFn, ReplicaStep, check_split
from rat_tf.attacks.spec import (REGISTRY, Attack, RunSettings, autoattack_names, get_attack,
                                 register, unregister)
from rat_tf.attacks.fgsm import fgsm  # noqa: E402  (each import registers its attacks)
from rat_tf.attacks.pgd import pgd, pgd_step_size
from rat_tf.attacks.apgd import LOSSES, apgd
from rat_tf.attacks.fab import fab
from rat_tf.attacks.square import square
from rat_tf.attacks.universal import (TU_METHODS, SearchSettings, fooling_rate,
                                      mean_success_rate, targeted_success_rate,
                                      targeted_universal, untargeted_universal)
from rat_tf.attacks.universal_search import UniversalSearch, enforce_bound

REGISTRY.freeze()

__all__ = ["fgsm", "pgd", "pgd_step_size", "apgd", "fab", "square", "LOSSES",
           "UniversalSearch", "targeted_universal", "untargeted_universal",
           "targeted_success_rate", "fooling_rate", "ReplicaStep", "check_split",
           "enforce_bound", "mean_success_rate", "SearchSettings", "TU_METHODS", "ModelFn",
           "Attack", "RunSettings", "REGISTRY", "register", "unregister", "get_attack",
           "autoattack_names"]
