"""The whole pipeline (bin/experiment.py) end to end at the tiny budget on real MNIST, and on
a Fashion-MNIST-shaped IDX fixture."""

import dataclasses
import gzip
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from rat_tf import data, experiment, perturbation_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("start", "rat", "rat_fgsm", "fgsm_at", "pgd_at")


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory):
    """Run bin/experiment.py --budget=tiny once in a subprocess; return (dir, stdout)."""
    out = str(tmp_path_factory.mktemp("experiment") / "mnist_tiny")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "bin", "experiment.py"), "--dataset=mnist",
         "--budget=tiny", f"--output_dir={out}", f"--data_dir={data_dir}"],
        capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc.stdout


def test_writes_every_promised_file(run_dir):
    out, stdout = run_dir
    files = ["config.json", "summary.json", "report.md", "report.json", "accuracy_vs_radius.png",
             "perturbations.png", "search/perturbations.npz", "search/perturbations.png",
             "search/search.json"]
    for name in MODELS:
        files += [f"{name}/model.keras", f"{name}/metrics.json",
                  f"saved_models/{name}/saved_model.pb", f"evaluation/{name}.json",
                  f"evaluation/{name}.npz"]
    missing = [f for f in files if not os.path.isfile(os.path.join(out, f))]
    assert not missing
    for png in ("accuracy_vs_radius.png", "perturbations.png", "search/perturbations.png"):
        assert os.path.getsize(os.path.join(out, png)) < 200_000
    assert "| rat |" in stdout and "| pgd_at |" in stdout  # the table is printed


def test_report_compares_all_models_on_held_out_images(run_dir, mnist_arrays):
    out, _ = run_dir
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    assert list(report) == list(MODELS)
    for name, r in report.items():
        assert r["settings"]["n_test"] == 200 and r["settings"]["tup_eps"] == 0.3
        assert 0.0 <= r["clean_accuracy"] <= 1.0 and r["model"].startswith("saved_model:")
        assert set(r["fgsm_accuracy"]) == {"0.05", "0.1", "0.2", "0.3"}
        assert r["tup_given"] is not None and len(r["tup_fresh"]["success_rate"]) == 10
        assert r["clean_accuracy"] > 0.5  # trained (chance is 0.1), even at the tiny budget
    start = report["start"]
    assert start["fgsm_accuracy"]["0.3"] < start["clean_accuracy"]  # the attack bites
    with open(os.path.join(out, "report.md")) as f:
        md = f.read()
    for name in MODELS:
        assert f"| {name} |" in md
    assert "## Training" in md
    # V carries the fingerprints of its search images: none of them is a test image
    v, meta = perturbation_files.load(os.path.join(out, "search", "perturbations.npz"))
    assert v.shape == (10, 28, 28, 1) and np.max(np.abs(v)) <= 0.3 + 1e-6
    assert len(meta[perturbation_files.FINGERPRINT_KEY]) == 200 and meta["eps"] == 0.3
    test_prints = set(data.fingerprints(mnist_arrays[2][:200]).tolist())
    assert not test_prints & set(meta[perturbation_files.FINGERPRINT_KEY])


def test_finetuning_shares_start_model_subset_and_epochs(run_dir):
    out, _ = run_dir
    configs = {}
    for name in MODELS[1:]:
        with open(os.path.join(out, name, "metrics.json")) as f:
            configs[name] = json.load(f)["config"]
    start = os.path.join(out, "start", "model.keras")
    assert {c["init_from"] for c in configs.values()} == {start}
    assert {c["train_subset"] for c in configs.values()} == {200}
    assert len({c["epochs"] for c in configs.values()}) == 1
    assert configs["rat"]["perturbations_path"].endswith("search/perturbations.npz")
    assert configs["rat"]["refresh_every"] == 0
    assert configs["rat"]["rat_init"] == "none"  # the paper's RAT
    fgsm = configs["rat_fgsm"]  # V learnt from random corners as the start of FGSM
    assert fgsm["method"] == "rat" and not fgsm["perturbations_path"]
    assert (fgsm["rat_init"], fgsm["targets_per_image"], fgsm["per_source"]) == (
        "target", "runner_up", False)


def test_resume_skips_done_stages_and_refuses_other_settings(run_dir, data_dir):
    out, _ = run_dir
    summary = experiment.run(experiment.ExperimentConfig(
        dataset="mnist", budget="tiny", output_dir=out, data_dir=data_dir))
    stages = summary["stages"]
    assert all(str(v).startswith("skipped") for v in stages.values()), stages
    assert set(summary["results"]) == set(MODELS)
    with pytest.raises(ValueError, match="finetune_epochs"):
        experiment.run(experiment.ExperimentConfig(
            dataset="mnist", budget="tiny", output_dir=out, data_dir=data_dir,
            finetune_epochs=3))


