"""The measures of a robustness report: :class:`Measure`, the registry :data:`MEASURES`
and the built-in measures but the masking checks (:mod:`rat_tf.evaluation.masking`)."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from rat_tf import attacks, autoattack, files
from rat_tf import registry
from rat_tf.evaluation.settings import EvalSettings, ModelFn
from rat_tf.evaluation.common import (correct_fn, correct_on, fgsm_correct_fn, float_or_none,
                                      jsonable_meta, linf_norms, mean_over_targets, pct,
                                      per_class_accuracy, pgd_correct_fn, radius_of)


@dataclasses.dataclass
class Context:
    """What the measures of one report share: the model, the images, the settings, the
    strategy whose replicas share every batch, compiled steps and the per-image results of
    earlier measures (``correct``, by key)."""

    model_fn: ModelFn
    x_test: np.ndarray
    y_test: np.ndarray
    x_search: np.ndarray  # the balanced subset the universal perturbations are searched on
    y_search: np.ndarray
    settings: EvalSettings
    num_classes: int
    n_pgd: int
    perturbations: np.ndarray | None = None  # V given (of training), if any
    perturbation_meta: dict = dataclasses.field(default_factory=dict)
    training: dict | None = None  # the model's final training adversarial accuracy, if known
    strategy: tf.distribute.Strategy = dataclasses.field(
        default_factory=tf.distribute.get_strategy)
    correct: dict = dataclasses.field(default_factory=dict)  # key -> bool [n] per test image
    done: Callable = lambda stage, t0, result=None: None  # noqa: E731 (set by the report)
    # progress(stage, cost done, revised cost) within a stage (set by the report)
    progress: Callable = lambda stage, done, total: None  # noqa: E731
    _steps: dict = dataclasses.field(default_factory=dict)

    def cached(self, key: str, build: Callable[[], attacks.ReplicaStep]
               ) -> attacks.ReplicaStep:
        """The compiled step of ``key``, built by ``build`` once per report."""
        if key not in self._steps:
            self._steps[key] = build()
        return self._steps[key]

    def step(self, key: str, attack: Callable | None = None) -> attacks.ReplicaStep:
        """The compiled :func:`correct_fn` of ``key`` (under ``attack``), once per report."""
        return self.cached(key, lambda: correct_fn(self.model_fn, attack, self.strategy))

    def clean(self) -> np.ndarray:
        """Per test image: classified correctly."""
        if "clean" not in self.correct:
            self.correct["clean"] = correct_on(self.step("clean"), self.x_test, self.y_test,
                                               self.settings.batch_size)
        return self.correct["clean"]

    def fgsm(self, eps: float, n: int | None = None) -> np.ndarray:
        """Per image of the first ``n`` test images: correct under FGSM at ``eps``."""
        n = len(self.x_test) if n is None else n
        key = f"fgsm {eps:g}"
        if key not in self.correct or len(self.correct[key]) < n:
            step = self.cached("fgsm", lambda: fgsm_correct_fn(self.model_fn,
                                                               strategy=self.strategy))
            self.correct[key] = correct_on(step, self.x_test[:n], self.y_test[:n],
                                           self.settings.batch_size, eps)
        return self.correct[key][:n]

    def share(self, n: float) -> float:
        """``n`` images (or image passes) as a fraction of the test set (for stage costs)."""
        return n / max(1, len(self.x_test))


class Measure:
    """One named unit of a robustness report: its stages (with a rough cost in forward and
    backward passes over the test set, for the progress bar), the report keys it fills, and
    its columns in the Markdown table. Subclass it and :func:`register_measure` an instance."""

    name = ""

    def check(self, settings: EvalSettings) -> None:
        """Raise ValueError naming a bad setting of this measure (called by EvalSettings)."""

    def stages(self, ctx: Context) -> list[tuple[str, float]]:
        """(stage name, cost) of each stage this measure will run."""
        return [(self.name, 1.0)]

    def run(self, ctx: Context, report: Mapping) -> dict:
        """Measure; return the report entries. Call ``ctx.done(stage, t0, result)`` per stage."""
        raise NotImplementedError

    def columns(self, report: Mapping) -> list[tuple[str, str]]:
        """(header, cell) pairs of this measure in the main Markdown table."""
        return []


MEASURES: registry.Registry[Measure] = registry.Registry("measure")


def register_measure(measure: Measure) -> Measure:
    """Add a measure to :data:`MEASURES` under its ``name`` (EvalSettings.measures picks it)."""
    if not isinstance(measure, Measure):
        raise ValueError("register_measure takes a Measure instance")
    return MEASURES.add(measure.name, measure)


def unregister_measure(name: str) -> None:
    """Remove a measure added by :func:`register_measure` (the built-in ones stay)."""
    MEASURES.remove(name)


class _Clean(Measure):
    name = "clean"

    def run(self, ctx, report):
        t0 = time.time()
        acc = float(ctx.clean().mean())
        ctx.done("clean", t0, acc)
        return {"clean_accuracy": acc}

    def columns(self, report):
        return [("clean", pct(report.get("clean_accuracy")))]


class _FGSM(Measure):
    name = "fgsm"

    def stages(self, ctx):
        return [(f"fgsm {e:g}", 3.0) for e in ctx.settings.fgsm_eps]

    def run(self, ctx, report):
        out = {}
        for eps in ctx.settings.fgsm_eps:
            t0 = time.time()
            out[f"{eps:g}"] = float(ctx.fgsm(eps).mean())
            ctx.done(f"fgsm {eps:g}", t0, out[f"{eps:g}"])
        return {"fgsm_accuracy": out}

    def columns(self, report):
        return [(f"FGSM {radius_of(report, e)}", pct(a))
                for e, a in report.get("fgsm_accuracy", {}).items()]


class _PGD(Measure):
    """PGD with restarts on the first ``n_pgd`` test images, and FGSM on those same images."""

    name = "pgd"

    def stages(self, ctx):
        s = ctx.settings
        return [(f"pgd {e:g}", 2.0 * s.pgd_steps * s.pgd_restarts * ctx.share(ctx.n_pgd))
                for e in s.pgd_eps]

    def run(self, ctx, report):
        s, n = ctx.settings, ctx.n_pgd
        step = ctx.cached("pgd", lambda: pgd_correct_fn(
            ctx.model_fn, steps=s.pgd_steps, restarts=s.pgd_restarts,
            step_size=s.pgd_step_size, seed=s.seed, strategy=ctx.strategy))
        acc, fgsm = {}, {}
        for eps in s.pgd_eps:
            t0 = time.time()
            acc[f"{eps:g}"] = float(correct_on(step, ctx.x_test[:n], ctx.y_test[:n],
                                               s.batch_size, eps).mean())
            fgsm[f"{eps:g}"] = float(ctx.fgsm(eps, n).mean())
            ctx.done(f"pgd {eps:g}", t0, acc[f"{eps:g}"])
        # FGSM at the PGD radii on the PGD images
        return {"pgd_accuracy": acc, "pgd_fgsm_accuracy": fgsm}

    def columns(self, report):
        st = report["settings"]
        steps = f"PGD-{st['pgd_steps']}x{st['pgd_restarts']}"
        if report.get("num_pgd", report["num_test"]) < report["num_test"]:
            steps += f" (first {report['num_pgd']})"
        return [(f"{steps} {radius_of(report, e)}", pct(a))
                for e, a in report.get("pgd_accuracy", {}).items()]


class _PerClass(Measure):
    name = "per_class"

    def stages(self, ctx):
        return []

    def run(self, ctx, report):
        k, y = ctx.num_classes, ctx.y_test
        return {"per_class": {
            "count": np.bincount(y, minlength=k).astype(int).tolist(),
            "clean": per_class_accuracy(ctx.clean(), y, k),
            "fgsm": per_class_accuracy(ctx.fgsm(ctx.settings.class_eps), y, k),
            "fgsm_eps": float(ctx.settings.class_eps)}}


def _tup_column(report: Mapping, which: str) -> tuple[str, str]:
    st = report["settings"]
    tup = (radius_of(report, st["tup_eps"])
           + ("" if st["tup_norm"] == "linf" else f" {st['tup_norm']}"))
    entry = report.get(f"tup_{which}")
    return f"TUP {which} {tup} (succ.)", pct(entry["mean"] if entry else None)


def _tup_success(ctx, v: np.ndarray) -> dict:
    """The success of V per target on the test images, its mean and its L-inf size."""
    rates = np.asarray(attacks.targeted_success_rate(
        ctx.model_fn, ctx.x_test, ctx.y_test, v, batch_size=ctx.settings.batch_size * 2,
        strategy=ctx.strategy), np.float64)
    return {"success_rate": files.floats(rates), "mean": mean_over_targets(rates, v),
            "linf": linf_norms(v)}


class _TUPGiven(Measure):
    """Success on the test images of the perturbations used in training (if given)."""

    name = "tup_given"

    def stages(self, ctx):
        return [] if ctx.perturbations is None else [("tup given", float(ctx.num_classes))]

    def run(self, ctx, report):
        v = ctx.perturbations
        if v is None:
            return {"tup_given": None}
        t0 = time.time()
        out = {**_tup_success(ctx, v), "meta": jsonable_meta(ctx.perturbation_meta)}
        report.arrays["tup_given"] = v
        ctx.done("tup given", t0, out["mean"])
        return {"tup_given": out}

    def columns(self, report):
        return [_tup_column(report, "given")]


class _TUPFresh(Measure):
    """Targeted universal perturbations searched again against the model, on other images."""

    name = "tup_fresh"

    def stages(self, ctx):
        s = ctx.settings
        search = ctx.share(len(ctx.x_search)) * ctx.num_classes
        return [("tup fresh", 2.0 * s.tup_passes * search + ctx.num_classes)]

    def run(self, ctx, report):
        s, t0 = ctx.settings, time.time()
        v, stats = attacks.targeted_universal(
            ctx.model_fn, ctx.x_search, ctx.y_search, s.tup_eps, num_classes=ctx.num_classes,
            norm=s.tup_norm, method=s.tup_method, delta=s.tup_delta, max_passes=s.tup_passes,
            step_size=s.tup_step_size, batch_size=s.tup_batch_size, seed=s.seed,
            strategy=ctx.strategy)
        v = np.asarray(v, np.float32)
        out = {**_tup_success(ctx, v),
               "search_success_rate": files.floats(stats.get("success_rate", [])),
               "passes": int(stats.get("passes", 0)),
               "norm": files.floats(stats.get("norm", []))}
        report.arrays["tup_fresh"] = v
        ctx.done("tup fresh", t0, out["mean"])
        return {"tup_fresh": out}

    def columns(self, report):
        return [_tup_column(report, "fresh")]


class _UAP(Measure):
    """An untargeted universal perturbation searched on the search images; its fooling rate."""

    name = "uap"

    def stages(self, ctx):
        return [("uap", 2.0 * ctx.settings.uap_passes * ctx.share(len(ctx.x_search)) + 2.0)]

    def run(self, ctx, report):
        s, t0 = ctx.settings, time.time()
        eps = float(s.uap_eps or s.tup_eps)
        v, stats = attacks.untargeted_universal(ctx.model_fn, ctx.x_search, ctx.y_search, eps,
                                                norm=s.tup_norm, max_passes=s.uap_passes,
                                                batch_size=s.tup_batch_size, seed=s.seed,
                                                strategy=ctx.strategy)
        v = np.asarray(v, np.float32)
        out = {"fooling_rate": float(attacks.fooling_rate(ctx.model_fn, ctx.x_test, v,
                                                          batch_size=s.batch_size,
                                                          strategy=ctx.strategy)),
               "eps": eps, "norm": s.tup_norm,
               "search_fooling_rate": float_or_none(stats.get("fooling_rate")),
               "passes": int(stats.get("passes", 0))}
        report.arrays["uap"] = v
        ctx.done("uap", t0, out["fooling_rate"])
        return {"uap": out}

    def columns(self, report):
        return [(f"UAP {radius_of(report, report['settings']['uap_eps'])} (fool.)",
                 pct(report["uap"]["fooling_rate"] if report.get("uap") else None))]


_AA_ROBUST_GUESS = 0.1  # the share of images left for the attacks after the first


def _aa_n(ctx: Context) -> int:
    n = ctx.settings.aa_n
    return len(ctx.x_test) if n is None else min(int(n), len(ctx.x_test))


def aa_per_image_codes(broken_by: Sequence[str | None], attacks: Sequence[str]) -> dict:
    """AutoAttack's outcome per image, compact for report.json: ``{"names": [...], "codes":
    "..."}``, image i's outcome being ``names[int(codes[i])]``.

    ``broken_by`` is :func:`rat_tf.autoattack.autoattack`'s (the attack that broke each image,
    "clean" if misclassified, None if robust); ``attacks`` the sequence run, "clean" first or
    not. The names are "robust", "clean", then the attacks in order.
    """
    names = ["robust", "clean"] + [a for a in attacks if a != "clean"]
    if len(names) > 10:
        raise ValueError(f"at most 8 attacks have one-digit codes, got {list(attacks)}")
    code = {name: str(i) for i, name in enumerate(names)}
    return {"names": names, "codes": "".join(code["robust" if b is None else b]
                                             for b in broken_by)}


def aa_per_image(entry: Mapping) -> list[str]:
    """Per evaluated image, in test-set order (item i is test image i), what broke it under
    AutoAttack: "clean" (misclassified), an attack's name, or "robust"; ``entry`` is the
    report's ``autoattack`` entry (or its ``per_image``)."""
    per_image = entry.get("per_image", entry)
    names = per_image["names"]
    return [names[int(c)] for c in per_image["codes"]]


