"""rat_tf: region adversarial training (RAT) for TensorFlow/Keras.

Modules: ``data`` (datasets), ``models`` (model zoo), ``distribute`` (strategies), ``ops``
(perturbation ops), ``attacks`` (FGSM, PGD, universal perturbations), ``training`` (RAT and
baselines), ``evaluation`` (robustness reports), ``export`` (SavedModels).
"""

__version__ = "0.1.0"
