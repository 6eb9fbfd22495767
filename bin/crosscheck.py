"""Attack exported SavedModels with ART and with rat_tf on the same test images; compare.

    pip install -e ".[bench]"   # adversarial-robustness-toolbox
    python3 bin/crosscheck.py --dataset=mnist --saved_model=std=export/std,rat=export/rat \\
        --n_test=1000 --output=results/crosscheck.json

FGSM and PGD (L-inf) settings default to those of the robustness report (bin/evaluate.py).
Prints a table (model, attack, eps, ART acc, rat_tf acc, difference), writes JSON to
--output, and exits with status 1 if a figure disagrees beyond the tolerance.
"""


from absl import flags, logging

from rat_tf import cli, crosscheck, data, evaluation, files

FLAGS = flags.FLAGS
flags.DEFINE_list("saved_model", None, "name=path,... of SavedModels from bin/export.py.")
flags.DEFINE_enum("dataset", "mnist", ["mnist", "fashion_mnist", "cifar10"], "Dataset.")
cli.define_data_flags()
flags.DEFINE_integer("n_test", 1000, "Number of test images (the first n of the test split).",
                     lower_bound=1)
flags.DEFINE_list("fgsm_eps", None, "FGSM radii (default: the report's, per dataset).")
flags.DEFINE_list("pgd_eps", None, "PGD radii (default: the report's, per dataset).")
flags.DEFINE_integer("pgd_steps", None, "PGD steps (default: the report's).")
flags.DEFINE_integer("pgd_restarts", None, "PGD random restarts (default: the report's).")
flags.DEFINE_float("pgd_step_size", None, "PGD step size (default 2.5 eps / steps).")
flags.DEFINE_float("fgsm_tol", crosscheck.DEFAULT_FGSM_TOL,
                   "Largest |accuracy difference| allowed for clean and FGSM.")
flags.DEFINE_float("pgd_tol", crosscheck.DEFAULT_PGD_TOL,
                   "Largest amount by which rat_tf's PGD accuracy may exceed ART's.")
flags.DEFINE_integer("batch_size", 250, "Attack batch size.")
flags.DEFINE_integer("seed", 0, "Seed of the PGD random starts (both sides).")
flags.DEFINE_string("output", None, "JSON file to write the results to.")
flags.mark_flags_as_required(["saved_model"])


def main(argv):
    del argv
    models = evaluation.parse_models(FLAGS.saved_model)
    cli.check_data(FLAGS.dataset, FLAGS.data_dir, FLAGS.data_source, splits=["test"])
    cli.check_inputs(saved_model=models.values())
    cli.check_output_files(output=FLAGS.output)
    settings = evaluation.EvalSettings.for_dataset(  # radii lists are parsed by EvalSettings
        FLAGS.dataset, fgsm_eps=FLAGS.fgsm_eps, pgd_eps=FLAGS.pgd_eps,
        pgd_steps=FLAGS.pgd_steps, pgd_restarts=FLAGS.pgd_restarts,
        pgd_step_size=FLAGS.pgd_step_size)
    x, y = data.load_arrays(FLAGS.dataset, "test", FLAGS.data_source, FLAGS.data_dir,
                            FLAGS.verify_checksums)
    x, y = x[:FLAGS.n_test], y[:FLAGS.n_test]
    results = {}
    for name, path in models.items():
        logging.info("cross-checking %s (%s) on %d %s test images", name, path, len(x),
                     FLAGS.dataset)
        results[name] = crosscheck.crosscheck_with_art(
            path, x, y, fgsm_eps=settings.fgsm_eps, pgd_eps=settings.pgd_eps,
            pgd_steps=settings.pgd_steps, pgd_restarts=settings.pgd_restarts,
            pgd_step_size=settings.pgd_step_size, fgsm_tol=FLAGS.fgsm_tol,
            pgd_tol=FLAGS.pgd_tol, batch_size=FLAGS.batch_size, seed=FLAGS.seed)
    print(crosscheck.format_table(results))
    if FLAGS.output:
        logging.info("wrote %s", files.write_json(
            FLAGS.output, {"dataset": FLAGS.dataset, "results": results}, indent=1))
    bad = [name for name, r in results.items() if not r["ok"]]
    if bad:
        logging.error("ART and rat_tf disagree beyond tolerance for %s", ", ".join(bad))
        return 1
    return 0


if __name__ == "__main__":
    cli.run(main)
