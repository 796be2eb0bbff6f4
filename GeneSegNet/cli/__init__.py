"""Shared command-line plumbing of the scripts.

This package: error reporting and the ``--verbose`` / device flags. :mod:`.args`: the
argument groups of ``GeneSeg_train.py``, ``GeneSeg_test.py`` and the sliding-window
inference script, and the one function that turns flags into an ``EvalConfig``.
:mod:`.upstream`: upstream's flags that are accepted for compatibility.
Nothing here imports torch, so ``--help`` stays quick.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

from GeneSegNet.errors import InputError

logger = logging.getLogger("GeneSegNet")

EXIT_INPUT_ERROR = 2


def run_reporting_errors(body: Callable[[], int | None]) -> int:
    """Run ``body``; turn bad-input errors into one logged line and exit code 2."""
    try:
        code = body()
    except InputError as exc:
        logger.error("%s", exc)
        return EXIT_INPUT_ERROR
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130
    return 0 if code is None else int(code)


def add_verbose_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true", help="log debug messages")


def add_device_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("device")
    group.add_argument("--use_gpu", action="store_true", help="run on CUDA when available")
    group.add_argument("--gpu_device", type=int, default=0, help="CUDA device index")

