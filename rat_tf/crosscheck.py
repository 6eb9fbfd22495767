"""Independent check of rat_tf's robustness figures with the Adversarial Robustness Toolbox.

An exported SavedModel (:func:`rat_tf.export.export_saved_model`) is loaded with plain
``tf.saved_model.load`` - no rat_tf code - wrapped as an ART ``TensorFlowV2Classifier`` and
attacked with ART's ``FastGradientMethod`` and ``ProjectedGradientDescent`` (L-inf), and for
AutoAttack with ART's ``AutoProjectedGradientDescent`` (CE and DLR) and ``SquareAttack``. The same
images are attacked by rat_tf's evaluation path (:func:`rat_tf.evaluation.load_model_fn` and
the compiled attack steps of :func:`rat_tf.evaluation.robustness_report`), with the same
settings. FGSM is deterministic, so both accuracies must agree within ``fgsm_tol``. PGD and
AutoAttack are random: rat_tf's attack must not be weaker than ART's (PGD) or than the worst
case per image of ART's APGD-CE, APGD-DLR and Square (AutoAttack) by the rule of
:func:`not_weaker`, a margin of a few images that grows with the images only one side breaks.
ART is the optional extra ``bench``.
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow as tf
from absl import logging

from rat_tf import attacks, data, evaluation

SIGNATURE = "serving_default"
DEFAULT_FGSM_TOL = 0.01  # deterministic attack: 1 point (10 of 1000 images)
DEFAULT_TOL_IMAGES = 3  # random attacks: rat_tf may leave this many more images unbroken, or
DEFAULT_TOL_Z = 3.0  # this many standard deviations of the images one side only breaks


def not_weaker(ours: np.ndarray, reference: np.ndarray, *,
               tol_images: int = DEFAULT_TOL_IMAGES, tol_z: float = DEFAULT_TOL_Z) -> dict:
    """Whether an attack that left ``ours`` (bool [N], True: still classified correctly) is
    not weaker than one that left ``reference`` on the same images.

    With b images broken by the reference only and c by ours only, ours may leave
    b - c > 0 more images unbroken up to max(``tol_images``, ``tol_z`` sqrt(b + c)): were both
    equally strong, b - c would have mean 0 and standard deviation sqrt(b + c) (McNemar's
    test, one-sided). Returns a JSON-ready dict: ``excess`` (b - c), ``allowed``,
    ``only_reference_breaks`` (b), ``only_ours_breaks`` (c) and ``ok``.
    """
    ours, reference = np.asarray(ours, bool), np.asarray(reference, bool)
    if ours.shape != reference.shape or ours.ndim != 1:
        raise ValueError(f"expected two per-image results [N] of one shape, got {ours.shape} "
                         f"and {reference.shape}")
    if not (tol_images >= 0 and tol_z >= 0):
        raise ValueError(f"tolerances must be >= 0, got tol_images={tol_images}, "
                         f"tol_z={tol_z}")
    b, c = int(np.sum(ours & ~reference)), int(np.sum(~ours & reference))
    allowed = max(float(tol_images), tol_z * math.sqrt(b + c))
    return {"excess": b - c, "allowed": allowed, "only_reference_breaks": b,
            "only_ours_breaks": c, "ok": b - c <= allowed}


def _import_art():
    """The ART modules used here, or an ImportError saying how to install them."""
    try:
        from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent
        from art.estimators.classification import TensorFlowV2Classifier
    except ImportError as e:
        raise ImportError(
            "the cross-check needs the Adversarial Robustness Toolbox: "
            'pip install -e ".[bench]"') from e
    return TensorFlowV2Classifier, FastGradientMethod, ProjectedGradientDescent


def art_classifier(path: str) -> Any:
    """An ART ``TensorFlowV2Classifier`` over ``serving_default`` of a SavedModel (no rat_tf).

    Input shape and number of classes are read from the signature and one forward pass.
    """
    classifier_cls, _, _ = _import_art()
    loaded = tf.saved_model.load(path)
    if SIGNATURE not in loaded.signatures:
        raise ValueError(f"{path}: no {SIGNATURE!r} signature (has {sorted(loaded.signatures)})")
    fn = loaded.signatures[SIGNATURE]
    inputs = fn.structured_input_signature[1]
    if len(inputs) != 1:
        raise ValueError(f"{path}: {SIGNATURE} takes {sorted(inputs)}, expected one image input")
    (name, spec), = inputs.items()
    if spec.dtype != tf.float32 or spec.shape.rank != 4 or not spec.shape[1:].is_fully_defined():
        raise ValueError(f"{path}: {SIGNATURE} expects {spec.dtype.name} {spec.shape}, not "
                         f"float32 images [None, H, W, C]")
    if "logits" not in fn.structured_outputs:
        raise ValueError(f"{path}: {SIGNATURE} has no 'logits' output "
                         f"(has {sorted(fn.structured_outputs)})")
    input_shape = tuple(int(d) for d in spec.shape[1:])

    def model(x, training=False):  # ART calls model(x, training=...)
        del training  # the signature is always in inference mode
        return fn(**{name: tf.cast(x, tf.float32)})["logits"]

    model.saved_model = loaded  # keep the variables alive with the callable
    num_classes = int(model(tf.zeros((1,) + input_shape)).shape[-1])
    return classifier_cls(
        model=model, nb_classes=num_classes, input_shape=input_shape,
        # Summed loss: the attacks only use the gradient's sign, and a sum does not scale
        # small per-image gradients by 1/batch (the rat_tf attacks sum as well).
        loss_object=tf.keras.losses.CategoricalCrossentropy(from_logits=True, reduction="sum"),
        clip_values=(0.0, 1.0))


def _art_correct(classifier: Any, x: np.ndarray, y: np.ndarray, batch_size: int) -> np.ndarray:
    """Boolean [N]: whether ART's classifier classifies each image correctly."""
    preds = np.concatenate([np.argmax(classifier.predict(x[i:i + batch_size]), axis=-1)
                            for i in range(0, len(x), batch_size)])
    return preds == y


