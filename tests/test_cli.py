"""The binaries' errors: one line ``error: ...`` on stderr, status 2 for bad input; --debug."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from rat_tf import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(binary, *args, timeout=120):
    """Run bin/<binary> with ``args``; return (status, stderr)."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bin", binary), *args], env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stderr


def _one_error_line(stderr):
    """The ``error:`` line of stderr; fails unless it is the only one and the last line."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return errors[0]


def test_one_line():
    assert cli.one_line(ValueError("a\n  b")) == "a b"
    assert cli.one_line(FileNotFoundError()) == "FileNotFoundError"


@pytest.mark.parametrize("args, expected", [
    (["--nosuchflag=1"], "Unknown command line flag 'nosuchflag'"),
    (["--method=magic"], "--method"),
    (["--epochs=two"], "--epochs"),
])
def test_absl_flag_errors_are_one_line(args, expected):
    status, stderr = _run("train.py", *args)
    assert status == 2 and expected in _one_error_line(stderr)


def test_bad_measure_is_one_line_before_any_work(tiny_model_path, data_dir, tmp_path):
    status, stderr = _run("evaluate.py", f"--models=a={tiny_model_path}",
                          f"--output_dir={tmp_path}/eval", f"--data_dir={data_dir}",
                          "--measures=clean,robustness")
    line = _one_error_line(stderr)
    assert status == 2 and "measures must be distinct names of" in line and "robustness" in line
    assert "evaluating a" not in stderr


def test_library_value_error_is_one_line_and_debug_shows_traceback(tmp_path):
    args = ["--models=std", f"--output_dir={tmp_path}/out"]  # not name=path
    status, stderr = _run("evaluate.py", *args)
    assert status == 2
    assert "model spec 'std' is not name=path" in _one_error_line(stderr)
    status, stderr = _run("evaluate.py", *args, "--debug")
    assert status == 1 and "Traceback" in stderr and "ValueError: model spec" in stderr


def test_unknown_dataset_is_one_line(tmp_path):
    status, stderr = _run("train.py", "--dataset=svhn", f"--model_dir={tmp_path}/run")
    line = _one_error_line(stderr)
    assert status == 2 and "--dataset=svhn" in line and "mnist|fashion_mnist|cifar10" in line


@pytest.mark.parametrize("binary, old", [("perturb.py", "--source=files"),
                                         ("perturb.py", "--max_passes=2"),
                                         ("train.py", "--test_subset=100")])
def test_one_name_per_setting(binary, old):
    """Aliases and the old names are gone: --data_source, --search_passes, --n_test."""
    status, stderr = _run(binary, old)
    name = old[2:].split("=")[0]
    assert status == 2 and f"Unknown command line flag '{name}'" in _one_error_line(stderr)


def test_eval_flags_are_the_eval_settings_fields():
    """One flag per EvalSettings field, named as it (the dataset is --dataset)."""
    from rat_tf import evaluation

    fields = {f.name for f in dataclasses.fields(evaluation.EvalSettings)} - {"dataset"}
    assert set(cli.EVAL_FLAGS) == fields


def test_flag_table_in_build_md_is_current():
    """BUILD.md's table is what bin/flag_table.py makes of the flag definitions of bin/."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bin", "flag_table.py"),
                           "--check"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]


# --------------------------------------------------------------------------- checks before work
@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory):
    """An untrained tiny_cnn for MNIST saved as .keras (evaluations of it take seconds)."""
    from rat_tf import models

    path = str(tmp_path_factory.mktemp("tiny") / "model.keras")
    models.build_model("tiny_cnn", "mnist").save(path)
    return path


_FAST_EVAL = ["--dataset=mnist", "--data_source=files", "--n_test=50", "--fgsm_eps=0.1",
              "--pgd_eps=0.1", "--pgd_steps=1", "--pgd_restarts=1", "--tup_passes=1",
              "--tup_n_per_class=2", "--uap_passes=1", "--batch_size=50",
              "--measures=clean,fgsm,pgd,autoattack", "--aa_n=0", "--aa_attacks=apgd-ce",
              "--aa_steps=2", "--aa_restarts=2"]


def test_evaluate_checks_every_model_and_the_output_dir_first(tiny_model_path, data_dir,
                                                               tmp_path):
    missing = str(tmp_path / "missing.keras")
    out = tmp_path / "eval"
    status, stderr = _run("evaluate.py", f"--models=a={tiny_model_path},b={missing}",
                          f"--output_dir={out}", f"--data_dir={data_dir}", *_FAST_EVAL)
    assert status == 2 and f"--models: {missing} does not exist" in _one_error_line(stderr)
    assert "evaluating a" not in stderr and not (out / "report.json").exists()
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    status, stderr = _run("evaluate.py", f"--models=a={tiny_model_path}",
                          f"--output_dir={blocker}/eval", f"--data_dir={data_dir}", *_FAST_EVAL)
    line = _one_error_line(stderr)
    assert status == 2 and "--output_dir" in line and f"{blocker}/eval" in line
    assert "evaluating a" not in stderr


