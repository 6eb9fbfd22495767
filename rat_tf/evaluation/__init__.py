"""Robustness reports: clean, FGSM sweep, PGD, targeted and untargeted universal perturbations.

The protocol of docs/method.md, section 3. Every number is measured on held-out test images; the
universal perturbations are searched on *other* images (``x_search``, e.g. training images)
and :func:`robustness_report` refuses to run when the two sets share an image. A report is a
JSON-ready dict that also records every setting; :func:`write_report` turns several reports
(models side by side) into ``report.json``, ``report.md`` and PNG figures. Every measure runs
under a ``tf.distribute`` strategy, each batch split over its replicas, with the per-image
results of one device.

Modules: :mod:`~rat_tf.evaluation.settings` (:class:`EvalSettings`),
:mod:`~rat_tf.evaluation.common` (held-out check, models, the compiled ``correct()``),
:mod:`~rat_tf.evaluation.measures` (:class:`Measure`, :data:`MEASURES`),
:mod:`~rat_tf.evaluation.masking` (the gradient-masking checks),
:mod:`~rat_tf.evaluation.report` (:func:`robustness_report`, :func:`evaluate_models`,
:func:`write_report`) and :mod:`~rat_tf.evaluation.render` (Markdown, figures).
"""

import keras  # noqa: F401  (tests patch evaluation.keras.utils.Progbar)

from rat_tf.evaluation.settings import (DEFAULT_MEASURES, MASKING_FGSM_SHARE, MASKING_MIN_GAP,
                                        MASKING_MIN_IMAGES, MASKING_SE, MASKING_SQUARE_SHARE,
                                        MASKING_TRAIN_GAP, TRAINING_METRICS_FILE, EvalSettings,
                                        ModelFn, Report)
from rat_tf.evaluation.common import (accuracy, adversarial_accuracy, check_disjoint,
                                      correct_fn, correct_on, fgsm_correct_fn, load_model_fn,
                                      pgd_correct_fn, read_training_metrics,
                                      training_metrics_path, training_record)
from rat_tf.evaluation.measures import (MEASURES, Context, Measure, aa_per_image,
                                        aa_per_image_codes, register_measure,
                                        unregister_measure)
from rat_tf.evaluation.masking import masking_flags, noise_margin
from rat_tf.evaluation.report import (evaluate_models, parse_models, robustness_report,
                                      write_report)
from rat_tf.evaluation.render import (accuracy_figure, markdown_table, masking_facts,
                                      report_markdown)

MEASURES.freeze()  # the measures registered above (masking's last) are the built-in ones

__all__ = ["DEFAULT_MEASURES", "MASKING_FGSM_SHARE", "MASKING_MIN_GAP", "MASKING_MIN_IMAGES",
           "MASKING_SE", "MASKING_SQUARE_SHARE", "MASKING_TRAIN_GAP", "TRAINING_METRICS_FILE",
           "EvalSettings", "ModelFn", "Report", "accuracy", "adversarial_accuracy",
           "check_disjoint", "correct_fn", "correct_on", "fgsm_correct_fn", "load_model_fn",
           "pgd_correct_fn", "read_training_metrics", "training_metrics_path",
           "training_record", "MEASURES", "Context", "Measure", "aa_per_image",
           "aa_per_image_codes", "register_measure", "unregister_measure", "masking_flags",
           "noise_margin", "evaluate_models", "parse_models", "robustness_report",
           "write_report", "accuracy_figure", "markdown_table", "masking_facts",
           "report_markdown"]
