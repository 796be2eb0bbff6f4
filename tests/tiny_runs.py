"""Shared set-up of the tests that run Inference/slidingwindows_gradient.py end to end:
a small simulated dataset, an untrained tiny network, and a runner of the script."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from GeneSegNet.data.simulate import TissueConfig, write_simulated_dataset
from GeneSegNet.model.checkpoint import save_checkpoint
from GeneSegNet.model.net import GeneSegUNet, NetConfig


def tiny_model(path: Path, seed: int = 0) -> Path:
    """An untrained nbase 8/16/16/16 network saved at ``path``, weights seeded by ``seed``."""
    torch.manual_seed(seed)
    return save_checkpoint(path, GeneSegUNet(NetConfig(nbase=(8, 16, 16, 16))))


def tiny_slides(folder: Path, *, n: int = 1, height: int = 200, width: int = 300,
                seed: int = 3, model_seed: int = 0) -> tuple[Path, Path]:
    """(raw folder of ``n`` simulated images of height × width px, tiny model) in ``folder``."""
    raw = write_simulated_dataset(folder / "raw", n, TissueConfig(height=height, width=width),
                                  seed=seed)
    return raw, tiny_model(folder / "tiny.pt", model_seed)


def inference_runner(raw: Path, model: Path, *fixed: str) -> Callable[..., int]:
    """``run(save_dir, *extra)``: the inference script's exit code on ``raw`` with ``model``,
    the flags ``fixed`` and then ``extra``."""
    from Inference.slidingwindows_gradient import main

    def run(out: Path, *extra: str) -> int:
        return main(["--root_dir", str(raw), "--save_dir", str(out), "--model_file", str(model),
                     *fixed, *extra])

    return run