def test_evaluate_keeps_finished_models_when_a_later_one_fails(tiny_model_path, data_dir,
                                                                tmp_path):
    import json

    not_a_model = tmp_path / "empty_dir"  # exists, but holds no model
    not_a_model.mkdir()
    out = tmp_path / "eval"
    status, stderr = _run("evaluate.py", f"--models=a={tiny_model_path},b={not_a_model}",
                          f"--output_dir={out}", f"--data_dir={data_dir}", *_FAST_EVAL,
                          timeout=300)
    assert status == 2 and "not a .keras file" in _one_error_line(stderr)
    report = json.loads((out / "report.json").read_text())
    assert list(report) == ["a"] and 0 <= report["a"]["clean_accuracy"] <= 1
    # --measures picks the measures; --aa_n=0: AutoAttack on every test image used
    assert "tup_fresh" not in report["a"] and report["a"]["autoattack"]["num_images"] == 50
    assert report["a"]["settings"]["aa_attacks"] == ["apgd-ce"]
    assert report["a"]["settings"]["aa_restarts"] == 2  # --aa_restarts
    assert len(report["a"]["autoattack"]["per_image"]["codes"]) == 50
    assert "| a |" in (out / "report.md").read_text()
    assert (out / "accuracy_vs_radius.png").stat().st_size > 1000


def test_missing_data_files_fail_first(tiny_model_path, tmp_path):
    status, stderr = _run("perturb.py", "--dataset=mnist", f"--model_path={tiny_model_path}",
                          f"--output_dir={tmp_path}/v", f"--data_dir={tmp_path}")
    line = _one_error_line(stderr)
    assert status == 2 and "no mnist train files: looked for train-images-idx3-ubyte" in line
    assert str(tmp_path / "mnist") in line and not (tmp_path / "v").exists()


# --------------------------------------------------------------------------- --verify_checksums
def _flipped_mnist(data_dir, tmp_path, split):
    """A copy of real MNIST whose ``split`` images are uncompressed, one pixel byte flipped.

    Returns the path of those images.
    """
    import gzip
    import shutil

    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    prefix = "t10k" if split == "test" else "train"
    for base in ("train-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
                 "train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        if not base.startswith(f"{prefix}-images"):
            shutil.copy(os.path.join(data_dir, "mnist", base), folder)
    with gzip.open(os.path.join(data_dir, "mnist", f"{prefix}-images-idx3-ubyte.gz")) as f:
        plain = bytearray(f.read())
    plain[16 + 28 * 14 + 14] ^= 0x01  # the centre pixel of the first image
    path = folder / f"{prefix}-images-idx3-ubyte"
    path.write_bytes(bytes(plain))
    return path


def test_export_verify_checksums_refuses_flipped_pixels(tiny_model_path, data_dir, tmp_path):
    path = _flipped_mnist(data_dir, tmp_path, "test")
    status, stderr = _run("export.py", f"--model_path={tiny_model_path}",
                          f"--export_dir={tmp_path}/saved", "--dataset=mnist",
                          f"--data_dir={tmp_path}/data", "--verify_checksums")
    line = _one_error_line(stderr)
    assert status == 2 and str(path) in line and "md5" in line
    assert not (tmp_path / "saved").exists()


def test_train_verify_checksums_refuses_flipped_pixels(data_dir, tmp_path):
    """train.py passes the flag through the data module's default (TrainConfig has no field)."""
    path = _flipped_mnist(data_dir, tmp_path, "train")
    status, stderr = _run("train.py", "--dataset=mnist", f"--data_dir={tmp_path}/data",
                          f"--model_dir={tmp_path}/run", "--epochs=1", "--steps_per_epoch=1",
                          "--train_subset=100", "--n_test=100", "--verify_checksums")
    line = _one_error_line(stderr)
    assert status == 2 and str(path) in line and "md5" in line


@pytest.mark.slow
def test_bench_training_cost_runs_on_cifar10(data_dir, tmp_path):
    """--dataset reaches every cost run, RAT's V included (CIFAR-10 shape), and the JSON
    holds each method's images/s of every round relative to standard training and FGSM-AT."""
    status, stderr = _run("bench_training.py", "--dataset=cifar10", "--model=fast_cifar_net",
                          "--cost_methods=fgsm_at,rat_init_target_runner_up_noise_penalty",
                          "--front_models=", "--cost_steps=2", "--cost_repeats=2",
                          "--batch_size=16",
                          "--adv_eps=0.03", f"--data_dir={data_dir}",
                          f"--output_dir={tmp_path}/out", f"--work_dir={tmp_path}/work",
                          timeout=600)
    assert status == 0, stderr[-3000:]
    with open(tmp_path / "out" / "bench_training.json") as f:
        cost = json.load(f)["cost"]
    assert set(cost) == {"standard", "fgsm_at", "rat_init_target_runner_up_noise_penalty"}
    assert cost["standard"]["cost_vs_standard"] == 1.0
    assert cost["fgsm_at"]["cost_vs_fgsm_at"] == 1.0
    assert all(len(r["images_per_sec_per_round"]) == 2 and min(r["images_per_sec_per_round"]) > 0
               for r in cost.values())
    with open(tmp_path / "work" / "cost_fgsm_at_1" / "metrics.json") as f:
        assert json.load(f)["config"]["dataset"] == "cifar10"
    # V starts the FGSM step, so its ball is the adversarial radius, not --tup_eps's
    rat = tmp_path / "work" / "cost_rat_init_target_runner_up_noise_penalty_0" / "metrics.json"
    with open(rat) as f:
        assert json.load(f)["settings"]["eps"] == pytest.approx(0.03)
