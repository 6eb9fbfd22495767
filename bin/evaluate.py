"""Robustness report of one or more models side by side (docs/method.md, section 3).

    python3 bin/evaluate.py --dataset=mnist --models=std=runs/std/model.keras,rat=export/rat \\
        --perturbations_path=runs/rat/perturbations.npz --output_dir=results/eval

Models are .keras files, directories holding model.keras, or SavedModel directories. Measures
on the test split, searches fresh universal perturbations on the training split; writes
report.json, report.md and PNG figures to --output_dir and prints the table. The evaluation
flags are the fields of ``rat_tf.evaluation.EvalSettings`` (``--measures`` picks the measures);
``--strategy`` shards the test images of every measure over the strategy's replicas.
"""

from absl import flags, logging

from rat_tf import cli, distribute, evaluation

FLAGS = flags.FLAGS
cli.define("list", "models", "name=path,... (.keras file, folder holding model.keras, "
           "SavedModel folder).", sets=evaluation.evaluate_models, required=True)
cli.define_dataset_flag(evaluation.EvalSettings)
cli.define_data_flags(evaluation.evaluate_models)
cli.define_output_flag("report.json, report.md, PNG figures", required=True,
                       sets=evaluation.write_report, field="out_dir")
cli.define("string", "perturbations_path", "The perturbations used in training (.npz), for "
           "the 'TUP given' measure.", sets=evaluation.evaluate_models, field="perturbations",
           unset="no TUP given")
cli.define_eval_flags()
cli.define_strategy_flags()


def main(argv):
    del argv
    models = evaluation.parse_models(FLAGS.models)
    cli.check_data(FLAGS.dataset, FLAGS.data_dir, FLAGS.data_source)
    cli.check_inputs(models=models.values(), perturbations_path=FLAGS.perturbations_path)
    cli.check_output_dirs(output_dir=FLAGS.output_dir)
    settings = cli.eval_settings(FLAGS.dataset)
    strategy = cli.strategy()
    reports = {}
    for name, path in models.items():  # the report is rewritten as each model finishes
        reports.update(evaluation.evaluate_models(
            {name: path}, dataset=FLAGS.dataset, data_dir=FLAGS.data_dir,
            data_source=FLAGS.data_source, settings=settings,
            perturbations=FLAGS.perturbations_path, strategy=strategy))
        if distribute.is_chief(strategy):  # every worker measures; the chief writes
            evaluation.write_report(reports, FLAGS.output_dir,
                                    title=f"Robustness report: {FLAGS.dataset}")
    print(evaluation.markdown_table(reports))
    logging.info("report written to %s", FLAGS.output_dir)


if __name__ == "__main__":
    cli.run(main)
