"""rat_tf: region adversarial training (RAT) for TensorFlow/Keras.

Modules: ``data`` (datasets), ``models`` (model zoo), ``distribute`` (strategies), ``ops``
(perturbation ops), ``attacks`` (FGSM, PGD, universal and targeted universal perturbations),
``training`` (RAT and baselines), ``evaluation`` (robustness reports), ``export``
(SavedModels), ``experiment`` (the paper's pipeline), ``crosscheck`` (ART check of exports),
``plots`` (PNG figures), ``files`` (atomic result files).
"""

__version__ = "0.1.0"
