"""Stop training cleanly on SIGINT / SIGTERM (Ctrl-C, SLURM's time limit).

:class:`StopRequest` installs handlers that only set a flag; the training loop checks it
at every batch boundary, writes its ``_last`` checkpoint for the last completed epoch and
raises :class:`GeneSegNet.errors.Interrupted`, so that ``--resume`` continues the run with
at most the interrupted epoch lost. A second signal of the same kind stops at once
(KeyboardInterrupt). Handlers are installed only in the main thread and are restored on
exit.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Context manager: ``requested`` becomes the signal number once one arrives."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested == signum:
            raise KeyboardInterrupt
        self.requested = signum
        logger.warning("%s received: saving the last completed epoch, then stopping "
                       "(send it again to stop at once)", signal.Signals(signum).name)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                try:
                    self._previous[sig] = signal.signal(sig, self._handle)
                except (ValueError, OSError):  # not allowed here (e.g. embedded)
                    pass
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
