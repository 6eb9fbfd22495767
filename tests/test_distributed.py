"""Distributed training: MirroredStrategy on 2 logical CPUs and 2-process MultiWorkerMirrored.

Combinations in the style of tensorflow/models ``strategy_combinations``: every method is run
under the default strategy and under a distributed one with the same seed, config and global
batch, and the results must agree within a stated tolerance. The data order, RAT's targets and
PGD-AT's random starts do not depend on the split over replicas, so every method agrees to
float round-off.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from rat_tf import attacks, distribute, models, perturbation_files, trainers, training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# method -> (relative tolerance on the per-epoch training loss, absolute on test accuracy)
TOLERANCE = {"standard": (1e-3, 0.005), "rat": (1e-3, 0.005), "rat_per_source": (1e-3, 0.005),
             "rat_worst": (1e-3, 0.005), "pgd_at": (1e-3, 0.005)}


def combinations(**axes):
    """All combinations of the given axes as pytest params with readable ids."""
    params = [{}]
    for key, values in axes.items():
        params = [{**p, key: v} for p in params for v in values]
    return pytest.mark.parametrize(
        "combo", params, ids=["-".join(f"{k}={v}" for k, v in p.items()) for p in params])


@pytest.fixture(scope="module")
def v_path(mnist_model, mnist_arrays, tmp_path_factory):
    """Targeted universal perturbations of the pretrained model (a quick, small search)."""
    x, y = mnist_arrays[0][:300], mnist_arrays[1][:300]
    v, _ = attacks.targeted_universal(mnist_model, x, y, 0.3, max_passes=1, seed=0)
    path = perturbation_files.save(str(tmp_path_factory.mktemp("v") / "v.npz"), v, eps=0.3)
    v, _ = attacks.targeted_universal(mnist_model, x, y, 0.3, max_passes=1, seed=0,
                                      per_source=True)  # [K,K,...] for rat_per_source
    perturbation_files.save(path.replace(".npz", "_per_source.npz"), v, eps=0.3)
    return path


def _method_config(method: str, model_dir, data_dir, init_from, v_path) -> training.TrainConfig:
    per_source = method == "rat_per_source"
    targets = "worst" if method == "rat_worst" else "one"
    method = "rat" if method.startswith("rat") else method
    kw = dict(dataset="mnist", data_dir=data_dir, model="tiny_cnn", method=method, epochs=2,
              batch_size=64, steps_per_epoch=6, train_subset=1000, test_subset=500,
              model_dir=str(model_dir), verbose=0, init_from=init_from, lr=1e-3)
    if method == "standard":
        kw["init_from"] = ""
    if method == "rat":
        kw.update(perturbations_path=v_path.replace(".npz", "_per_source.npz") if per_source
                  else v_path, eps=0.3, per_source=per_source, targets_per_image=targets)
    if method == "pgd_at":
        kw.update(adv_eps=0.2, pgd_steps=3)
    return training.TrainConfig(**kw)


def _assert_close(method, got, want):
    rtol, atol = TOLERANCE[method]
    np.testing.assert_allclose(got["history"]["loss"], want["history"]["loss"], rtol=rtol)
    assert abs(got["test_accuracy"] - want["test_accuracy"]) <= atol


_DEFAULT_RESULTS: dict = {}


def _default_result(method, data_dir, init_from, v_path, tmp_path_factory):
    """The default-strategy run of ``method`` (computed once per session)."""
    if method not in _DEFAULT_RESULTS:
        cfg = _method_config(method, tmp_path_factory.mktemp(f"default_{method}"), data_dir,
                             init_from, v_path)
        _DEFAULT_RESULTS[method] = training.train(cfg, tf.distribute.get_strategy())
    return _DEFAULT_RESULTS[method]


# --------------------------------------------------------------------------- mirrored
@combinations(strategy=["mirrored_2cpu"],
              method=["standard", "rat", "rat_per_source", "rat_worst", "pgd_at"])
def test_mirrored_matches_default(combo, data_dir, mnist_model_path, v_path, tmp_path,
                                  tmp_path_factory, mirrored_2cpu):
    method = combo["method"]
    strategy = {"mirrored_2cpu": mirrored_2cpu}[combo["strategy"]]
    assert strategy.num_replicas_in_sync == 2
    got = training.train(_method_config(method, tmp_path / "run", data_dir, mnist_model_path,
                                        v_path), strategy)
    want = _default_result(method, data_dir, mnist_model_path, v_path, tmp_path_factory)
    assert got["num_replicas"] == 2 and got["strategy"] == "MirroredStrategy"
    _assert_close(method, got, want)
    if method.startswith("rat"):
        v_got, _ = perturbation_files.load(str(tmp_path / "run" / "perturbations.npz"))
        v_want, _ = perturbation_files.load(
            v_path.replace(".npz", "_per_source.npz") if method == "rat_per_source" else v_path)
        assert v_got.ndim == (5 if method == "rat_per_source" else 4)
        np.testing.assert_array_equal(v_got, v_want)


def test_mirrored_rat_search_and_variable_are_replicated(data_dir, mnist_model_path, tmp_path,
                                                         mirrored_2cpu):
    """V searched at the start under the strategy is one mirrored value on every replica."""
    strategy = mirrored_2cpu
    cfg = training.TrainConfig(
        data_dir=data_dir, method="rat", epochs=1, batch_size=32, steps_per_epoch=2,
        train_subset=100, test_subset=100, search_passes=1, model_dir=str(tmp_path / "r"),
        init_from=mnist_model_path, verbose=0)
    metrics = training.train(cfg, strategy)
    assert len(metrics["search_success_rate"]) == 10
    with strategy.scope():
        trainer = trainers.make_trainer("rat", models.build_model("tiny_cnn", "mnist"))
    v = np.random.default_rng(0).uniform(-0.1, 0.1, (10, 28, 28, 1)).astype(np.float32)
    trainer.set_perturbations(v)
    for replica_value in strategy.experimental_local_results(trainer.perturbations.value):
        np.testing.assert_array_equal(replica_value.numpy(), v)


# --------------------------------------------------------------------------- multi-worker
def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _launch_cluster(flags: list[str], model_dir, log_dir, n: int = 2) -> list[subprocess.Popen]:
    """Start ``n`` bin/train.py workers of one MultiWorkerMirroredStrategy cluster."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in _free_ports(n)]}
    procs = []
    for i in range(n):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                   PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   TF_CONFIG=json.dumps({"cluster": cluster,
                                         "task": {"type": "worker", "index": i}}))
        log = open(os.path.join(log_dir, f"worker{i}_{time.time_ns()}.log"), "w")
        procs.append(subprocess.Popen(
            [sys.executable, os.path.join(REPO, "bin", "train.py"), "--strategy=multi_worker",
             f"--model_dir={model_dir}", *flags], env=env, stdout=log, stderr=subprocess.STDOUT))
        procs[-1].log_path = log.name
    return procs


