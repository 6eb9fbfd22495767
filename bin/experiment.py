"""The paper's pipeline in one command: standard model, V, RAT, FGSM-AT, PGD-AT, evaluation.

    python3 bin/experiment.py --dataset=mnist --budget=small --output_dir=results/mnist_small

Stages already done in --output_dir are skipped (rerun the same command to resume). The
budget presets and the layout of the results directory are documented in rat_tf/experiment.py
(the tuning runs behind the presets in docs/experiments.md); report.md holds the side-by-side
table. README.md gives the run time of the MNIST small run.
"""

import os

from absl import flags, logging

from rat_tf import attacks, cli, data, distribute, experiment, ops, trainers

_D = experiment.ExperimentConfig()
FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", _D.dataset, ["mnist", "fashion_mnist", "cifar10"], "Dataset.")
flags.DEFINE_enum("budget", _D.budget, experiment.BUDGETS,
                  "Size preset: tiny (tests), small (a 2-core CPU; run time in README.md), full.")
flags.DEFINE_string("output_dir", None, "Results directory (resumed if it exists).")
cli.define_data_flags(data_source_default=_D.data_source)
flags.DEFINE_string("model", None, "Model name (default from the budget preset).")
flags.DEFINE_integer("seed", _D.seed, "Random seed.")
flags.DEFINE_list("methods", list(_D.methods),
                  f"Fine-tuning methods from {experiment.FINETUNE_METHODS} "
                  "(standard = clean fine-tuning control).")
flags.DEFINE_integer("pretrain_subset", None, "(a) balanced training images, 0 = all.")
flags.DEFINE_integer("pretrain_epochs", None, "(a) epochs.")
flags.DEFINE_integer("pretrain_batch_size", None, "(a) global batch size.")
flags.DEFINE_float("pretrain_lr", None, "(a) learning rate.")
flags.DEFINE_float("eps", None, "(b) radius of V (default per dataset, MNIST 0.3).")
flags.DEFINE_enum("norm", _D.norm, list(ops.NORMS), "(b) norm of V and of the AT attacks.")
flags.DEFINE_enum("search_method", _D.search_method, list(attacks.TU_METHODS),
                  "(b) V search method.")
flags.DEFINE_integer("search_passes", None, "(b) max passes of the V search.")
flags.DEFINE_float("search_delta", _D.search_delta, "(b) stop a target at 1-delta success.")
flags.DEFINE_integer("finetune_subset", None, "(c,d) balanced fine-tuning images (default 1000).")
flags.DEFINE_integer("finetune_epochs", None, "(c,d) epochs.")
flags.DEFINE_integer("finetune_batch_size", None, "(c,d) global batch size.")
flags.DEFINE_float("finetune_lr", None, "(c,d) learning rate (Adam; default 5e-4).")
flags.DEFINE_integer("refresh_every", None,
                     "(c) re-search V every N epochs (0: static V, the paper; default from "
                     "the budget preset: MNIST small/full refresh every epoch).")
flags.DEFINE_enum("targets_per_image", None, list(trainers.TARGET_MODES),
                  "(c) one random target per image, all K-1, or the worst (highest-loss) one "
                  "(default from the budget preset).")
flags.DEFINE_float("perturbed_fraction", None,
                   "(c) weight of the perturbed examples in the RAT loss (default 0.5); with "
                   "--batch_mode=replace, the probability that an image is swapped.")
flags.DEFINE_enum("batch_mode", None, list(trainers.BATCH_MODES),
                  "(c) append the perturbed copies to the clean batch (default), or replace "
                  "images by them (the cost of a standard step).")
flags.DEFINE_bool("per_source", None,
                  "(c) one V per (source class, target) instead of one per target (default "
                  "from the budget preset).")
flags.DEFINE_float("adv_eps", None, "(d) FGSM-AT / PGD-AT radius (default per dataset).")
flags.DEFINE_integer("train_pgd_steps", None, "(d) PGD-AT steps.")
flags.DEFINE_integer("n_test", None, "(e) test images evaluated (0 = all).")
flags.DEFINE_integer("n_pgd", None, "(e) PGD runs on the first N of those (0 = all of them).")
flags.DEFINE_integer("eval_pgd_steps", None, "(e) PGD steps.")
flags.DEFINE_integer("eval_pgd_restarts", None, "(e) PGD random restarts.")
flags.DEFINE_list("fgsm_eps", None, "(e) FGSM radii (default per dataset).")
flags.DEFINE_list("pgd_eps", None, "(e) PGD radii (default per dataset).")
flags.DEFINE_integer("tup_passes", None, "(e) passes of the fresh TUP search.")
flags.DEFINE_integer("tup_n_per_class", None, "(e) images per class of the fresh TUP search.")
flags.DEFINE_enum("strategy", "default", distribute.STRATEGIES, "tf.distribute strategy.")
flags.DEFINE_integer("num_cpu_devices", 0, "Split the CPU into N logical devices (mirrored).")
flags.mark_flag_as_required("output_dir")


def main(argv):
    del argv
    cli.check_data(FLAGS.dataset, FLAGS.data_dir, FLAGS.data_source)
    cli.check_output_dirs(output_dir=FLAGS.output_dir)
    data.set_verify_checksums(FLAGS.verify_checksums)  # ExperimentConfig has no such field
    strategy = distribute.get_strategy(FLAGS.strategy, num_cpu_devices=FLAGS.num_cpu_devices)
    config = experiment.ExperimentConfig(
        dataset=FLAGS.dataset, budget=FLAGS.budget, output_dir=FLAGS.output_dir,
        data_dir=FLAGS.data_dir, data_source=FLAGS.data_source, model=FLAGS.model,
        seed=FLAGS.seed, methods=tuple(FLAGS.methods), pretrain_subset=FLAGS.pretrain_subset,
        pretrain_epochs=FLAGS.pretrain_epochs, pretrain_batch_size=FLAGS.pretrain_batch_size,
        pretrain_lr=FLAGS.pretrain_lr, eps=FLAGS.eps, norm=FLAGS.norm,
        search_method=FLAGS.search_method, search_passes=FLAGS.search_passes,
        search_delta=FLAGS.search_delta, finetune_subset=FLAGS.finetune_subset,
        finetune_epochs=FLAGS.finetune_epochs, finetune_batch_size=FLAGS.finetune_batch_size,
        finetune_lr=FLAGS.finetune_lr, refresh_every=FLAGS.refresh_every,
        targets_per_image=FLAGS.targets_per_image, perturbed_fraction=FLAGS.perturbed_fraction,
        batch_mode=FLAGS.batch_mode, per_source=FLAGS.per_source,
        adv_eps=FLAGS.adv_eps, train_pgd_steps=FLAGS.train_pgd_steps,
        eval_overrides=dict(n_test=FLAGS.n_test, n_pgd=FLAGS.n_pgd, pgd_steps=FLAGS.eval_pgd_steps,
                            pgd_restarts=FLAGS.eval_pgd_restarts, fgsm_eps=FLAGS.fgsm_eps,
                            pgd_eps=FLAGS.pgd_eps, tup_passes=FLAGS.tup_passes,
                            tup_n_per_class=FLAGS.tup_n_per_class))
    summary = experiment.run(config, strategy)
    with open(os.path.join(summary["output_dir"], summary["files"]["markdown"])) as f:
        print(f.read())
    logging.info("results in %s", summary["output_dir"])


if __name__ == "__main__":
    cli.run(main)
