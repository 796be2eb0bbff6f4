"""Shared command-line plumbing of the scripts.

This package: error reporting and the ``--verbose`` / device flags. :mod:`.args`: the
argument groups of ``GeneSeg_train.py``, ``GeneSeg_test.py`` and the sliding-window
inference script, and the one function that turns flags into an ``EvalConfig``.
:mod:`.upstream`: upstream's flags that are accepted for compatibility.
Nothing here imports torch, so ``--help`` stays quick.
"""

from __future__ import annotations

import argparse
import errno
import logging
from collections.abc import Callable

from GeneSegNet.cli.types import nonnegative_int
from GeneSegNet.errors import InputError, Interrupted

logger = logging.getLogger("GeneSegNet")

EXIT_INPUT_ERROR = 2
_OS_HINTS = {
    errno.ENOSPC: " (the disk is full; free space and run again)",
    errno.EDQUOT: " (disk quota exceeded)",
    errno.EROFS: " (read-only file system; choose another output folder)",
    errno.EACCES: " (permission denied; choose a folder you can write to)",
    errno.EPERM: " (operation not permitted)",
}


def _os_error_line(exc: OSError) -> str:
    """One line naming the file and the system's reason (disk full, read-only...)."""
    what = exc.strerror or str(exc) or type(exc).__name__
    names = [str(n) for n in (exc.filename, exc.filename2) if n is not None]
    hint = _OS_HINTS.get(exc.errno, "")
    return f"{' -> '.join(names) + ': ' if names else ''}cannot write or read: {what}{hint}"


def run_reporting_errors(body: Callable[[], int | None]) -> int:
    """Run ``body``; turn bad-input and file-system errors into one logged line.

    Exit codes: 2 for an :class:`InputError` or an ``OSError`` (disk full, read-only or
    forbidden folder, ...: the message names the path); ``128 + signal`` for a run that
    stopped on SIGINT/SIGTERM (:class:`GeneSegNet.errors.Interrupted`); 130 for Ctrl-C
    elsewhere.
    """
    try:
        code = body()
    except InputError as exc:
        logger.error("%s", exc)
        return EXIT_INPUT_ERROR
    except Interrupted as exc:
        logger.error("%s", exc)
        return 128 + exc.signum
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130
    except MemoryError:
        logger.error("out of memory: use smaller inputs or settings (e.g. --batch_size)")
        return EXIT_INPUT_ERROR
    except OSError as exc:
        logger.error("%s", _os_error_line(exc))
        return EXIT_INPUT_ERROR
    return 0 if code is None else int(code)


def add_verbose_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true", help="log debug messages")


def add_device_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("device")
    group.add_argument("--use_gpu", action="store_true", help="run on CUDA when available")
    group.add_argument("--gpu_device", type=nonnegative_int, default=0, help="CUDA device index")