class _AutoAttack(Measure):
    """AutoAttack (APGD-CE, APGD-T, FAB-T, Square): worst case per image, with the breakdown."""

    name = "autoattack"

    def check(self, settings):
        autoattack.check_attacks(settings.aa_attacks, settings.aa_version, "linf")

    def _attacks(self, ctx):
        names = autoattack.check_attacks(ctx.settings.aa_attacks, ctx.settings.aa_version,
                                         "linf")
        if ctx.num_classes < 4 and ctx.settings.aa_attacks is None:
            names = [a for a in names if a != "apgd-t"]  # targeted DLR needs 4 classes
        return names

    def stages(self, ctx):
        # a guess until the run tells how many images the first attack left robust
        s, n = ctx.settings, _aa_n(ctx)
        kw = dict(steps=s.aa_steps, n_queries=s.aa_queries, batch_size=s.batch_size,
                  restarts=s.aa_restarts, n_target_classes=min(9, ctx.num_classes - 1),
                  replicas=ctx.strategy.num_replicas_in_sync)
        names = self._attacks(ctx)
        cost = autoattack.attack_cost(names[0], n, **kw) + sum(
            autoattack.attack_cost(a, math.ceil(n * _AA_ROBUST_GUESS), **kw) for a in names[1:])
        return [("autoattack", ctx.share(cost))]

    def run(self, ctx, report):
        s, n, t0 = ctx.settings, _aa_n(ctx), time.time()
        eps = s.resolved_aa_eps()
        out = autoattack.autoattack(
            ctx.model_fn, ctx.x_test[:n], ctx.y_test[:n], eps, attacks=self._attacks(ctx),
            seed=s.seed, batch_size=s.batch_size, steps=s.aa_steps, n_queries=s.aa_queries,
            restarts=s.aa_restarts, n_target_classes=min(9, ctx.num_classes - 1),
            strategy=ctx.strategy,
            progress=lambda done, total: ctx.progress("autoattack", ctx.share(done),
                                                      ctx.share(total)))
        broken = [b for b in out["broken_by"] if b not in (None, "clean")]
        result = {"eps": eps, "num_images": n, "robust_accuracy": float(out["robust"].mean()),
                  "after_each": out["robust_accuracy"],
                  "broken_by": {a: broken.count(a) for a in out["robust_accuracy"]
                                if a != "clean"},
                  "per_image": aa_per_image_codes(out["broken_by"], list(out["robust_accuracy"])),
                  "seconds": {a: round(t, 2) for a, t in out["seconds"].items()}}
        ctx.correct["autoattack"] = out["robust"]
        ctx.done("autoattack", t0, result["robust_accuracy"])
        return {"autoattack": result}

    def columns(self, report):
        aa = report.get("autoattack")
        if not aa:
            return [("AA", "-")]
        first = "" if aa["num_images"] >= report["num_test"] else f" (first {aa['num_images']})"
        return [(f"AA {radius_of(report, aa['eps'])}{first}", pct(aa["robust_accuracy"]))]


for _measure in (_Clean(), _FGSM(), _PGD(), _PerClass(), _TUPGiven(), _TUPFresh(), _UAP(),
                 _AutoAttack()):
    register_measure(_measure)
