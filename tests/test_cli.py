"""The binaries' errors: one line ``error: ...`` on stderr, status 2 for bad input; --debug."""

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


def test_library_value_error_is_one_line_and_debug_shows_traceback(tmp_path):
    args = ["--models=std", f"--output_dir={tmp_path}/out"]  # not name=path
    status, stderr = _run("evaluate.py", *args)
    assert status == 2
    assert "model spec 'std' is not name=path" in _one_error_line(stderr)
    status, stderr = _run("evaluate.py", *args, "--debug")
    assert status == 1 and "Traceback" in stderr and "ValueError: model spec" in stderr


def test_unknown_dataset_is_one_line(tmp_path):
    status, stderr = _run("train.py", "--dataset=svhn", f"--model_dir={tmp_path}/run")
    assert status == 2 and "unknown dataset 'svhn'" in _one_error_line(stderr)
