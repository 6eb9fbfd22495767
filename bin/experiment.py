"""The paper's pipeline in one command: standard model, V, RAT, RAT-FGSM, FGSM-AT, PGD-AT,
evaluation.

    python3 bin/experiment.py --dataset=mnist --budget=quick --output_dir=results/mnist_quick

Stages already done in --output_dir are skipped (rerun the same command to resume). The
budget presets and the layout of the results directory are documented in rat_tf/experiment.py
(the tuning runs behind the presets in docs/experiments.md); report.md holds the side-by-side
table; docs/results.md gives the run times. Each flag sets the
``rat_tf.experiment.ExperimentConfig`` field of its name, the evaluation flags its
``eval_overrides`` (``rat_tf.evaluation.EvalSettings`` fields); unset ones come from the
budget preset.
"""

import os

from absl import flags, logging

from rat_tf import cli, data, evaluation, experiment, training

Config = experiment.ExperimentConfig
FLAGS = flags.FLAGS
cli.define_dataset_flag(Config)
cli.define("enum", "budget", "Size preset: tiny (tests), quick (minutes on 2 CPU cores), "
           "small (hours on 2 CPU cores), full (a GPU).", sets=Config,
           values=experiment.BUDGETS)
cli.define_output_flag("every stage's outputs and report.md (resumed if it exists)",
                       sets=Config, required=True)
cli.define_data_flags(Config)
cli.define("string", "model", "Model zoo name (rat_tf.models).", sets=Config)
cli.define("integer", "seed", "Random seed (of every stage and of the evaluation).", sets=Config)
cli.define("list", "methods", "Fine-tuning methods, from "
           f"{', '.join(experiment.FINETUNE_METHODS)} (standard: the clean fine-tuning control).",
           sets=Config)
cli.define("integer", "pretrain_subset", "(a) balanced training images, 0 = all.", sets=Config)
cli.define("integer", "pretrain_epochs", "(a) epochs.", sets=Config)
cli.define("integer", "pretrain_batch_size", "(a) global batch size.", sets=Config)
cli.define("float", "pretrain_lr", "(a) learning rate.", sets=Config)
cli.define("enum", "pretrain_optimizer", "(a) optimizer (momentum: SGD with Nesterov momentum).",
           sets=Config, values=training.OPTIMIZERS)
cli.define("enum", "pretrain_lr_schedule", "(a) learning-rate schedule.", sets=Config,
           values=training.LR_SCHEDULES)
cli.define("float", "pretrain_warmup_epochs", "(a) linear warm-up epochs (cosine, onecycle).",
           sets=Config, lower_bound=0)
cli.define("float", "pretrain_weight_decay", "(a) decoupled weight decay.", sets=Config,
           lower_bound=0)
cli.define("float", "pretrain_label_smoothing", "(a) label smoothing, in [0, 1).", sets=Config)
cli.define("enum", "pretrain_augment", "(a) augmentation of the training batches.",
           sets=Config, values=tuple(data.AUGMENTATIONS))
cli.define_search_flags(Config)
cli.define("integer", "finetune_subset", "(c,d) balanced fine-tuning images, the same for every "
           "method.", sets=Config)
cli.define("integer", "finetune_epochs", "(c,d) epochs.", sets=Config)
cli.define("integer", "finetune_batch_size", "(c,d) global batch size.", sets=Config)
cli.define("float", "finetune_lr", "(c,d) learning rate (Adam).", sets=Config)
cli.define_rat_flags(Config)
cli.define_adv_flags(Config)
cli.define_eval_flags(preset=True, exclude=["seed", "batch_size", "tup_eps", "tup_norm"])
cli.define_strategy_flags()


def main(argv):
    del argv
    cli.check_data(FLAGS.dataset, FLAGS.data_dir, FLAGS.data_source)
    cli.check_output_dirs(output_dir=FLAGS.output_dir)
    config = Config(**cli.values(Config),
                    eval_overrides=cli.values(evaluation.EvalSettings))
    summary = experiment.run(config, cli.strategy())
    with open(os.path.join(summary["output_dir"], summary["files"]["markdown"])) as f:
        print(f.read())
    logging.info("results in %s", summary["output_dir"])


if __name__ == "__main__":
    cli.run(main)
