"""Train a published recipe and evaluate it as the papers did (one reproduction row).

    python3 bin/reproduce.py --recipe=mnist_fgsm_rs --output_dir=results/repro/mnist_fgsm_rs

Trains ``rat_tf.recipes.RECIPES[--recipe]`` on the whole training split into
``output_dir/model`` (resumed after a kill, skipped once finished with the same settings), then
measures clean accuracy, FGSM, PGD-50-10 and AutoAttack (standard) at the recipe's radius on the
first --n_test test images, with the gradient-masking checks; writes report.json, report.md,
recipe.json (the published figures, the settings changed from the recipe, training time) and
figures to --output_dir. Training flags given here (--seed, --epochs, --warmup_epochs,
--early_stop_drop, --rat_init, --label_smoothing, --ema_momentum, ...) override the recipe's
settings.
"""

from absl import flags

from rat_tf import cli, evaluation, recipes, training

Config = training.TrainConfig
FLAGS = flags.FLAGS
cli.define("enum", "recipe", "The published recipe to train and evaluate (rat_tf.recipes).",
           sets=recipes.reproduce, field="name", default=None, required=True,
           values=sorted(recipes.RECIPES))
cli.define_output_flag("the model, report.json, report.md, recipe.json", required=True,
                       sets=recipes.reproduce)
cli.define_data_flags(recipes.reproduce)
cli.define_n_test_flag(recipes.reproduce)
cli.define("integer", "seed", "Random seed.", sets=Config)
cli.define("integer", "epochs", "Epochs.", sets=Config)
cli.define_adv_flags(Config, only=["early_stop_drop", "early_stop_images"])
cli.define_recipe_flags(Config, only=["warmup_epochs", "label_smoothing", "ema_momentum"])
cli.define_rat_flags(Config, only=["rat_init", "rat_step_size", "rat_consistency",
                                   "rat_init_noise", "rat_step_loss", "rat_carry",
                                   "rat_carry_noise",
                                   "targets_per_image",
                                   "online_step_size"])
cli.define_search_flags(Config, only=["per_source"])
cli.define_eval_flags(only=["aa_n", "aa_restarts"])
cli.define_strategy_flags()


def main(argv):
    del argv
    config = recipes.train_config(FLAGS.recipe, **cli.given_values(Config))
    cli.check_data(config.dataset, FLAGS.data_dir, FLAGS.data_source)
    cli.check_output_dirs(output_dir=FLAGS.output_dir)
    eval_overrides = cli.given_values(evaluation.EvalSettings)
    report = recipes.reproduce(FLAGS.recipe, FLAGS.output_dir, n_test=FLAGS.n_test,
                               data_dir=FLAGS.data_dir, data_source=FLAGS.data_source,
                               strategy=cli.strategy(), eval_overrides=eval_overrides,
                               **cli.given_values(Config))
    print(evaluation.markdown_table({FLAGS.recipe: report}))


if __name__ == "__main__":
    cli.run(main)
