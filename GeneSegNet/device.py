"""Device selection: CPU by default, CUDA only when asked for and available."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def get_device(use_gpu: bool = False, gpu_device: int = 0) -> torch.device:
    """Return ``cuda:<gpu_device>`` when ``use_gpu`` and CUDA is available, else CPU.

    Asking for a GPU that is not there logs a warning and falls back to the CPU.
    """
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        logger.warning("--use_gpu given but CUDA is not available; running on the CPU")
        return torch.device("cpu")
    if gpu_device < 0 or gpu_device >= torch.cuda.device_count():
        raise ValueError(
            f"--gpu_device {gpu_device} does not exist "
            f"({torch.cuda.device_count()} CUDA device(s) visible)"
        )
    return torch.device(f"cuda:{gpu_device}")


def as_device(device: torch.device | str | None) -> torch.device:
    """Normalise a device argument (None means CPU)."""
    return torch.device("cpu") if device is None else torch.device(device)
