"""What every binary in bin/ shares: one-line errors, ``--debug``, and checks before any work.

``cli.run(main)`` replaces ``app.run(main)``: a usage error (a bad or unknown flag, a missing
file, an unknown dataset: ``UsageError``, absl flag errors, ``ValueError``,
``FileNotFoundError``, ``FileExistsError``) prints one line ``error: ...`` on stderr and exits
with status 2; any other ``OSError`` (a full disk, say) prints one line and exits with status 1.
``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import sys
from typing import Callable, NoReturn, Sequence

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_bool("debug", False, "Show the full traceback of an error instead of one line.")

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


def run(main: Callable[[list[str]], int | None]) -> None:
    """``app.run(main)`` with usage errors as one line ``error: ...`` (see the module doc)."""
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
