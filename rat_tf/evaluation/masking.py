"""The gradient-masking checks (:func:`masking_flags`) and their measure ``masking``."""

from __future__ import annotations

import math
import time
from typing import Any, Mapping


from rat_tf import attacks, ops
from rat_tf.evaluation.settings import (MASKING_FGSM_SHARE, MASKING_MIN_GAP, MASKING_MIN_IMAGES,
                                        MASKING_SE, MASKING_SQUARE_SHARE, MASKING_TRAIN_GAP,
                                        ROUNDING)
from rat_tf.evaluation.common import correct_on, pct, radius_of
from rat_tf.evaluation.measures import Measure, register_measure


def noise_margin(a: float, b: float, n: int) -> float:
    """The least difference between two accuracies ``a`` and ``b`` on the same ``n`` images
    that the masking checks take as real: :data:`MASKING_MIN_IMAGES` images, or
    :data:`MASKING_SE` binomial standard errors at their mean accuracy, whichever is larger
    (a conservative bound: the two are measured on the same images, so their difference
    varies less)."""
    n = max(int(n), 1)
    p = min(max((float(a) + float(b)) / 2, 0.0), 1.0)
    return max(MASKING_MIN_IMAGES / n, MASKING_SE * math.sqrt(p * (1.0 - p) / n))


def _eps_key(accuracies: Mapping[str, float], eps: float) -> str | None:
    """The key of radius ``eps`` in a {radius: accuracy} dict of a report (None: not there)."""
    return next((k for k in accuracies if abs(float(k) - float(eps)) < 1e-6), None)


def _rising_fgsm(report: Mapping) -> list[str]:
    """FGSM accuracy above the accuracy at a smaller radius (clean: radius 0) beyond noise."""
    curve = sorted((float(e), float(a)) for e, a in report.get("fgsm_accuracy", {}).items())
    if report.get("clean_accuracy") is not None:
        curve.insert(0, (0.0, float(report["clean_accuracy"])))
    n, rise = report["num_test"], None
    for j in range(1, len(curve)):
        low_eps, low = min(curve[:j], key=lambda point: point[1])
        eps, acc = curve[j]
        margin = noise_margin(low, acc, n)
        if acc - low > margin + ROUNDING and (rise is None or acc - low > rise[3] - rise[1]):
            rise = (low_eps, low, eps, acc, margin)
    if rise is None:
        return []
    low_eps, low, eps, acc, margin = rise
    where = "clean" if low_eps == 0 else f"FGSM {radius_of(report, low_eps)}"
    return [f"FGSM accuracy rises with the radius: {pct(acc)}% at {radius_of(report, eps)} "
            f"against {pct(low)}% {where}, {100 * (acc - low):.1f} points more on {n} images "
            f"(noise margin {100 * margin:.1f}): a larger step should not help, the gradient "
            f"at the image misleads one step (catastrophic overfitting)"]


def _fgsm_overstates(report: Mapping, share: float) -> list[str]:
    """FGSM far above PGD / AutoAttack on the same images while it costs almost no accuracy."""
    m = report.get("masking") or {}
    fallback = report.get("clean_accuracy")
    pairs = [("PGD", float(e), report.get("num_pgd", report["num_test"]),
              m.get("clean_on_pgd_images", fallback), report["pgd_fgsm_accuracy"][e], a)
             for e, a in report.get("pgd_accuracy", {}).items()
             if e in report.get("pgd_fgsm_accuracy", {})]
    aa = report.get("autoattack")
    if aa and m.get("fgsm_at_aa_eps") is not None:
        pairs.append(("AutoAttack", float(aa["eps"]), aa["num_images"],
                      m.get("clean_on_aa_images", fallback), m["fgsm_at_aa_eps"],
                      aa["robust_accuracy"]))
    flags = []
    for attack, eps, n, clean, fgsm, strong in pairs:
        if clean is None:
            continue
        gap = fgsm - strong
        if (gap > max(MASKING_MIN_GAP, noise_margin(fgsm, strong, n)) + ROUNDING
                and clean - fgsm <= share * (clean - strong) + ROUNDING):
            flags.append(
                f"FGSM at {radius_of(report, eps)} leaves {pct(fgsm)}% accuracy where "
                f"{attack} leaves {pct(strong)}% on the same {n} images (clean "
                f"{pct(clean)}%): FGSM changes accuracy by {100 * (fgsm - clean):+.1f} "
                f"points, {attack} by {100 * (strong - clean):+.1f}, so FGSM does under "
                f"{share:.0%} of {attack}'s harm: the model defeats the single step only "
                f"(catastrophic overfitting)")
    return flags


