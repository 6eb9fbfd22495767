"""Export a trained classifier (.keras) as a TF SavedModel and verify the reloaded predictions.

Example:
  python bin/export.py --model_path=runs/mnist/model.keras --export_dir=runs/mnist/saved_model \
      --dataset=mnist
"""

import os

import keras
from absl import flags, logging

from rat_tf import cli, data, export

FLAGS = flags.FLAGS
flags.DEFINE_string("model_path", None, "Classifier saved as a .keras file.")
flags.DEFINE_string("export_dir", None, "Directory of the SavedModel to write.")
flags.DEFINE_bool("overwrite", False, "Replace an existing export_dir.")
flags.DEFINE_string("dataset", None, "Dataset whose test images verify the export "
                    "(default: seeded random images).")
cli.define_data_flags()
flags.DEFINE_alias("source", "data_source")
flags.DEFINE_integer("num_verify", 1000, "Number of test images used to verify the export.")
flags.DEFINE_float("atol", 1e-4, "Largest allowed absolute logit difference.")
flags.mark_flags_as_required(["model_path", "export_dir"])


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
        x, _ = data.load_arrays(FLAGS.dataset, "test", FLAGS.data_source, FLAGS.data_dir,
                                FLAGS.verify_checksums)
        x = x[:FLAGS.num_verify]
    classifier = keras.models.load_model(FLAGS.model_path, compile=False)
    path = export.export_saved_model(classifier, FLAGS.export_dir, overwrite=FLAGS.overwrite)
    diff = export.verify_export(path, classifier, x, atol=FLAGS.atol)
    logging.info("exported %s -> %s; max abs logit difference after reload: %.3g",
                 FLAGS.model_path, path, diff)
    print(f"exported {path}  max_abs_logit_diff={diff:.3g}")


if __name__ == "__main__":
    cli.run(main)
