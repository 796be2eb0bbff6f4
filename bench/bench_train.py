"""Training throughput (images/s) of the full-size network at batch 8, 224x224 patches.

Ours: epochs of :func:`GeneSegNet.training.loop.train_network` on 8 synthetic 256x256 crops
(one batch per epoch: normalisation, augmentation, forward, loss, backward, AdamW);
the per-epoch times come from the run's history (flow targets and checkpoint writes
are not included). Reference, measured in the same run: the bare step (forward, loss,
backward, AdamW) on ready-made tensors of the same shape, i.e. the network's own cost.
The ratio ours / reference is the overhead of the data pipeline and the loop.

CPU: torch (and OpenCV) pinned to --threads threads (default 1). With CUDA: the same at
float32 and with bfloat16 autocast.

    python bench/bench_train.py [--threads 1] [--epochs 4] [--cpu_only]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCH, TILE, CROP = 8, 224, 256


def _crops(n: int = BATCH):
    from GeneSegNet.data.dataset import Crop

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:CROP, :CROP]
    crops = []
    for k in range(n):
        labels = np.zeros((CROP, CROP), np.int32)
        for cell, (cy, cx) in enumerate(rng.integers(20, CROP - 20, size=(30, 2))):
            labels[((yy - cy) ** 2 + (xx - cx) ** 2 <= 15**2) & (labels == 0)] = cell + 1
        image = np.where(labels > 0, 160, 30).astype(np.uint8)
        heat = np.where(labels > 0, 120, 0).astype(np.uint8)
        crops.append(
            Crop(
                "bench",
                str(k),
                image,
                heat,
                labels,
                np.zeros((0, 2), np.int64),
                Path(f"{k}_image.png"),
                Path(f"{k}_label.png"),
            )
        )
    return crops


def ours(device: str, bf16: bool, epochs: int) -> float:
    """Median seconds per batch of the training loop (epochs 1.. of one run)."""
    from GeneSegNet.model.net import NetConfig
    from GeneSegNet.training.loop import TrainConfig, train_network

    cfg = TrainConfig(n_epochs=epochs + 1, batch_size=BATCH, tile=TILE, bf16=bf16)
    with tempfile.TemporaryDirectory() as tmp:
        res = train_network(
            _crops(), None, NetConfig(), cfg, device=device, model_dir=tmp, model_name="bench"
        )
    return statistics.median(h["seconds"] for h in res.history[1:])  # epoch 0 warms up


def reference(device: str, bf16: bool, repeats: int) -> float:
    """Median seconds of a bare forward/backward/AdamW step on ready tensors."""
    import torch

    from GeneSegNet.model.net import GeneSegUNet
    from GeneSegNet.training.loop import loss_fn

    net = GeneSegUNet().to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-5)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, 2, TILE, TILE, generator=gen).to(device)
    y = torch.rand(BATCH, 3, TILE, TILE, generator=gen).to(device)

    def step() -> None:
        amp = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with amp:
            out = net(x)[0]
        loss = loss_fn(out, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device != "cpu":
            torch.cuda.synchronize()

    step()
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        step()
        times.append(time.perf_counter() - tic)
    return statistics.median(times)


def report(label: str, device: str, bf16: bool, epochs: int) -> None:
    ref = reference(device, bf16, epochs)
    our = ours(device, bf16, epochs)
    print(
        f"{label:<14} ours {our:8.3f} s/batch = {BATCH / our:8.2f} img/s | "
        f"reference step {ref:8.3f} s = {BATCH / ref:8.2f} img/s | ratio {our / ref:5.2f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch / OpenCV threads on CPU")
    parser.add_argument("--epochs", type=int, default=2, help="timed batches per setting")
    parser.add_argument("--cpu_only", action="store_true", help="skip the CUDA measurements")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    import cv2
    import torch

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    print(
        f"full network (NetConfig defaults, 2 input channels), batch {BATCH}, {TILE}x{TILE}; "
        f"median of {args.epochs} batches"
    )
    print(f"CPU: torch threads {torch.get_num_threads()}, OpenCV threads {args.threads}")
    report("cpu fp32", "cpu", False, args.epochs)
    if torch.cuda.is_available() and not args.cpu_only:
        print(f"CUDA: {torch.cuda.get_device_name(0)}")
        report("cuda fp32", "cuda", False, max(args.epochs, 10))
        report("cuda bf16", "cuda", True, max(args.epochs, 10))
    else:
        print("CUDA: not available (skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
