"""Reports rendered: the Markdown tables and sections, and the accuracy figure."""

from __future__ import annotations

import json
from typing import Mapping


from rat_tf import plots
from rat_tf.evaluation.settings import DEFAULT_MEASURES
from rat_tf.evaluation.common import pct, radius_label, radius_of
from rat_tf.evaluation.measures import MEASURES
from rat_tf.evaluation.masking import training_pgd


def markdown_table(reports: Mapping[str, Mapping]) -> str:
    """A Markdown table with one row per model and the columns of every measure (in %)."""
    if not reports:
        raise ValueError("no reports to tabulate")
    cells = []
    for r in reports.values():
        row: dict[str, str] = {}
        for m in r["settings"].get("measures", DEFAULT_MEASURES):
            if m in MEASURES:
                row.update(MEASURES[m].columns(r))
        cells.append(row)
    head = list(dict.fromkeys(h for row in cells for h in row))
    lines = ["| " + " | ".join(["model"] + head) + " |", "|" + "---|" * (len(head) + 1)]
    for name, row in zip(reports, cells):
        lines.append("| " + " | ".join([name] + [row.get(h, "-") for h in head]) + " |")
    return "\n".join(lines) + "\n"


def _class_table(reports: Mapping[str, Mapping]) -> str:
    """The per-class section: clean and FGSM accuracy and TUP success per class, per model
    ("" when no report measured any of them)."""
    first = next(iter(reports.values()))
    names = first["class_names"]
    head = ["model", "measure"] + list(names)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in reports.items():
        pc = r.get("per_class")
        if pc:
            lines.append("| " + " | ".join([name, "clean acc"] + [pct(v) for v in pc["clean"]])
                         + " |")
            lines.append("| " + " | ".join(
                [name, f"FGSM {radius_label(pc['fgsm_eps'], r['dataset'])} acc"]
                + [pct(v) for v in pc["fgsm"]]) + " |")
        if r.get("tup_fresh"):
            lines.append("| " + " | ".join([name, "TUP fresh succ. (target)"]
                                           + [pct(v) for v in r["tup_fresh"]["success_rate"]])
                         + " |")
        if r.get("tup_given"):
            lines.append("| " + " | ".join([name, "TUP given succ. (target)"]
                                           + [pct(v) for v in r["tup_given"]["success_rate"]])
                         + " |")
    if len(lines) == 2:
        return ""
    return "\n## Per class\n\n" + "\n".join(lines) + "\n"


def _pgd_fgsm(reports: Mapping[str, Mapping]) -> str:
    """FGSM accuracy at the PGD radii on the PGD images, per model, for the report's text."""
    return "; ".join(f"{name} " + ", ".join(f"{radius_label(e, r['dataset'])} {pct(a)}"
                                            for e, a in r.get("pgd_fgsm_accuracy", {}).items())
                     for name, r in reports.items())