def art_correct(path: str, x: np.ndarray, y: np.ndarray, *, fgsm_eps: Sequence[float],
                pgd_eps: Sequence[float], pgd_steps: int = 40, pgd_restarts: int = 2,
                pgd_step_size: float | None = None, batch_size: int = 250,
                seed: int = 0) -> dict[str, Any]:
    """Per-image correctness (bool [N]): clean and under ART's FGSM / PGD (L-inf).

    PGD's step size defaults to 2.5 * eps / steps, as in rat_tf's evaluation. ART draws its
    random starts from numpy's global RNG, seeded with ``seed`` here and restored afterwards.
    """
    _, fgsm_cls, pgd_cls = _import_art()
    classifier = art_classifier(path)
    if np.min(y) < 0 or np.max(y) >= classifier.nb_classes:
        raise ValueError(f"labels must be in [0, {classifier.nb_classes}), got range "
                         f"[{np.min(y)}, {np.max(y)}]")
    onehot = np.eye(classifier.nb_classes, dtype=np.float32)[y]
    out = {"clean": _art_correct(classifier, x, y, batch_size), "fgsm": {}, "pgd": {}}
    for eps in fgsm_eps:
        attack = fgsm_cls(classifier, norm=np.inf, eps=float(eps), eps_step=float(eps),
                          batch_size=batch_size)
        x_adv = attack.generate(x=x, y=onehot)
        out["fgsm"][f"{eps:g}"] = _art_correct(classifier, x_adv, y, batch_size)
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        for eps in pgd_eps:
            attack = pgd_cls(classifier, norm=np.inf, eps=float(eps),
                             eps_step=float(attacks.pgd_step_size(eps, pgd_steps,
                                                                  pgd_step_size)),
                             max_iter=int(pgd_steps), num_random_init=int(pgd_restarts),
                             batch_size=batch_size, verbose=False)
            x_adv = attack.generate(x=x, y=onehot)
            out["pgd"][f"{eps:g}"] = _art_correct(classifier, x_adv, y, batch_size)
    finally:
        np.random.set_state(state)
    return out


def rat_tf_correct(path: str, x: np.ndarray, y: np.ndarray, *, fgsm_eps: Sequence[float],
                   pgd_eps: Sequence[float], pgd_steps: int = 40, pgd_restarts: int = 2,
                   pgd_step_size: float | None = None, batch_size: int = 250,
                   seed: int = 0) -> dict[str, Any]:
    """The same per-image correctness from rat_tf's evaluation code path (as in the report)."""
    model_fn, _ = evaluation.load_model_fn(path)
    fgsm_step = evaluation.fgsm_correct_fn(model_fn)
    pgd_step = evaluation.pgd_correct_fn(model_fn, steps=pgd_steps, restarts=pgd_restarts,
                                         step_size=pgd_step_size, seed=seed)
    acc = lambda step, eps=0.0: evaluation.correct_on(step, x, y, batch_size, eps)  # noqa: E731
    return {"clean": acc(evaluation.correct_fn(model_fn)),
            "fgsm": {f"{e:g}": acc(fgsm_step, e) for e in fgsm_eps},
            "pgd": {f"{e:g}": acc(pgd_step, e) for e in pgd_eps}}


