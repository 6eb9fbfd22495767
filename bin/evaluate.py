"""Robustness report of one or more models side by side (docs/method.md, section 3).

    python3 bin/evaluate.py --dataset=mnist --models=std=runs/std/model.keras,rat=export/rat \\
        --perturbations=runs/rat/perturbations.npz --output_dir=results/eval

Models are .keras files, directories holding model.keras, or SavedModel directories. Measures
on the test split, searches fresh universal perturbations on the training split; writes
report.json, report.md and PNG figures to --output_dir and prints the table.
"""

import dataclasses

from absl import flags, logging

from rat_tf import attacks, cli, data, evaluation, ops

FLAGS = flags.FLAGS
flags.DEFINE_list("models", None, "name=path,... (.keras file, dir with model.keras, SavedModel)")
flags.DEFINE_enum("dataset", "mnist", ["mnist", "fashion_mnist", "cifar10"], "Dataset.")
cli.define_data_flags()
flags.DEFINE_string("output_dir", None, "Where to write report.json, report.md, PNGs.")
flags.DEFINE_string("perturbations", None, "Optional .npz of the perturbations used in training.")
flags.DEFINE_list("fgsm_eps", None, "FGSM radii (default per dataset).")
flags.DEFINE_list("pgd_eps", None, "PGD radii (default per dataset).")
flags.DEFINE_integer("pgd_steps", None, "PGD steps.")
flags.DEFINE_integer("pgd_restarts", None, "PGD random restarts.")
flags.DEFINE_float("pgd_step_size", None, "PGD step size (default 2.5 eps / steps).")
flags.DEFINE_float("class_eps", None, "FGSM radius of the per-class breakdown.")
flags.DEFINE_float("tup_eps", None, "Radius of the fresh targeted universal perturbations.")
flags.DEFINE_enum("tup_norm", None, list(ops.NORMS), "Norm of the universal perturbations.")
flags.DEFINE_enum("tup_method", None, list(attacks.TU_METHODS), "TUP search method.")
flags.DEFINE_integer("tup_passes", None, "TUP search passes.")
flags.DEFINE_integer("tup_n_per_class", None, "TUP search images per class.")
flags.DEFINE_float("uap_eps", None, "Untargeted universal radius (default tup_eps).")
flags.DEFINE_integer("uap_passes", None, "Untargeted universal search passes.")
flags.DEFINE_integer("n_test", None, "Test images (default 1000; 0 = all).")
flags.DEFINE_integer("n_pgd", None, "PGD runs on the first N test images (default and 0: all).")
flags.DEFINE_integer("batch_size", None, "Evaluation batch size.")
flags.DEFINE_integer("seed", None, "Seed of random inits and searches.")
flags.mark_flags_as_required(["models", "output_dir"])


def main(argv):
    del argv
    models = evaluation.parse_models(FLAGS.models)
    cli.check_data(FLAGS.dataset, FLAGS.data_dir, FLAGS.data_source)
    cli.check_inputs(models=models.values(), perturbations=FLAGS.perturbations)
    cli.check_output_dirs(output_dir=FLAGS.output_dir)
    data.set_verify_checksums(FLAGS.verify_checksums)  # evaluate_models has no such argument
    settings = evaluation.EvalSettings.for_dataset(  # radii lists are parsed by EvalSettings
        FLAGS.dataset, fgsm_eps=FLAGS.fgsm_eps, pgd_eps=FLAGS.pgd_eps,
        pgd_steps=FLAGS.pgd_steps, pgd_restarts=FLAGS.pgd_restarts,
        pgd_step_size=FLAGS.pgd_step_size, class_eps=FLAGS.class_eps, tup_eps=FLAGS.tup_eps,
        tup_norm=FLAGS.tup_norm, tup_method=FLAGS.tup_method, tup_passes=FLAGS.tup_passes,
        tup_n_per_class=FLAGS.tup_n_per_class, uap_eps=FLAGS.uap_eps,
        uap_passes=FLAGS.uap_passes, batch_size=FLAGS.batch_size, seed=FLAGS.seed)
    if FLAGS.n_test is not None:  # 0 = every test image; replace() validates again
        settings = dataclasses.replace(settings, n_test=FLAGS.n_test or None)
    if FLAGS.n_pgd is not None:
        settings = dataclasses.replace(settings, n_pgd=FLAGS.n_pgd or None)
    reports = {}
    for name, path in models.items():  # the report is rewritten as each model finishes
        reports.update(evaluation.evaluate_models(
            {name: path}, dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
            data_source=FLAGS.data_source, settings=settings, perturbations=FLAGS.perturbations))
        evaluation.write_report(reports, FLAGS.output_dir,
                                title=f"Robustness report: {FLAGS.dataset}")
    print(evaluation.markdown_table(reports))
    logging.info("report written to %s", FLAGS.output_dir)


if __name__ == "__main__":
    cli.run(main)
