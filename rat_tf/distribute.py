"""Distribution strategies, mixed precision and XLA, chosen by name (flags in bin/)."""

from __future__ import annotations

import json
import os

import keras
import tensorflow as tf
from absl import logging

STRATEGIES = ("default", "one_device", "mirrored", "multi_worker", "tpu")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def split_cpu(n: int) -> None:
    """Split the physical CPU into ``n`` logical devices (to test MirroredStrategy on CPU).

    Must run before TensorFlow initializes its devices; a second call with the same ``n`` is
    a no-op.
    """
    cpus = tf.config.list_physical_devices("CPU")
    current = tf.config.get_logical_device_configuration(cpus[0])
    if current and len(current) == n:
        return
    tf.config.set_logical_device_configuration(
        cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(n)])


def get_strategy(name: str = "default", *, num_cpu_devices: int = 0, device: str | None = None,
                 tpu: str = "", communication: str = "auto") -> tf.distribute.Strategy:
    """Build a ``tf.distribute`` strategy by name.

    ``mirrored`` uses all GPUs, or with ``num_cpu_devices`` > 1 that many logical CPUs;
    ``multi_worker`` reads the cluster from $TF_CONFIG; ``tpu`` resolves ``tpu`` (address or
    name).
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {STRATEGIES}")
    if num_cpu_devices < 0:
        raise ValueError(f"num_cpu_devices must be >= 0, got {num_cpu_devices}")
    if num_cpu_devices and name != "mirrored":
        raise ValueError(f"num_cpu_devices splits the CPU for strategy 'mirrored', not {name!r}")
    if tpu and name != "tpu":
        raise ValueError(f"a tpu address is for strategy 'tpu', not {name!r}")
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(device or ("/gpu:0" if gpus else "/cpu:0"))
    if name == "mirrored":
        devices = None
        if num_cpu_devices > 1:
            split_cpu(num_cpu_devices)
            devices = [f"/cpu:{i}" for i in range(num_cpu_devices)]
        elif not tf.config.list_physical_devices("GPU"):
            logging.warning("mirrored strategy with no GPU: one CPU replica "
                            "(pass num_cpu_devices=2 to split the CPU)")
        return tf.distribute.MirroredStrategy(devices=devices)
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("strategy multi_worker needs $TF_CONFIG (cluster and task)")
        try:
            cfg = json.loads(os.environ["TF_CONFIG"])
            cfg["cluster"]["worker"], cfg["task"]["index"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"$TF_CONFIG is not a valid cluster spec: {e}") from e
        if num_cpu_devices > 1:
            split_cpu(num_cpu_devices)
        impl = {"auto": tf.distribute.experimental.CommunicationImplementation.AUTO,
                "ring": tf.distribute.experimental.CommunicationImplementation.RING,
                "nccl": tf.distribute.experimental.CommunicationImplementation.NCCL}[communication]
        return tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=tf.distribute.experimental.CommunicationOptions(
                implementation=impl))
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)


def set_precision(policy: str = "float32") -> None:
    """Set the global Keras dtype policy (float32, mixed_float16 or mixed_bfloat16)."""
    if policy not in PRECISIONS:
        raise ValueError(f"unknown precision {policy!r}; choose one of {PRECISIONS}")
    keras.mixed_precision.set_global_policy(policy)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process is the chief (writes final outputs) of a multi-worker cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    task_type, task_id = resolver.task_type, resolver.task_id
    return task_type == "chief" or (task_type == "worker" and task_id == 0
                                    and "chief" not in resolver.cluster_spec().as_dict())


def worker_dir(path: str, strategy: tf.distribute.Strategy) -> str:
    """``path`` for the chief; a private temporary sibling for other workers."""
    if is_chief(strategy):
        return path
    resolver = strategy.cluster_resolver
    return os.path.join(path, f".worker_{resolver.task_type}_{resolver.task_id}")