def crosscheck_with_art(path: str, x: np.ndarray, y: np.ndarray, *,
                        fgsm_eps: Sequence[float] = (0.1, 0.2),
                        pgd_eps: Sequence[float] = (0.1,), pgd_steps: int = 40,
                        pgd_restarts: int = 2, pgd_step_size: float | None = None,
                        fgsm_tol: float = DEFAULT_FGSM_TOL,
                        tol_images: int = DEFAULT_TOL_IMAGES, tol_z: float = DEFAULT_TOL_Z,
                        batch_size: int = 250, seed: int = 0) -> dict:
    """Attack a SavedModel with ART and with rat_tf on the same images; compare accuracies.

    Returns a JSON-ready dict with one row per (attack, eps): ``art``, ``rat_tf``, ``diff``
    (rat_tf - ART), ``tol`` and ``ok``; ``ok`` overall is False if any row fails (clean and
    FGSM: |diff| <= fgsm_tol; PGD: rat_tf's is not weaker, :func:`not_weaker` with
    ``tol_images`` and ``tol_z``, its ``tol`` the images allowed as a fraction).
    """
    x = np.asarray(x, np.float32)
    y = np.asarray(y)
    if x.ndim != 4 or len(x) == 0 or y.shape != (len(x),) or not np.issubdtype(y.dtype,
                                                                                np.integer):
        raise ValueError(f"expected images [N,H,W,C] and integer labels [N], got {x.shape} "
                         f"and {y.dtype} {y.shape}")
    data.check_pixels(x, "images")  # art_correct (first) checks labels against the classes
    fgsm_eps = [float(e) for e in np.atleast_1d(fgsm_eps)]
    pgd_eps = [float(e) for e in np.atleast_1d(pgd_eps)]
    radii = fgsm_eps + pgd_eps
    if not radii or not all(np.isfinite(e) and e > 0 for e in radii):
        raise ValueError(f"radii must be positive, got fgsm_eps={fgsm_eps}, pgd_eps={pgd_eps}")
    if not (fgsm_tol >= 0 and tol_images >= 0 and tol_z >= 0):
        raise ValueError(f"tolerances must be >= 0, got fgsm_tol={fgsm_tol}, "
                         f"tol_images={tol_images}, tol_z={tol_z}")
    y = y.astype(np.int32)
    settings = dict(fgsm_eps=fgsm_eps, pgd_eps=pgd_eps, pgd_steps=int(pgd_steps),
                    pgd_restarts=int(pgd_restarts), pgd_step_size=pgd_step_size,
                    batch_size=int(batch_size), seed=int(seed))
    t0 = time.time()
    art = art_correct(path, x, y, **settings)
    t_art = time.time() - t0
    t0 = time.time()
    ours = rat_tf_correct(path, x, y, **settings)
    t_ours = time.time() - t0

    rows = []

    def add(attack: str, eps: float | None, a_ok: np.ndarray, r_ok: np.ndarray,
            one_sided: bool) -> None:
        a, r = float(a_ok.mean()), float(r_ok.mean())
        diff = r - a
        if one_sided:
            rule = not_weaker(r_ok, a_ok, tol_images=tol_images, tol_z=tol_z)
            tol, ok = rule["allowed"] / len(a_ok), rule["ok"]
        else:
            tol, ok = fgsm_tol, abs(diff) <= fgsm_tol + 1e-9
        rows.append(dict(attack=attack, eps=eps, art=a, rat_tf=r, diff=diff, tol=tol,
                         one_sided=one_sided, ok=ok,
                         # images that one attack fools and the other does not
                         only_art_fools=int(np.sum(~a_ok & r_ok)),
                         only_rat_tf_fools=int(np.sum(a_ok & ~r_ok))))
        if not ok:
            logging.warning("%s: %s eps=%s disagrees: ART %.4f, rat_tf %.4f (tolerance %.3f)",
                            path, attack, eps, a, r, tol)

    add("clean", None, art["clean"], ours["clean"], False)
    for e in fgsm_eps:
        add("fgsm", e, art["fgsm"][f"{e:g}"], ours["fgsm"][f"{e:g}"], False)
    pgd_name = f"pgd-{int(pgd_steps)}x{int(pgd_restarts)}"
    for e in pgd_eps:
        add(pgd_name, e, art["pgd"][f"{e:g}"], ours["pgd"][f"{e:g}"], True)
    return {"model": str(path), "num_images": int(len(x)), "settings": settings,
            "fgsm_tol": fgsm_tol, "tol_images": tol_images, "tol_z": tol_z, "rows": rows,
            "ok": all(r["ok"] for r in rows),
            "seconds": {"art": round(t_art, 1), "rat_tf": round(t_ours, 1)}}