def test_a_cached_report_is_reused_only_with_the_same_v(run_dir):
    """A per-model report is a cache: reused with the same settings and V, not with another V
    (its "TUP given" would be of the old one)."""
    out, _ = run_dir
    config = experiment.ExperimentConfig(dataset="mnist", budget="tiny").resolved()
    cache, v_path = os.path.join(out, "evaluation", "start"), os.path.join(
        out, "search", "perturbations.npz")
    v = perturbation_files.load(v_path)[0]
    report = experiment._cached_report(cache, config.eval_settings(), v)
    assert report is not None and "tup_given" in report.arrays
    assert experiment._cached_report(cache, config.eval_settings(), v * 0.5) is None
    assert experiment._cached_report(cache, dataclasses.replace(config.eval_settings(),
                                                                n_test=100), v) is None


def test_budget_presets_and_validation():
    small = experiment.ExperimentConfig(dataset="mnist", budget="small").resolved()
    assert small.finetune_subset == 1000 and small.model == "wide_mnist_cnn"
    assert small.eval_settings().tup_eps == small.eps == 0.3
    # the whole MNIST test set, PGD on its first 1,000 images; 0 on the command line = all
    assert (small.eval_settings().n_test, small.eval_settings().n_pgd) == (None, 1000)
    every = experiment.ExperimentConfig(dataset="mnist", budget="small",
                                        eval_overrides=dict(n_pgd=0)).resolved()
    assert every.eval_settings().n_pgd is None
    full = experiment.ExperimentConfig(dataset="mnist", budget="full").resolved()
    assert (full.eval_settings().n_test, full.eval_settings().n_pgd) == (None, None)
    few = experiment.ExperimentConfig(dataset="mnist", budget="full",
                                      eval_overrides=dict(n_test=300)).resolved()
    assert few.eval_settings().n_test == 300
    cifar = experiment.ExperimentConfig(dataset="cifar10", budget="small",
                                        finetune_epochs=2).resolved()
    assert cifar.model == "fast_cifar_net" and cifar.finetune_epochs == 2
    assert cifar.pretrain_augment == "crop_flip" and cifar.pretrain_subset == 0
    assert cifar.eval_settings().fgsm_eps == pytest.approx((2 / 255, 4 / 255, 8 / 255))
    with pytest.raises(ValueError, match="budget"):
        experiment.ExperimentConfig(budget="huge").resolved()
    with pytest.raises(ValueError, match="methods"):
        experiment.ExperimentConfig(methods=("rat", "trades")).resolved()
    with pytest.raises(ValueError, match="finetune_subset"):
        experiment.ExperimentConfig(finetune_subset=1005).resolved()
    with pytest.raises(ValueError, match="rat_fgsm learns V"):
        experiment.ExperimentConfig(rat_init="none").resolved()
    with pytest.raises(ValueError, match="budget 'quick' has no preset for 'cifar10'"):
        experiment.ExperimentConfig(dataset="cifar10", budget="quick").resolved()
    # the RAT stage's settings are checked up front, before any training
    with pytest.raises(ValueError, match="batch_mode"):
        experiment.ExperimentConfig(batch_mode="interleave").resolved()
    with pytest.raises(ValueError, match="perturbed_fraction"):
        experiment.ExperimentConfig(perturbed_fraction=2.0).resolved()
    with pytest.raises(ValueError, match="replace"):
        experiment.ExperimentConfig(batch_mode="replace", targets_per_image="all").resolved()
    replace = experiment.ExperimentConfig(batch_mode="replace").resolved()
    assert replace._rat_settings()["batch_mode"] == "replace"
    # rat_fgsm blurs its V start by default; the paper's rat takes no noise
    assert replace._rat_settings("rat_fgsm")["rat_init_noise"] == 1.0
    assert replace._rat_settings("rat")["rat_init_noise"] == 0.0
    quiet = experiment.ExperimentConfig(rat_init_noise=0.25).resolved()
    assert quiet._rat_settings("rat_fgsm")["rat_init_noise"] == 0.25
    with pytest.raises(ValueError, match="rat_init_noise"):
        experiment.ExperimentConfig(rat_init_noise=-1.0).resolved()
    # FGSM-UAP's consistency penalty: in rat_fgsm on CIFAR-10 (as its recipe), not on MNIST
    assert cifar._rat_settings("rat_fgsm")["rat_consistency"] == 10.0
    assert cifar._rat_settings("rat_fgsm")["rat_step_size"] == pytest.approx(10 / 255)
    assert replace._rat_settings("rat_fgsm")["rat_step_size"] is None  # MNIST: eps
    assert cifar._rat_settings("rat")["rat_consistency"] == 0.0
    assert replace._rat_settings("rat_fgsm")["rat_consistency"] == 0.0
    plain = experiment.ExperimentConfig(dataset="cifar10", budget="small",
                                        rat_consistency=0.0).resolved()
    assert plain._rat_settings("rat_fgsm")["rat_consistency"] == 0.0
    # rat_fgsm carries its blurred starts on MNIST (as mnist_rat_carry), not on CIFAR-10;
    # the paper's rat never carries
    carried = replace._rat_settings("rat_fgsm")
    assert (carried["rat_carry"], carried["rat_carry_noise"]) == ("last", 0.25)
    assert replace._rat_settings("rat")["rat_carry_noise"] == 0.0
    assert cifar._rat_settings("rat_fgsm")["rat_carry_noise"] == 0.0
    off = experiment.ExperimentConfig(rat_carry="none").resolved()._rat_settings("rat_fgsm")
    assert (off["rat_carry"], off["rat_carry_noise"]) == ("none", 0.0)
    louder = experiment.ExperimentConfig(rat_carry_noise=1.0).resolved()
    assert louder._rat_settings("rat_fgsm")["rat_carry_noise"] == 1.0
    with pytest.raises(ValueError, match="rat_carry_noise blurs a carried start"):
        experiment.ExperimentConfig(rat_carry="none", rat_carry_noise=0.5).resolved()
    with pytest.raises(ValueError, match="rat_carry_noise blurs a carried start"):
        experiment.ExperimentConfig(dataset="cifar10", budget="small",
                                    rat_carry_noise=0.5).resolved()


