"""User-facing error types.

`InputError` is raised for bad input (a missing folder, an unreadable file, a table
without usable columns...). Its message names the file and the problem; scripts turn
it into a one-line message and a non-zero exit instead of a traceback.
"""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad user input: the message names the offending file (if any) and the problem."""

    def __init__(self, problem: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(problem if path is None else f"{path}: {problem}")


class Interrupted(Exception):
    """A run stopped on SIGINT/SIGTERM after saving what it needs to resume.

    ``signum``: the signal; the scripts exit with status ``128 + signum``.
    """

    def __init__(self, message: str, signum: int) -> None:
        self.signum = signum
        super().__init__(message)