def format_table(results: Mapping[str, Mapping]) -> str:
    """A Markdown table of cross-check results {model name: crosscheck_with_art(...)} in %.

    ``images fooled only by`` counts the images that one attack fools and the other does not.
    """
    lines = ["| model | attack | eps | ART acc | rat_tf acc | difference | tolerance | ok | "
             "fooled only by ART / rat_tf |", "|---|---|---|---|---|---|---|---|---|"]
    for name, res in results.items():
        for r in res["rows"]:
            eps = "-" if r["eps"] is None else f"{r['eps']:g}"
            tol = f"{'<= +' if r['one_sided'] else '±'}{100 * r['tol']:.3g}"
            lines.append(f"| {name} | {r['attack']} | {eps} | {100 * r['art']:.1f} | "
                         f"{100 * r['rat_tf']:.1f} | {100 * r['diff']:+.1f} | {tol} | "
                         f"{'yes' if r['ok'] else 'NO'} | "
                         f"{r['only_art_fools']} / {r['only_rat_tf_fools']} |")
    return "\n".join(lines) + "\n"


def art_autoattack_correct(path: str, x: np.ndarray, y: np.ndarray, eps: float, *,
                           steps: int = 100, n_queries: int = 5000, restarts: int = 1,
                           batch_size: int = 250, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-image robustness (bool [N]) after ART's APGD-CE, APGD-DLR (``restarts`` random
    starts each) and Square (L-inf) in turn, each run only on the images still classified
    correctly (as AutoAttack does)."""
    from art.attacks.evasion import AutoProjectedGradientDescent, SquareAttack

    classifier = art_classifier(path)
    onehot = np.eye(classifier.nb_classes, dtype=np.float32)[y]
    robust = _art_correct(classifier, x, y, batch_size)
    out = {"clean": robust.copy()}
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        for name in ("apgd-ce", "apgd-dlr", "square"):
            if name == "square":
                attack = SquareAttack(classifier, norm=np.inf, eps=float(eps),
                                      max_iter=int(n_queries), p_init=0.8, nb_restarts=1,
                                      batch_size=batch_size, verbose=False)
            else:
                attack = AutoProjectedGradientDescent(
                    classifier, norm=np.inf, eps=float(eps), eps_step=2 * float(eps),
                    max_iter=int(steps), nb_random_init=int(restarts), batch_size=batch_size,
                    loss_type="cross_entropy" if name == "apgd-ce" else
                    "difference_logits_ratio", verbose=False)
            todo = np.flatnonzero(robust)
            if len(todo):
                x_adv = attack.generate(x=x[todo], y=onehot[todo])
                robust[todo] = _art_correct(classifier, x_adv, y[todo], batch_size)
            out[name] = robust.copy()
    finally:
        np.random.set_state(state)
    return out


def crosscheck_autoattack(path: str, x: np.ndarray, y: np.ndarray, eps: float, *,
                          steps: int = 100, n_queries: int = 5000, restarts: int = 1,
                          attacks: Sequence[str] | None = None,
                          tol_images: int = DEFAULT_TOL_IMAGES, tol_z: float = DEFAULT_TOL_Z,
                          batch_size: int = 250, seed: int = 0) -> dict:
    """rat_tf's AutoAttack against ART's APGD-CE + APGD-DLR + Square on the same SavedModel.

    ``ok`` when rat_tf's AutoAttack (``attacks``: None for the standard sequence; ``restarts``
    of its APGD-CE and of ART's APGDs) is not weaker than ART's three attacks by
    :func:`not_weaker`. Returns a JSON-ready dict with both accuracies, ART's per attack, the
    rule's figures, the seconds of each side and their ratio (ART / rat_tf).
    """
    from rat_tf import autoattack

    x, y = np.asarray(x, np.float32), np.asarray(y).astype(np.int32)
    data.check_pixels(x, "images")
    t0 = time.time()
    art = art_autoattack_correct(path, x, y, eps, steps=steps, n_queries=n_queries,
                                 restarts=restarts, batch_size=batch_size, seed=seed)
    t_art = time.time() - t0
    model_fn, _ = evaluation.load_model_fn(path)
    t0 = time.time()
    ours = autoattack.autoattack(model_fn, x, y, eps, attacks=attacks, seed=seed,
                                 batch_size=batch_size, steps=steps, n_queries=n_queries,
                                 restarts=restarts)
    t_ours = time.time() - t0
    a, r = float(art["square"].mean()), float(ours["robust"].mean())
    rule = not_weaker(ours["robust"], art["square"], tol_images=tol_images, tol_z=tol_z)
    return {"model": str(path), "num_images": int(len(x)), "eps": float(eps),
            "steps": int(steps), "n_queries": int(n_queries), "restarts": int(restarts),
            "art": {k: float(v.mean()) for k, v in art.items()}, "rat_tf": r,
            "rat_tf_after_each": ours["robust_accuracy"], "diff": r - a,
            "excess_images": rule["excess"], "allowed_images": rule["allowed"],
            "ok": rule["ok"], "only_art_breaks": rule["only_reference_breaks"],
            "only_rat_tf_breaks": rule["only_ours_breaks"],
            "seconds": {"art": round(t_art, 1), "rat_tf": round(t_ours, 1)},
            "speedup": t_art / max(t_ours, 1e-9)}
