"""Benchmark: label refinement (spec §6.2), fast methods vs the literal level set.

Builds a synthetic label crop (default 256x256 with 25 elliptical cells of
roughly 300-1000 px, the sizes left after upstream's ``min_size=300`` filter,
some touching each other or the image edge), then times

- ``refine_labels(method="fast")``: the rule for regular cells, the literal
  level set for the others (median of ``--repeats`` runs);
- ``refine_labels(method="morphology")``: the rule for every cell (median);
- ``refine_labels_levelset``: the literal full-image level set (one run),

and reports the ratios and whether the labels are identical to the literal ones.
Run: ``.venv/bin/python bench/bench_refine.py [--size 256] [--cells 25]``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_time  # noqa: E402

from GeneSegNet.training.refine import refine_labels, refine_labels_levelset


def synthetic_crop(height: int, width: int, n_cells: int, seed: int) -> np.ndarray:
    """``n_cells`` ellipses (radii 10-18 px at 256x256, scaled with the size) that
    keep >= 300 px (scaled) after overlaps and the image edge cut them."""
    rng = np.random.default_rng(seed)
    scale = min(height, width) / 256
    yy, xx = np.mgrid[:height, :width]
    mask = np.zeros((height, width), dtype=np.int32)
    next_id, tries = 1, 0
    while next_id <= n_cells and tries < 100 * n_cells:
        tries += 1
        cy, cx = rng.uniform(-5, height + 5), rng.uniform(-5, width + 5)
        ry, rx = rng.uniform(10, 18, size=2) * scale
        angle = rng.uniform(0, np.pi)
        u = ((xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)) / rx
        v = (-(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)) / ry
        inside = (u**2 + v**2 <= 1) & (mask == 0)
        if inside.sum() >= 300 * scale**2:
            mask[inside] = next_id
            next_id += 1
    return mask


class _CountHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="image height (px)")
    parser.add_argument("--width", type=int, default=None, help="image width (default: size)")
    parser.add_argument("--cells", type=int, default=25)
    parser.add_argument("--round", type=int, default=1, dest="round_index")
    parser.add_argument("--repeats", type=int, default=3, help="runs of the fast method")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(1)
    width = args.width or args.size
    mask = synthetic_crop(args.size, width, args.cells, args.seed)
    ids, areas = np.unique(mask[mask > 0], return_counts=True)
    print(
        f"config: {args.size}x{width} image, {len(ids)} cells (area {areas.min()}-{areas.max()} "
        f"px, median {int(np.median(areas))}), round {args.round_index}, "
        f"torch threads = {torch.get_num_threads()}, float32, CPU"
    )

    log = logging.getLogger("GeneSegNet.training.refine")
    handler = _CountHandler()
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    fast = refine_labels(mask, args.round_index, method="fast")
    log.removeHandler(handler)
    print("fast method, per pass:", "; ".join(handler.messages))

    t_fast = median_time(
        lambda: refine_labels(mask, args.round_index, method="fast"), args.repeats, warmup=False
    )
    rule = refine_labels(mask, args.round_index, method="morphology")
    t_rule = median_time(
        lambda: refine_labels(mask, args.round_index, method="morphology"),
        20 * args.repeats,
        warmup=False,
    )
    start = time.perf_counter()
    literal = refine_labels_levelset(mask, args.round_index)
    t_literal = time.perf_counter() - start

    rows = [
        ("literal level set, 1 run", t_literal),
        (f"fast, median of {args.repeats}", t_fast),
        (f"morphology, median of {20 * args.repeats}", t_rule),
    ]
    for name, seconds in rows:
        print(f"{name:32s} {seconds:12.6f} s   literal / this = {t_literal / seconds:10.1f}x")
    print(f"pixels changed by the literal level set: {int((literal != mask).sum())}")
    for name, out in (("fast", fast), ("morphology", rule)):
        diff = int((out != literal).sum())
        print(f"{name}: labels identical to literal: {diff == 0} ({diff} pixels differ)")


if __name__ == "__main__":
    main()
