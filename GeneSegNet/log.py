"""Logging set-up for the command-line scripts (the package itself never configures it).

``verbose`` means this project's debug messages only: the ``GeneSegNet`` logger tree (the
package modules, and the scripts, which log as ``GeneSegNet.scripts.<script_stem>``) is set
to DEBUG while the root logger, and so every third-party logger (numba's compiler would
otherwise print thousands of lines of IR), stays at INFO/WARNING.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from tqdm import tqdm

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_OWN_HANDLER = "_genesegnet_handler"
PROJECT_LOGGER = "GeneSegNet"
# Third-party loggers known to be chatty at INFO; pinned to WARNING.
QUIET_LOGGERS = ("numba", "matplotlib", "PIL", "fsspec", "urllib3")


class ProgressAwareHandler(logging.StreamHandler):
    """A stream handler that writes through ``tqdm.write``: an active progress bar is
    cleared, the line printed, and the bar drawn again below it, so log lines and bars
    do not run into each other."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # noqa: BLE001 (as StreamHandler.emit: logging never raises)
            self.handleError(record)


def setup_logging(verbose: bool = False, log_file: str | Path | None = None) -> None:
    """Log INFO (project DEBUG with ``verbose``) to stderr and, optionally, to ``log_file``.

    Only handlers installed by an earlier call are replaced, so calling it again (for
    example when scripts call each other, or under pytest) neither duplicates lines nor
    removes other handlers.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _OWN_HANDLER, False):
            root.removeHandler(handler)
            handler.close()
    handlers: list[logging.Handler] = [ProgressAwareHandler(sys.stderr)]
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="a", encoding="utf-8"))
    for handler in handlers:
        setattr(handler, _OWN_HANDLER, True)
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger(PROJECT_LOGGER).setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def errors_only() -> None:
    """Let only the project's errors through (the non-zero ranks of a multi-process run:
    rank 0 writes the log)."""
    logging.getLogger(PROJECT_LOGGER).setLevel(logging.ERROR)
