"""The plumbing every command (train.py, sample.py, data/prepare.py) shares: running its
work with one-line errors and the right exit status, and reading a text file the user names."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Callable

from model.errors import UserError


def run_cli(action: Callable[[], object], interrupted: str = "interrupted", end_output_line: bool = False) -> int:
    """Run a command-line tool's work and return its exit status: 0 when it finishes,
    2 with ``error: ...`` on stderr for a UserError or a failed file operation (a path
    that is a file where a folder is needed, a full disk, no permission), 130 with
    ``interrupted`` on stderr for Ctrl-C, 141 and no message when stdout's reader closed
    the pipe; never a traceback for any of them.
    ``end_output_line`` ends a line that streamed text left open on stdout before the
    interruption is reported."""
    try:
        action()
    except BrokenPipeError:
        # The reader of our output went away (``| head``): stop quietly with the status a
        # process killed by SIGPIPE has, and point stdout at /dev/null so the final flush
        # at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if end_output_line:
            sys.stdout.write("\n")
            sys.stdout.flush()
        print(interrupted, file=sys.stderr)
        return 130
    return 0


def read_user_text(name: str, what: str) -> str:
    """The text of the file ``name`` (``-``: standard input), UTF-8. A missing file or one
    that is not UTF-8 is a UserError naming it as ``what`` (e.g. "prompt file")."""
    if name == "-":
        return sys.stdin.read()
    try:
        return Path(name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{what} not found: {name}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {name} is not UTF-8 (byte offset {e.start})") from None
