"""What every binary in bin/ shares: one-line errors, ``--debug``, and checks before any work.

``cli.run(main)`` replaces ``app.run(main)``: a usage error (a bad or unknown flag, a missing
file, an unknown dataset: ``UsageError``, absl flag errors, ``ValueError``,
``FileNotFoundError``, ``FileExistsError``) prints one line ``error: ...`` on stderr and exits
with status 2; any other ``OSError`` (a full disk, say) prints one line and exits with status 1.
``--debug`` shows the full traceback instead.

The ``check_*`` functions run before any work: every input exists, every output folder takes a
file, the data files are there; each failure is a usage error that names its flag.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Iterable, NoReturn, Sequence

from absl import app, flags

from rat_tf import data, files

FLAGS = flags.FLAGS
DATA_SOURCES = ("auto", "files", "tfds")

USAGE_ERRORS = (app.UsageError, flags.Error, ValueError, FileNotFoundError, FileExistsError)
USAGE_STATUS = 2  # bad input: flags, files, names
FAILURE_STATUS = 1  # the run itself failed (e.g. a full disk)


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (its type name when it has no message)."""
    return " ".join(str(error).split()) or type(error).__name__


def fail(message: str, status: int = USAGE_STATUS) -> NoReturn:
    """Print ``error: message`` as one line on stderr and exit with ``status``."""
    sys.stdout.flush()
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    sys.exit(status)


def _parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing, with flag errors as one line and status 2."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        fail(one_line(e))


def _main_module() -> str:
    """The module name absl gives the running binary (its --help lists that module's flags)."""
    return sys.argv[0]


def define_data_flags(data_source: bool = True, data_source_default: str = "auto") -> None:
    """Define the data flags of a binary: --data_dir, --verify_checksums and --data_source."""
    module = _main_module()
    flags.DEFINE_string("data_dir", None, "Folder holding the dataset files (default "
                        f"${data.ENV_DATA_DIR}).", module_name=module)
    flags.DEFINE_bool("verify_checksums", False, "Check every data file read against its "
                      "official md5 (a file that differs is an error naming it).",
                      module_name=module)
    if data_source:
        flags.DEFINE_enum("data_source", data_source_default, DATA_SOURCES,
                          "Where the data comes from: the standard files below --data_dir "
                          "(auto, files) or tensorflow_datasets (tfds, which may download).",
                          module_name=module)


def run(main: Callable[[list[str]], int | None]) -> None:
    """``app.run(main)`` with usage errors as one line ``error: ...`` (see the module doc)."""
    if "debug" not in FLAGS:
        flags.DEFINE_bool("debug", False, "Show the full traceback of an error instead of one "
                          "line.", module_name=_main_module())

    def guarded(argv: list[str]) -> int | None:
        try:
            return main(argv)
        except USAGE_ERRORS as e:
            if FLAGS.debug:
                raise
            fail(one_line(e))
        except OSError as e:
            if FLAGS.debug:
                raise
            fail(one_line(e), FAILURE_STATUS)

    app.run(guarded, flags_parser=_parse_flags)


def _paths(value: str | Iterable[str] | None) -> list[str]:
    """The paths of a flag value: none for None or "", one for a string, each of a list."""
    if not value:
        return []
    return [value] if isinstance(value, str) else [p for p in value if p]


def check_inputs(**paths: str | Iterable[str] | None) -> None:
    """Raise a usage error naming the flag unless every path given (by flag name) exists."""
    for flag, value in paths.items():
        for path in _paths(value):
            if not os.path.exists(path):
                raise app.UsageError(f"--{flag}: {path} does not exist")


def check_output_dirs(**folders: str | Iterable[str] | None) -> None:
    """Create each output folder given (by flag name) and prove it writable, or a usage error."""
    for flag, value in folders.items():
        for folder in _paths(value):
            try:
                files.check_writable_dir(folder)
            except OSError as e:
                raise app.UsageError(f"--{flag}: {e.strerror or e}") from e


def check_output_files(**paths: str | Iterable[str] | None) -> None:
    """Prove the folder of each output file or directory given (by flag name) writable."""
    check_output_dirs(**{flag: [os.path.dirname(os.path.abspath(p)) for p in _paths(value)]
                         for flag, value in paths.items()})


def check_data(dataset: str, data_dir: str | None = None, data_source: str = "files",
               splits: Sequence[str] = data.SPLITS) -> None:
    """Raise the data readers' error now if the dataset is unknown or a split's files are missing.

    Only names and folders are checked (the files are read, and validated, by the work itself);
    with ``data_source="tfds"`` only the name.
    """
    data.get_info(dataset)
    if data_source != "tfds":
        for split in splits:
            data.locate_files(dataset, split, data_dir)