# --------------------------------------------------------------------------- Fashion-MNIST
def _idx(arr: np.ndarray) -> bytes:
    """An IDX file as the official ones: magic 2049 (labels) or 2051 (images), big-endian."""
    arr = np.asarray(arr, np.uint8)
    dims = struct.pack(f">{arr.ndim}I", *arr.shape)
    return struct.pack(">I", 2049 if arr.ndim == 1 else 2051) + dims + arr.tobytes()


def _write_fashion_fixture(folder, counts, seed=0):
    """Fashion-MNIST-shaped gzip IDX files of a learnable toy task: class c is a bright bar at
    rows 2c+4..2c+5 over seeded noise. Returns {split: labels}."""
    rng = np.random.default_rng(seed)
    names = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
    folder.mkdir()
    labels_of = {}
    for split, n in counts.items():
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 90, (n, 28, 28), dtype=np.uint8)
        for i, c in enumerate(labels):
            images[i, 2 * c + 4:2 * c + 6, 4:24] = 230
        images_name, labels_name = names[split]
        (folder / images_name).write_bytes(gzip.compress(_idx(images)))
        (folder / labels_name).write_bytes(gzip.compress(_idx(labels)))
        labels_of[split] = labels
    return labels_of


def test_fashion_mnist_experiment_on_an_idx_fixture(tmp_path, monkeypatch):
    """The pipeline on Fashion-MNIST-shaped files (the official ones are not on this machine):
    its reader, presets and every stage, with the cheapest measures."""
    counts = {"train": 1000, "test": 200}
    labels = _write_fashion_fixture(tmp_path / "fashion_mnist", counts)
    info = data.DATASETS["fashion_mnist"]
    monkeypatch.setitem(data.DATASETS, "fashion_mnist",
                        dataclasses.replace(info, num_examples=counts))
    _, y = data.load_arrays("fashion_mnist", "train", "auto", str(tmp_path))
    np.testing.assert_array_equal(y, labels["train"])
    out = str(tmp_path / "out")
    summary = experiment.run(experiment.ExperimentConfig(
        dataset="fashion_mnist", budget="tiny", output_dir=out, data_dir=str(tmp_path),
        methods=("rat",), pretrain_subset=1000, finetune_subset=100, test_subset=100,
        eval_overrides=dict(measures=["clean", "fgsm"], n_test=100)))
    assert set(summary["results"]) == {"start", "rat"}
    for name in ("start", "rat"):
        assert summary["results"][name]["num_test"] == 100
        assert summary["results"][name]["clean"] > 0.5  # learnt (chance is 0.1)
    assert os.path.isfile(os.path.join(out, "report.md"))
    v, meta = perturbation_files.load(os.path.join(out, "search", "perturbations.npz"))
    assert v.shape == (10, 28, 28, 1) and meta["eps"] == info.eps
