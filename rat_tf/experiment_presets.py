"""The budget presets of :mod:`rat_tf.experiment`: every size of the pipeline per budget and
dataset family (docs/experiments.md holds the tuning runs behind them)."""

from rat_tf.recipes import MNIST_CARRY

BUDGETS = ("tiny", "quick", "small", "full")

# Budget presets. Keys are ExperimentConfig fields; "eval" holds EvalSettings overrides.
# every MNIST-like budget: rat_fgsm carries each image's start from its last FGSM example,
# blurred by uniform noise of radius eps/4, as the MNIST recipe mnist_rat_carry does
# (docs/reproduction.md)
_MNIST_RAT_FGSM = dict(MNIST_CARRY)
_MNIST_LIKE = {
    "tiny": dict(model="tiny_cnn", pretrain_subset=2000, pretrain_epochs=1,
                 pretrain_batch_size=64, finetune_subset=200, finetune_epochs=1,
                 finetune_batch_size=50, search_passes=2, train_pgd_steps=3, test_subset=500,
                 **_MNIST_RAT_FGSM,
                 eval=dict(n_test=200, pgd_steps=5, pgd_restarts=2, tup_passes=2,
                           tup_n_per_class=10, tup_batch_size=50, uap_passes=1, aa_n=100,
                           aa_steps=10, aa_queries=100, masking_steps=5, masking_n=100)),
    # quick: the README's first command, minutes on 2 CPU cores: Wong et al.'s small MNIST
    # net pretrained 2 epochs on every image, V searched on 10,000, every method fine-tuned
    # on them for 5 epochs
    "quick": dict(model="wong_mnist_net", pretrain_subset=0, pretrain_epochs=2,
                  pretrain_batch_size=100, finetune_subset=10000, finetune_epochs=5,
                  finetune_batch_size=50, search_passes=3, per_source=False, refresh_every=0,
                  train_pgd_steps=10, test_subset=0,
                  **_MNIST_RAT_FGSM,
                  eval=dict(n_test=1000, n_pgd=500, pgd_steps=20, pgd_restarts=1, tup_passes=3,
                            tup_n_per_class=20, uap_passes=2, aa_n=200, masking_n=200)),
    # small/full: tuned on real MNIST (docs/experiments.md): a ~99% wide_mnist_cnn
    # start model (3 epochs, cosine), V per (source, target) refreshed against the current
    # model every epoch (3 search passes), one random target per image, 8 epochs.
    "small": dict(model="wide_mnist_cnn", pretrain_subset=0, pretrain_epochs=3,
                  pretrain_batch_size=128, pretrain_lr_schedule="cosine",
                  finetune_subset=1000, finetune_epochs=8, finetune_batch_size=50,
                  refresh_every=1, search_passes=3, per_source=True, train_pgd_steps=10,
                  test_subset=0,
                  **_MNIST_RAT_FGSM,
                  eval=dict(n_test=None, n_pgd=1000, pgd_steps=20, pgd_restarts=2, tup_passes=5,
                            tup_n_per_class=50, uap_passes=3, aa_n=500)),
    "full": dict(model="wide_mnist_cnn", pretrain_subset=0, pretrain_epochs=10,
                 pretrain_batch_size=128, pretrain_lr_schedule="cosine",
                 finetune_subset=1000, finetune_epochs=50, finetune_batch_size=50,
                 refresh_every=1, search_passes=5, per_source=True, train_pgd_steps=40,
                 test_subset=0,
                 **_MNIST_RAT_FGSM,
                 eval=dict(n_test=None, aa_n=None, pgd_steps=40, pgd_restarts=5, tup_passes=10,
                           tup_n_per_class=100, uap_passes=5)),
}
# every CIFAR-10 budget: rat_fgsm takes a step of 10/255 with FGSM-UAP's logit-consistency
# penalty (10), as the CIFAR-10 recipe cifar10_rat_target_cpu does (docs/reproduction.md)
_CIFAR_RAT_FGSM = dict(rat_consistency=10.0, rat_step_size=10 / 255)
_CIFAR = {
    "tiny": dict(model="tiny_cnn", pretrain_subset=2000, pretrain_epochs=1,
                 pretrain_batch_size=64, finetune_subset=200, finetune_epochs=1,
                 finetune_batch_size=50, search_passes=2, train_pgd_steps=2, test_subset=500,
                 **_CIFAR_RAT_FGSM,
                 eval=dict(n_test=100, pgd_steps=3, pgd_restarts=2, tup_passes=1,
                           tup_n_per_class=5, tup_batch_size=50, uap_passes=1, aa_n=50,
                           aa_steps=5, aa_queries=50, masking_steps=3, masking_n=50)),
    # small/full pretraining: the CIFAR-10 recipe (crop + flip, SGD with Nesterov momentum,
    # one-cycle schedule with warm-up, label smoothing, weight decay; docs/experiments.md)
    "small": dict(model="fast_cifar_net", pretrain_subset=0, pretrain_epochs=20,
                  pretrain_batch_size=256, pretrain_optimizer="momentum", pretrain_lr=0.2,
                  pretrain_lr_schedule="onecycle", pretrain_warmup_epochs=1.0,
                  pretrain_weight_decay=5e-3, pretrain_label_smoothing=0.2,
                  pretrain_augment="crop_flip", finetune_subset=1000, finetune_epochs=5,
                  finetune_batch_size=50, search_passes=5, train_pgd_steps=5, test_subset=2000,
                  **_CIFAR_RAT_FGSM,
                  eval=dict(n_test=None, n_pgd=1000, pgd_steps=10, pgd_restarts=2,
                            tup_passes=3, tup_n_per_class=20, uap_passes=2, aa_n=1000)),
    "full": dict(model="resnet20", pretrain_subset=0, pretrain_epochs=100,
                 pretrain_batch_size=128, pretrain_optimizer="momentum", pretrain_lr=0.1,
                 pretrain_lr_schedule="cosine", pretrain_warmup_epochs=2.0,
                 pretrain_weight_decay=1e-3, pretrain_label_smoothing=0.1,
                 pretrain_augment="crop_flip", finetune_subset=1000, finetune_epochs=30,
                 finetune_batch_size=50, search_passes=20, train_pgd_steps=10, test_subset=0,
                 **_CIFAR_RAT_FGSM,
                 eval=dict(n_test=None, aa_n=None, pgd_steps=20, pgd_restarts=5, tup_passes=10,
                           tup_n_per_class=100, uap_passes=5)),
}


PRESETS = {"mnist": _MNIST_LIKE, "cifar10": _CIFAR}  # by DatasetInfo.preset_family
