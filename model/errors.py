"""The one exception type the command-line tools turn into a one-line message."""

from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's input (a file, a flag, a config value).

    The CLIs print ``error: <message>`` on stderr and exit with status 2 instead of
    showing a traceback (see model/cli.py), so the message must name the problem and,
    where it can, the way out.
    """