def training_pgd(report: Mapping) -> tuple[str, float] | None:
    """(radius, held-out PGD accuracy) at the training radius of the report's training
    record, if the report has PGD there (L-inf training only)."""
    t = (report.get("masking") or {}).get("training")
    if not t or t.get("norm", "linf") != "linf":
        return None
    key = _eps_key(report.get("pgd_accuracy", {}), t["eps"])
    return None if key is None else (key, float(report["pgd_accuracy"][key]))


def _training_gap(report: Mapping, threshold: float) -> list[str]:
    """Training adversarial accuracy far above held-out PGD at the training radius."""
    pgd = training_pgd(report)
    if pgd is None:
        return []
    t, (eps, heldout) = report["masking"]["training"], pgd
    n = report.get("num_pgd", report["num_test"])
    train = float(t["adversarial_accuracy"])
    if train - heldout <= max(threshold, noise_margin(train, heldout, n)) + ROUNDING:
        return []
    return [f"Training adversarial accuracy ({t.get('method') or 'training'}, last epoch) "
            f"is {pct(train)}% but PGD at the training radius {radius_of(report, eps)} "
            f"leaves {pct(heldout)}% of {n} held-out images, {100 * (train - heldout):.1f} "
            f"points less (more than {100 * threshold:.0f}): the training attack stopped "
            f"finding the adversarial examples PGD finds (catastrophic overfitting)"]


def masking_flags(report: Mapping) -> list[str]:
    """The signs of gradient masking in a report's figures, each a plain sentence with its
    numbers (empty: no sign). Reads what the measures put in the report, its ``masking``
    checks among them, and the thresholds in its ``settings``.

    - PGD at the radius of the whole pixel box leaves more than 1% accuracy; FGSM accuracy is
      more than 1 point below PGD's at a radius.
    - Square (gradient-free) breaks more than :data:`MASKING_SQUARE_SHARE` (2%, and more
      than 5 images) of the images the gradient attacks of AutoAttack left robust. On MNIST at
      0.3 (first 1,000 test images, docs/reproduction.md) it breaks 13 of 877 (1.5%) for the
      PGD-AT recipe's model and 38 of 818 (4.6%) for the FGSM-RS recipe's.
    - FGSM accuracy rises with the radius: accuracy at a radius exceeds the lowest accuracy
      at a smaller one (clean accuracy counts as radius 0) by more than
      :func:`noise_margin` (5 images, or 2 binomial standard errors). A catastrophically
      overfit FGSM-AT model on 500 MNIST test images: 92.4% at 0.05 up to 97.2% at 0.3.
    - FGSM overstates robustness: at a radius where PGD (or AutoAttack) was run, FGSM accuracy
      on the same images exceeds PGD's by more than :data:`MASKING_MIN_GAP` (30 points) *and*
      FGSM costs at most ``masking_fgsm_share`` (:data:`MASKING_FGSM_SHARE`, 10%) of the
      accuracy PGD costs: (clean - FGSM) <= share * (clean - PGD). The gap alone does not
      tell masking from a model robust to nothing. FGSM's share of AutoAttack's harm on MNIST
      at 0.3 (wide_mnist_cnn, README; FGSM / PGD / AA %): standard 21.6 / 0.0 / 0.0 (clean
      99.4: 78%), RAT 66.0 / 1.3 / 0.0 (33%), FGSM-AT 78.3 / 10.6 / 2.8 (21%: a weak model,
      not flagged), PGD-AT 72.3 / 44.6 / 17.4 (29%); mnist_cnn's four models 46% to 92%,
      CIFAR-10 FGSM-AT and PGD-AT at 8/255 71% and 66%. A collapsed FGSM-AT model, 97.2 / 0.0
      / 0.0, is under 3% whatever its clean accuracy; the collapsed tiny_cnn runs of the next
      rule are at 2%, below 0 and 8%. A plain gap threshold of 60 points
      would flag RAT and FGSM-AT above (66 and 75 points to AA) with PGD-AT at 55 close
      behind. The 30-point floor keeps a model that both attacks barely dent from being
      flagged for FGSM denting it less.
    - The training adversarial accuracy (``masking.training``: FGSM-AT / PGD-AT, the last
      epoch's accuracy on its adversarial training batches, from ``metrics.json``) exceeds
      held-out PGD accuracy at the training radius by more than ``masking_train_gap``
      (:data:`MASKING_TRAIN_GAP`, 50 points). The training attack is weaker than the report's
      PGD (FGSM-RS, or PGD from one start) and runs on training images, so honest runs show a
      gap too. tiny_cnn fine-tuned at 0.3 on 2,000 MNIST images (PGD-20 on 500 test images):
      FGSM-RS (step 1.25 eps) for 3 epochs 25.6% against PGD 0.8%, on 5,000 images 37.0%
      against 2.4% (35 points), PGD-AT 4.4% against 2.0%; FGSM-RS with step 2 eps after 15
      epochs 65.4% against 0.6% (FGSM 0.3 still 83.6%: partly collapsed, and only this rule
      says so), after 30 epochs 75.0 to 77.1% against 0.0% (three seeds, collapsed).

    Each difference must also exceed :func:`noise_margin` on the images it is measured on.
    """
    st = report.get("settings", {})
    m = report.get("masking") or {}
    flags = []
    box = m.get("box_accuracy")
    if box is not None and box > 0.01:
        flags.append(f"PGD at L-inf {m['box_radius']:g} (the whole pixel box) leaves "
                     f"{100 * box:.1f}% accuracy on {m['box_images']} images: gradients do not "
                     f"reach the decision (masking)")
    for eps, pgd in report.get("pgd_accuracy", {}).items():
        fgsm = report.get("pgd_fgsm_accuracy", {}).get(eps)
        if fgsm is not None and fgsm < pgd - 0.01:
            flags.append(f"FGSM accuracy {100 * fgsm:.1f}% is below PGD's "
                         f"{100 * pgd:.1f}% at {eps}: the iterative attack is weaker than "
                         f"one step (masking)")
    aa = report.get("autoattack")
    black = m.get("square_only_breaks", 0)
    if aa:
        left = black + round(aa["robust_accuracy"] * aa["num_images"])  # before Square
        if black > max(MASKING_MIN_IMAGES, MASKING_SQUARE_SHARE * left):
            flags.append(f"Square (gradient-free) broke {black} of the {left} images the "
                         f"gradient attacks left robust ({100 * black / max(left, 1):.1f}%, "
                         f"of {aa['num_images']}) (masking)")
    return (flags + _rising_fgsm(report)
            + _fgsm_overstates(report, float(st.get("masking_fgsm_share",
                                                    MASKING_FGSM_SHARE)))
            + _training_gap(report, float(st.get("masking_train_gap", MASKING_TRAIN_GAP))))


