"""Small helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable


def single_thread() -> str:
    """Pin torch, OpenCV and BLAS to one thread; returns a line saying so."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    import cv2
    import torch

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    return "threads: torch 1, OpenCV 1, BLAS 1 (single core)"


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: bool = True) -> float:
    """Median wall time in seconds of ``repeats`` calls (after one warm-up call unless
    ``warmup`` is false, for calls too slow to repeat)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mb() -> float:
    """This process's peak resident set size in MB (VmHWM; unlike ru_maxrss it is not
    inherited from the parent across fork and exec)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")
