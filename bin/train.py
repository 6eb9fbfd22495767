"""Train a classifier with standard training, RAT, FGSM-AT or PGD-AT (resumable).

    python bin/train.py --method=standard --dataset=mnist --model=mnist_cnn --epochs=3 \
        --model_dir=runs/std
    python bin/train.py --method=rat --init_from=runs/std/model.keras --epochs=5 \
        --model_dir=runs/rat            # 1,000 balanced images, V searched at start

Rerunning the same command after a kill resumes from ``model_dir/backup``. Outputs:
``model_dir/model.keras``, ``metrics.json``, ``history.csv`` (and ``perturbations.npz``).
"""

import json

from absl import flags, logging

from rat_tf import cli, data, distribute, ops, trainers, training

_D = training.TrainConfig()
FLAGS = flags.FLAGS
flags.DEFINE_enum("method", _D.method, trainers.METHODS, "Training method.")
flags.DEFINE_string("dataset", _D.dataset, "mnist, fashion_mnist or cifar10.")
cli.define_data_flags(data_source_default=_D.data_source)
flags.DEFINE_string("model", _D.model, "Model zoo name (rat_tf.models) to train from scratch; "
                    "ignored with --init_from.")
flags.DEFINE_string("model_dir", _D.model_dir, "Output / checkpoint directory.")
flags.DEFINE_string("init_from", "", "Any .keras classifier to fine-tune from (its architecture "
                    "comes from the file; --model is for training from scratch).")
flags.DEFINE_integer("epochs", _D.epochs, "Epochs.")
flags.DEFINE_integer("batch_size", _D.batch_size, "GLOBAL batch size.")
flags.DEFINE_integer("steps_per_epoch", 0, "Steps per epoch (0: one pass over the data).")
flags.DEFINE_float("lr", _D.lr, "Learning rate.")
flags.DEFINE_enum("lr_schedule", _D.lr_schedule, training.LR_SCHEDULES, "LR schedule.")
flags.DEFINE_enum("optimizer", _D.optimizer, training.OPTIMIZERS, "Optimizer.")
flags.DEFINE_integer("train_subset", None,
                     "Balanced training subset size (0: all; default 1000 for rat, all otherwise).")
flags.DEFINE_integer("test_subset", 0, "First N test images for the final accuracy (0: all).")
flags.DEFINE_integer("seed", _D.seed, "Random seed.")
# RAT
flags.DEFINE_string("perturbations_path", "", "RAT: V from bin/perturb.py (.npz); empty: search.")
flags.DEFINE_float("eps", None, "RAT: radius of V (default per dataset, MNIST 0.3).")
flags.DEFINE_enum("norm", _D.norm, list(ops.NORMS), "Norm of V and of the AT attacks.")
flags.DEFINE_enum("search_method", _D.search_method, training.SEARCH_METHODS, "RAT: V search.")
flags.DEFINE_integer("search_passes", _D.search_passes, "RAT: max passes of the V search.")
flags.DEFINE_float("search_delta", _D.search_delta, "RAT: stop a target at 1-delta success.")
flags.DEFINE_integer("refresh_every", 0, "RAT: search V again every N epochs (0: static V).")
flags.DEFINE_enum("targets_per_image", _D.targets_per_image, trainers.TARGET_MODES,
                  "RAT: one random target per image, all K-1, or the worst (highest-loss) one.")
flags.DEFINE_float("perturbed_fraction", _D.perturbed_fraction,
                   "RAT: weight of the perturbed examples in the loss (append), or the "
                   "probability that an image is swapped for its perturbed copy (replace).")
flags.DEFINE_enum("batch_mode", _D.batch_mode, trainers.BATCH_MODES,
                  "RAT: append the perturbed copies to the clean batch, or replace images by "
                  "them (the cost of a standard step).")
flags.DEFINE_bool("per_source", _D.per_source,
                  "RAT: one V per (source class, target) instead of one per target.")
# FGSM-AT / PGD-AT
flags.DEFINE_float("adv_eps", None, "FGSM-AT/PGD-AT radius (default per dataset, MNIST 0.3).")
flags.DEFINE_integer("pgd_steps", _D.pgd_steps, "PGD-AT steps.")
flags.DEFINE_float("pgd_step_size", None, "PGD-AT step size (default 2.5 eps / steps).")
# performance / distribution
flags.DEFINE_enum("strategy", "default", distribute.STRATEGIES, "tf.distribute strategy.")
flags.DEFINE_integer("num_cpu_devices", 0, "Split the CPU into N logical devices (mirrored).")
flags.DEFINE_string("tpu", "", "TPU name or address (strategy=tpu).")
flags.DEFINE_enum("precision", _D.precision, distribute.PRECISIONS, "Keras dtype policy.")
flags.DEFINE_bool("jit_compile", False, "XLA-compile the train step.")
flags.DEFINE_integer("verbose", None, "Keras fit verbosity (default: bar if interactive).")
flags.DEFINE_bool("restart", False, "Drop a backup left in --model_dir and start over (without "
                  "it a backup is resumed, and refused if its settings differ).")


def main(argv):
    del argv
    cli.check_data(FLAGS.dataset, FLAGS.data_dir, FLAGS.data_source)
    cli.check_inputs(init_from=FLAGS.init_from, perturbations_path=FLAGS.perturbations_path)
    cli.check_output_dirs(model_dir=FLAGS.model_dir)
    data.set_verify_checksums(FLAGS.verify_checksums)  # TrainConfig has no such field
    strategy = distribute.get_strategy(FLAGS.strategy, num_cpu_devices=FLAGS.num_cpu_devices,
                                       tpu=FLAGS.tpu)
    config = training.TrainConfig(
        dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, data_source=FLAGS.data_source,
        model=FLAGS.model, method=FLAGS.method, epochs=FLAGS.epochs,
        batch_size=FLAGS.batch_size, steps_per_epoch=FLAGS.steps_per_epoch, lr=FLAGS.lr,
        lr_schedule=FLAGS.lr_schedule, optimizer=FLAGS.optimizer,
        train_subset=FLAGS.train_subset, test_subset=FLAGS.test_subset, seed=FLAGS.seed,
        model_dir=FLAGS.model_dir, init_from=FLAGS.init_from,
        perturbations_path=FLAGS.perturbations_path, eps=FLAGS.eps, norm=FLAGS.norm,
        search_method=FLAGS.search_method, search_passes=FLAGS.search_passes,
        search_delta=FLAGS.search_delta, refresh_every=FLAGS.refresh_every,
        targets_per_image=FLAGS.targets_per_image, perturbed_fraction=FLAGS.perturbed_fraction,
        batch_mode=FLAGS.batch_mode, per_source=FLAGS.per_source, adv_eps=FLAGS.adv_eps,
        pgd_steps=FLAGS.pgd_steps,
        pgd_step_size=FLAGS.pgd_step_size,
        precision=FLAGS.precision, jit_compile=FLAGS.jit_compile, verbose=FLAGS.verbose,
        restart=FLAGS.restart)
    metrics = training.train(config, strategy)
    summary = {k: metrics[k] for k in ("test_accuracy", "images_per_sec", "wall_seconds",
                                       "epochs_run_this_session", "resumed")}
    logging.info("metrics: %s", json.dumps(summary))
    print(json.dumps(summary))


if __name__ == "__main__":
    cli.run(main)