class _Masking(Measure):
    """Gradient-masking checks, said plainly (:func:`masking_flags`): a black-box attack
    beating the white-box ones, FGSM stronger than PGD at one radius, accuracy left at a
    radius covering the whole pixel box, FGSM accuracy rising with the radius, FGSM far above
    PGD and AutoAttack, and a training adversarial accuracy far above held-out PGD."""

    name = "masking"

    def stages(self, ctx):
        s = ctx.settings
        return [("masking", 2.0 * s.masking_steps * ctx.share(min(s.masking_n,
                                                                   len(ctx.x_test))))]

    def run(self, ctx, report):
        s, t0 = ctx.settings, time.time()
        n = min(s.masking_n, len(ctx.x_test))
        box = float(ops.PIXEL_RANGE[1] - ops.PIXEL_RANGE[0])
        step = ctx.step("box", lambda x, y, eps: attacks.pgd(
            ctx.model_fn, x, y, eps, steps=s.masking_steps, rand_init=True, seed=s.seed))
        box_acc = float(correct_on(step, ctx.x_test[:n], ctx.y_test[:n], s.batch_size,
                                   box).mean())
        checks: dict[str, Any] = {"box_radius": box, "box_accuracy": box_acc, "box_images": n}
        if report.get("pgd_accuracy"):  # clean accuracy on the images PGD ran on
            checks["clean_on_pgd_images"] = float(ctx.clean()[:ctx.n_pgd].mean())
        aa = report.get("autoattack")
        if aa:
            checks["square_only_breaks"] = aa["broken_by"].get("square", 0)
            fgsm = ctx.fgsm(aa["eps"], aa["num_images"]).mean()
            checks["clean_on_aa_images"] = float(ctx.clean()[:aa["num_images"]].mean())
            checks["fgsm_at_aa_eps"] = float(fgsm)
            checks["fgsm_to_aa_gap"] = float(fgsm - aa["robust_accuracy"])
        if ctx.training:
            checks["training"] = dict(ctx.training)
        checks["flags"] = masking_flags({**report, "masking": checks})
        ctx.done("masking", t0, float(len(checks["flags"])))
        return {"masking": checks}


register_measure(_Masking())
