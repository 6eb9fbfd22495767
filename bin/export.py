"""Export a trained classifier (.keras) as a TF SavedModel and verify the reloaded predictions.

Example:
  python bin/export.py --model_path=runs/mnist/model.keras --export_dir=runs/mnist/saved_model \\
      --dataset=mnist
"""

import os

import keras
from absl import flags, logging

from rat_tf import cli, data, export

FLAGS = flags.FLAGS
cli.define("string", "model_path", "Classifier saved as a .keras file.", default=None,
           required=True)
cli.define("string", "export_dir", "Folder of the SavedModel to write.",
           sets=export.export_saved_model, field="path", required=True)
cli.define("bool", "overwrite", "Replace an existing --export_dir.", sets=export.export_saved_model)
cli.define_dataset_flag(data.load_arrays, default=None, help="Its test images verify the "
                        "export.", unset="seeded random images")
cli.define_data_flags()
cli.define_n_test_flag("export.verify_export (its images)", default=1000)
cli.define("float", "atol", "Largest allowed absolute logit difference.",
           sets=export.verify_export, default=1e-4)


def main(argv):
    del argv
    if FLAGS.dataset:
        cli.check_data(FLAGS.dataset, FLAGS.data_dir, FLAGS.data_source, splits=["test"])
    cli.check_inputs(model_path=FLAGS.model_path)
    if os.path.exists(FLAGS.export_dir) and not FLAGS.overwrite:
        raise FileExistsError(f"--export_dir: {FLAGS.export_dir} already exists; pass "
                              f"--overwrite to replace it")
    cli.check_output_files(export_dir=FLAGS.export_dir)
    x = None  # read (and validated) before the export, which it then verifies
    if FLAGS.dataset:
        x, _ = data.load_arrays(FLAGS.dataset, "test", FLAGS.data_source, FLAGS.data_dir)
        x = x[:FLAGS.n_test or None]
    classifier = keras.models.load_model(FLAGS.model_path, compile=False)
    path = export.export_saved_model(classifier, FLAGS.export_dir, overwrite=FLAGS.overwrite)
    diff = export.verify_export(path, classifier, x, atol=FLAGS.atol)
    logging.info("exported %s -> %s; max abs logit difference after reload: %.3g",
                 FLAGS.model_path, path, diff)
    print(f"exported {path}  max_abs_logit_diff={diff:.3g}")


if __name__ == "__main__":
    cli.run(main)
