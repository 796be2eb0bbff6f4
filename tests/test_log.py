"""Tests of the scripts' logging set-up (GeneSegNet.log)."""

from __future__ import annotations

import io
import logging

from tqdm import tqdm

from GeneSegNet.log import ProgressAwareHandler


def _log_during_progress(handler: logging.Handler, stream: io.StringIO) -> list[str]:
    """Log one line while a progress bar is drawn on ``stream``; the screen lines."""
    logger = logging.getLogger("GeneSegNet.tests.progress")
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with tqdm(total=3, file=stream, desc="crops", ascii=True) as bar:
            bar.update(1)
            logger.warning("a log line")
            bar.update(2)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    return [line.strip() for line in stream.getvalue().replace("\r", "\n").split("\n")]


def test_log_lines_do_not_run_into_progress_bars():
    stream = io.StringIO()
    lines = _log_during_progress(ProgressAwareHandler(stream), stream)
    assert "a log line" in lines  # a line of its own
    assert any(line.startswith("crops: 100%") for line in lines)  # the bar goes on
    plain = io.StringIO()  # what a plain StreamHandler does: the line joins the bar's
    plain_lines = _log_during_progress(logging.StreamHandler(plain), plain)
    assert "a log line" not in plain_lines
    assert any(line.startswith("crops:") and line.endswith("a log line") for line in plain_lines)
