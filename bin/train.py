"""Train a classifier with standard training, RAT, FGSM-AT or PGD-AT (resumable).

    python bin/train.py --method=standard --dataset=mnist --model=mnist_cnn --epochs=3 \\
        --model_dir=runs/std
    python bin/train.py --method=rat --init_from=runs/std/model.keras --epochs=5 \\
        --model_dir=runs/rat            # 1,000 balanced images, V searched at start
    python bin/train.py --dataset=cifar10 --model=fast_cifar_net --epochs=10 --batch_size=256 \
        --optimizer=momentum --lr=0.2 --lr_schedule=onecycle --warmup_epochs=1 \
        --weight_decay=0.005 --label_smoothing=0.2 --augment=crop_flip --model_dir=runs/cifar
                                        # the CIFAR-10 start-model recipe (docs/experiments.md)
    python bin/train.py --recipe=mnist_fgsm_rs --model_dir=runs/fgsm_rs
                                        # a published recipe (rat_tf.recipes); flags given
                                        # on the command line override its settings

Rerunning the same command after a kill resumes from ``model_dir/backup``. Outputs:
``model_dir/model.keras``, ``metrics.json``, ``history.csv`` (and ``perturbations.npz``).
Every flag sets the ``rat_tf.training.TrainConfig`` field of its name (BUILD.md, Flags).
"""

import json

from absl import flags, logging

from rat_tf import cli, recipes, trainers, training

Config = training.TrainConfig
FLAGS = flags.FLAGS
cli.define("enum", "method", "Training method.", sets=Config, values=trainers.METHODS)
cli.define("enum", "recipe", "A published recipe (rat_tf.recipes) whose settings replace the "
           "defaults; flags given on the command line override them.",
           sets="rat_tf.recipes.RECIPES", default=None, values=sorted(recipes.RECIPES))
cli.define_dataset_flag(Config)
cli.define_data_flags(Config)
cli.define("string", "model", "Model zoo name (rat_tf.models) to train from scratch; ignored "
           "with --init_from.", sets=Config)
cli.define("string", "model_dir", "Output and checkpoint folder (resumed if it holds a backup).",
           sets=Config)
cli.define("string", "init_from", "Any .keras classifier to fine-tune from (its architecture "
           "comes from the file; --model is for training from scratch).", sets=Config)
cli.define("integer", "epochs", "Epochs.", sets=Config)
cli.define("integer", "batch_size", "GLOBAL batch size.", sets=Config)
cli.define("integer", "steps_per_epoch", "Steps per epoch (0: one pass over the data).",
           sets=Config)
cli.define("float", "lr", "Learning rate.", sets=Config)
cli.define("enum", "lr_schedule", "LR schedule (onecycle: linear warm-up, then linear decay to "
           "0).", sets=Config, values=training.LR_SCHEDULES)
cli.define("enum", "optimizer", "Optimizer (momentum: SGD with Nesterov momentum 0.9).",
           sets=Config, values=training.OPTIMIZERS)
cli.define_recipe_flags(Config)
cli.define("integer", "train_subset", "Balanced training subset: total images, a multiple of "
           "the classes (0: all).", sets=Config,
           unset=f"{training.DEFAULT_RAT_SUBSET} for rat, all otherwise")
cli.define_n_test_flag(Config)
cli.define("integer", "seed", "Random seed.", sets=Config)
cli.define("string", "perturbations_path", "RAT: V from bin/perturb.py (.npz); empty: search "
           "it.", sets=Config)
cli.define_search_flags(Config)
cli.define_rat_flags(Config)
cli.define_adv_flags(Config)
cli.define_strategy_flags(Config, tpu=True)
cli.define("integer", "verbose", "Keras fit verbosity.", sets=Config,
           unset="a progress bar if interactive, one line per epoch if not")
cli.define("bool", "restart", "Drop a backup left in --model_dir and start over (without it a "
           "backup is resumed, and refused if its settings differ).", sets=Config)


def main(argv):
    del argv
    if FLAGS.recipe:
        config = recipes.train_config(FLAGS.recipe, **cli.given_values(Config))
    else:
        config = Config(**cli.values(Config))
    cli.check_data(config.dataset, config.data_dir, config.data_source)
    cli.check_inputs(init_from=FLAGS.init_from, perturbations_path=FLAGS.perturbations_path)
    cli.check_output_dirs(model_dir=FLAGS.model_dir)
    metrics = training.train(config, cli.strategy())
    summary = {k: metrics[k] for k in ("test_accuracy", "images_per_sec", "wall_seconds",
                                       "epochs_run_this_session", "resumed")}
    logging.info("metrics: %s", json.dumps(summary))
    print(json.dumps(summary))


if __name__ == "__main__":
    cli.run(main)
