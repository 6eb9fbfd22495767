"""Attack exported SavedModels with ART and with rat_tf on the same test images; compare.

    pip install -e ".[bench]"   # adversarial-robustness-toolbox
    python3 bin/crosscheck.py --dataset=mnist --models=std=export/std,rat=export/rat \\
        --n_test=1000 --output_dir=results

The evaluation flags are those of the robustness report (bin/evaluate.py), with its defaults.
``--measures`` picks the checks: clean, fgsm and pgd (:func:`rat_tf.crosscheck.crosscheck_with_art`)
and autoattack (:func:`rat_tf.crosscheck.crosscheck_autoattack`: rat_tf's AutoAttack against
ART's APGD-CE, APGD-DLR and Square on the first --aa_n images, slow). Prints a table (model,
attack, eps, ART acc, rat_tf acc, difference), writes crosscheck.json to --output_dir, and
exits with status 1 if a figure disagrees beyond the tolerance.
"""

import os

from absl import app, flags, logging

from rat_tf import cli, crosscheck, data, evaluation, files

CHECKS = ("clean", "fgsm", "pgd", "autoattack")  # the measures ART can check
FLAGS = flags.FLAGS
cli.define("list", "models", "name=path,... of SavedModels from bin/export.py.",
           sets=evaluation.parse_models, field="spec", required=True)
cli.define_dataset_flag(evaluation.EvalSettings)
cli.define_data_flags()
cli.define_output_flag("crosscheck.json", unset="print the table only")
cli.define("list", "measures", f"What to cross-check with ART, from {', '.join(CHECKS)} (clean "
           "is part of fgsm and pgd).", sets=evaluation.EvalSettings, default=list(CHECKS[:3]))
cli.define_eval_flags(only=["n_test", "fgsm_eps", "pgd_eps", "pgd_steps", "pgd_restarts",
                            "pgd_step_size", "aa_eps", "aa_n", "aa_steps", "aa_queries",
                            "aa_restarts", "aa_attacks", "batch_size", "seed"])
cli.define("float", "fgsm_tol", "Largest |accuracy difference| allowed for clean and FGSM.",
           sets=crosscheck.crosscheck_with_art)
cli.define("integer", "tol_images", "PGD and AutoAttack: rat_tf may leave this many more images "
           "unbroken than ART, or --tol_z standard deviations, if more.",
           sets=crosscheck.not_weaker, lower_bound=0)
cli.define("float", "tol_z", "PGD and AutoAttack: standard deviations (the square root of the "
           "images only one side breaks) by which rat_tf may leave more images unbroken than "
           "ART.", sets=crosscheck.not_weaker, lower_bound=0)


def main(argv):
    del argv
    models = evaluation.parse_models(FLAGS.models)
    other = sorted(set(FLAGS.measures) - set(CHECKS))
    if other or not set(FLAGS.measures) - {"clean"}:
        raise app.UsageError(f"--measures: ART cross-checks {', '.join(CHECKS[1:])} (with "
                             f"clean), got {FLAGS.measures}")
    cli.check_data(FLAGS.dataset, FLAGS.data_dir, FLAGS.data_source, splits=["test"])
    cli.check_inputs(models=models.values())
    cli.check_output_dirs(output_dir=FLAGS.output_dir)
    s = cli.eval_settings(FLAGS.dataset)
    x, y = data.load_arrays(FLAGS.dataset, "test", FLAGS.data_source, FLAGS.data_dir)
    x, y = x[:s.n_test], y[:s.n_test]
    results, aa_results = {}, {}
    for name, path in models.items():
        logging.info("cross-checking %s (%s) on %d %s test images", name, path, len(x),
                     FLAGS.dataset)
        if {"fgsm", "pgd"} & set(s.measures):
            results[name] = crosscheck.crosscheck_with_art(
                path, x, y, fgsm_eps=s.fgsm_eps if "fgsm" in s.measures else (),
                pgd_eps=s.pgd_eps if "pgd" in s.measures else (), pgd_steps=s.pgd_steps,
                pgd_restarts=s.pgd_restarts, pgd_step_size=s.pgd_step_size,
                fgsm_tol=FLAGS.fgsm_tol, tol_images=FLAGS.tol_images, tol_z=FLAGS.tol_z,
                batch_size=s.batch_size, seed=s.seed)
        if "autoattack" in s.measures:
            aa_results[name] = crosscheck.crosscheck_autoattack(
                path, x[:s.aa_n], y[:s.aa_n], s.resolved_aa_eps(), steps=s.aa_steps,
                n_queries=s.aa_queries, restarts=s.aa_restarts, attacks=s.aa_attacks,
                tol_images=FLAGS.tol_images, tol_z=FLAGS.tol_z, batch_size=s.batch_size,
                seed=s.seed)
    if results:
        print(crosscheck.format_table(results))
    for name, r in aa_results.items():
        print(f"{name}: AutoAttack L-inf {r['eps']:g} on {r['num_images']} images: rat_tf "
              f"{100 * r['rat_tf']:.1f}%, ART (APGD-CE, APGD-DLR, Square) "
              f"{100 * r['art']['square']:.1f}%, {r['excess_images']:+d} images unbroken "
              f"(allowed {r['allowed_images']:.1f}; broken by ART only {r['only_art_breaks']}, "
              f"by rat_tf only {r['only_rat_tf_breaks']}) {'ok' if r['ok'] else 'NO'}")
    if FLAGS.output_dir:
        logging.info("wrote %s", files.write_json(
            os.path.join(FLAGS.output_dir, "crosscheck.json"),
            {"dataset": FLAGS.dataset, "results": results, "autoattack": aa_results},
            indent=1))
    bad = [name for r in (results, aa_results) for name, res in r.items() if not res["ok"]]
    if bad:
        logging.error("ART and rat_tf disagree beyond tolerance for %s", ", ".join(bad))
        return 1
    return 0


if __name__ == "__main__":
    cli.run(main)