def _wait(procs, timeout=300) -> list[int]:
    deadline = time.time() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1, deadline - time.time())))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"worker did not finish within {timeout}s; log {p.log_path}")
    return codes


def _flags(cfg: training.TrainConfig) -> list[str]:
    flags = [f"--{k}={v}" for k, v in (
        ("method", cfg.method), ("data_dir", cfg.data_dir), ("model", cfg.model),
        ("epochs", cfg.epochs), ("batch_size", cfg.batch_size),
        ("steps_per_epoch", cfg.steps_per_epoch), ("train_subset", cfg.train_subset),
        ("n_test", cfg.test_subset), ("lr", cfg.lr), ("verbose", 2))]
    if cfg.init_from:
        flags.append(f"--init_from={cfg.init_from}")
    if cfg.method == "rat":
        flags += [f"--perturbations_path={cfg.perturbations_path}", f"--eps={cfg.eps}"]
    if cfg.method == "pgd_at":
        flags += [f"--adv_eps={cfg.adv_eps}", f"--adv_steps={cfg.pgd_steps}"]
    return flags


@combinations(strategy=["multi_worker_2proc"], method=["rat", "pgd_at"])
def test_multi_worker_matches_default(combo, data_dir, mnist_model_path, v_path, tmp_path,
                                      tmp_path_factory):
    method = combo["method"]
    cfg = _method_config(method, tmp_path / "run", data_dir, mnist_model_path, v_path)
    procs = _launch_cluster(_flags(cfg), tmp_path / "run", tmp_path)
    codes = _wait(procs)
    logs = [open(p.log_path).read()[-3000:] for p in procs]
    assert codes == [0, 0], logs
    out = tmp_path / "run"
    got = json.loads((out / "metrics.json").read_text())  # written by the chief only
    assert got["num_replicas"] == 2
    assert got["strategy"] in ("MultiWorkerMirroredStrategy", "CollectiveAllReduceStrategy")
    files = set(os.listdir(out)) - {"logs"}  # TensorBoard logs when tensorboard is installed
    assert files == {"history.csv", "metrics.json", "model.keras"} | (
        {"perturbations.npz"} if method == "rat" else set())  # no worker leftovers
    want = _default_result(method, data_dir, mnist_model_path, v_path, tmp_path_factory)
    _assert_close(method, got, want)


def test_multi_worker_lost_worker_fails_clearly_then_resumes(data_dir, tmp_path):
    out = tmp_path / "run"
    epochs = 10  # many short epochs: the kill always lands after the first backup, mid-run
    flags = ["--method=standard", "--model=tiny_cnn", f"--epochs={epochs}",
             "--steps_per_epoch=30", "--batch_size=32", "--train_subset=2000", "--n_test=200",
             f"--data_dir={data_dir}", "--verbose=2"]
    procs = _launch_cluster(flags, out, tmp_path)
    meta = out / "backup" / "training_metadata.json"
    deadline = time.time() + 180
    while time.time() < deadline and not meta.exists() and procs[0].poll() is None:
        time.sleep(0.02)
    assert meta.exists(), open(procs[0].log_path).read()[-3000:]
    procs[1].send_signal(signal.SIGKILL)  # worker 1 dies mid-run
    t0 = time.time()
    codes = _wait(procs, timeout=180)
    chief_log = open(procs[0].log_path).read()
    assert codes[0] != 0, "the chief finished although a worker died"
    assert "WorkerLostError" in chief_log and "restart every worker" in chief_log
    assert time.time() - t0 < 120  # the coordination service notices within seconds
    assert not (out / "model.keras").exists()
    done = json.loads(meta.read_text())["epoch"]
    assert 1 <= done < epochs
    # Restart the whole cluster: it resumes from the chief's backup.
    procs = _launch_cluster(flags, out, tmp_path)
    assert _wait(procs) == [0, 0], open(procs[0].log_path).read()[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["history"]["epoch"] == list(range(epochs))
    assert metrics["resumed"] and metrics["epochs_run_this_session"] == epochs - done


def test_get_strategy_refuses_settings_it_would_ignore():
    with pytest.raises(ValueError, match="num_cpu_devices splits the CPU for strategy 'mirrored'"):
        distribute.get_strategy("default", num_cpu_devices=2)
    with pytest.raises(ValueError, match="tpu address"):
        distribute.get_strategy("mirrored", tpu="grpc://10.0.0.1:8470")
    with pytest.raises(ValueError, match="unknown strategy"):
        distribute.get_strategy("horovod")