def _autoattack_section(reports: Mapping[str, Mapping]) -> str:
    """AutoAttack's breakdown: robust accuracy after each attack, per model."""
    rows = [(name, r["autoattack"]) for name, r in reports.items() if r.get("autoattack")]
    if not rows:
        return ""
    attacks_run = list(dict.fromkeys(a for _, aa in rows for a in aa["after_each"]))
    head = ["model", "images"] + [f"after {a}" for a in attacks_run]
    radius = radius_label(rows[0][1]["eps"], next(iter(reports.values()))["dataset"])
    lines = ["\n## AutoAttack\n",
             f"Robust accuracy (%) at L-inf {radius} "
             f"after each attack of the sequence, each run only on the images still robust; "
             f"the last column is the AA figure (worst case per image). report.json keeps "
             f"what broke each image (`autoattack.per_image`, read by "
             f"`rat_tf.evaluation.aa_per_image`).\n",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, aa in rows:
        lines.append("| " + " | ".join([name, str(aa["num_images"])] + [
            pct(aa["after_each"].get(a)) for a in attacks_run]) + " |")
    return "\n".join(lines) + "\n"


def masking_facts(r: Mapping) -> str:
    """What the masking checks measured of one report, for its line in report.md."""
    m = r["masking"]
    facts = [f"PGD at L-inf {m['box_radius']:g} (the whole pixel box): "
             f"{pct(m['box_accuracy'])}% accuracy on {m['box_images']} images"]
    if m.get("fgsm_to_aa_gap") is not None:
        facts.append(f"FGSM minus AA accuracy at the AA radius: "
                     f"{100 * m['fgsm_to_aa_gap']:.1f} points")
    t = m.get("training")
    if t:
        pgd = training_pgd(r)
        facts.append(f"training adversarial accuracy ({t.get('method') or 'training'}, "
                     f"{t['norm']} {radius_of(r, t['eps'])}, last epoch) "
                     f"{pct(t['adversarial_accuracy'])}%, "
                     + (f"held-out PGD there {pct(pgd[1])}%" if pgd else
                        "not compared: the report has no L-inf PGD at its radius"))
    return "; ".join(facts)


def _masking_section(reports: Mapping[str, Mapping]) -> str:
    """The gradient-masking checks, said plainly, per model: each flag on its own line, or
    that there is no sign of masking."""
    rows = [(name, r) for name, r in reports.items() if r.get("masking")]
    if not rows:
        return ""
    lines = ["\n## Gradient-masking checks\n"]
    for name, r in rows:
        flags = r["masking"]["flags"]
        if not flags:
            lines.append(f"- **{name}**: no sign of gradient masking. ({masking_facts(r)}.)")
            continue
        lines.append(f"- **{name}**: {len(flags)} sign{'s' * (len(flags) > 1)} of gradient "
                     f"masking ({masking_facts(r)}):")
        lines += [f"  - {flag}." for flag in flags]
    return "\n".join(lines) + "\n"


def report_markdown(reports: Mapping[str, Mapping], title: str = "Robustness report") -> str:
    """The whole report.md: main table, AutoAttack and masking sections, per-class table (when
    measured) and the settings."""
    first = next(iter(reports.values()))
    st = first["settings"]
    universal = any(r.get(k) for r in reports.values() for k in ("tup_given", "tup_fresh", "uap"))
    parts = [f"# {title}\n",
             f"{first['num_test']} held-out test images ({first['dataset']})"
             + (f"; universal perturbations searched on {first['num_search']} other images. "
                f"Accuracies and TUP success / UAP fooling rates in %. TUP: mean over targets of "
                f"the fraction of images (label != target) sent to the target; 'given' = the "
                f"perturbations used in training, 'fresh' = searched again against each model."
                if universal else ". Accuracies in %.")
             + (f" PGD runs on the first {first['num_pgd']} of the test images (FGSM on those "
                f"same images: {_pgd_fgsm(reports)})."
                if first.get("num_pgd", first["num_test"]) < first["num_test"] else "") + "\n",
             markdown_table(reports), _autoattack_section(reports), _masking_section(reports),
             _class_table(reports),
             "\n## Evaluation settings\n", "Of the evaluation, not of training (`seed` seeds the "
             "attacks' random starts).\n",
             "\n".join(f"- {k}: {json.dumps(v)}" for k, v in st.items())
             + "\n"]
    return "\n".join(p for p in parts if p)


def accuracy_figure(reports: Mapping[str, Mapping], path: str) -> str | None:
    """Write the PNG of FGSM accuracy against radius (lines) with PGD and AutoAttack
    (markers), one colour per model; return its path (None: no accuracy to draw)."""
    curves, points = {}, {}
    for name, r in reports.items():
        aa = r.get("autoattack")
        points[name] = {"PGD": [(float(e), a) for e, a in r.get("pgd_accuracy", {}).items()],
                        "AA": [(aa["eps"], aa["robust_accuracy"])] if aa else []}
        curve = {0.0: r["clean_accuracy"]} if "clean_accuracy" in r else {}
        curve.update({float(e): a for e, a in r.get("fgsm_accuracy", {}).items()})
        if curve:
            curves[name] = curve
    if not curves:
        return None
    return plots.accuracy_vs_radius(curves, path, points=points,
                                    title="FGSM accuracy (lines), PGD and AA (markers)")
