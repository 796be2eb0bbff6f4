"""Benchmark: outline smoothing (GeneSegNet.dynamics.smoothing) per megapixel on the CPU.

Label images of touching cells (jittered-grid Voronoi cells of about 60 px across, as
Xenium cells at 0.2125 µm/px, with 15 % of the grid left as background) at several
sizes are smoothed at 1 µm (4.7 px). Reference, on the smallest size: the definition
computed directly, one whole-image Gaussian per cell; it must give the same labels (the
fragment rule aside, so that is compared before it, on cells without fragments). The
figure printed is our time per megapixel and the ratio to the direct computation, both
measured in this run; and, for scale, the ratio to one whole-image Gaussian filter.

Threads: pinned to one (``common.single_thread``); numpy/scipy's filters run on one core.

Run: ``.venv/bin/python bench/bench_smoothing.py [--sizes 512,1024,2048] [--repeats 3]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from GeneSegNet.dynamics.smoothing import TRUNCATE, smooth_outlines

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_time, single_thread  # noqa: E402

SIGMA_PX = 1.0 / 0.2125
CELL_PX = 60


def voronoi_cells(size: int, seed: int = 0) -> np.ndarray:
    """(size, size) int32 touching cells, ids 1..K, about 15 % background."""
    rng = np.random.default_rng(seed)
    n = size // CELL_PX
    grid = (np.indices((n, n)).reshape(2, -1).T + 0.5) * CELL_PX
    seeds = grid + rng.uniform(-0.3, 0.3, grid.shape) * CELL_PX
    seeds = seeds[rng.random(len(seeds)) > 0.15]
    image = np.ones((size, size), bool)
    image[tuple(np.clip(seeds.astype(int), 0, size - 1).T)] = False
    _, (near_r, near_c) = ndimage.distance_transform_edt(image, return_indices=True)
    ids = np.zeros((size, size), np.int32)
    ids[tuple(np.clip(seeds.astype(int), 0, size - 1).T)] = np.arange(1, len(seeds) + 1)
    labels = ids[near_r, near_c]
    far = np.hypot(*(np.indices((size, size)) - np.stack([near_r, near_c]))) > 0.55 * CELL_PX
    labels[far] = 0
    return labels


def direct(labels: np.ndarray, sigma: float) -> np.ndarray:
    """The definition: argmax over whole-image Gaussians of every indicator (bg = 0)."""
    best = ndimage.gaussian_filter((labels == 0).astype(np.float32), sigma,
                                   truncate=TRUNCATE, mode="constant")
    out = np.zeros_like(labels)
    for cell in np.unique(labels)[1:]:
        level = ndimage.gaussian_filter((labels == cell).astype(np.float32), sigma,
                                        truncate=TRUNCATE, mode="constant")
        wins = level > best
        best[wins] = level[wins]
        out[wins] = cell
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="512,1024,2048")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(single_thread())
    small = voronoi_cells(sizes[0])
    want, got = direct(small, SIGMA_PX), smooth_outlines(small, SIGMA_PX)
    t_direct = median_time(lambda: direct(small, SIGMA_PX), repeats=1, warmup=False)
    t_ours = median_time(lambda: smooth_outlines(small, SIGMA_PX), args.repeats)
    pieces = [ndimage.label(want == c)[1] for c in np.unique(want)[1:]]
    same = np.array_equal(got, want) if max(pieces) == 1 else None
    print(f"{sizes[0]}² px, {small.max()} cells: ours {t_ours * 1e3:.0f} ms, direct "
          f"{t_direct * 1e3:.0f} ms (one Gaussian per cell over the image): "
          f"{t_direct / t_ours:.1f}x faster; same labels: {same}")
    for size in sizes:
        labels = voronoi_cells(size)
        t_ours = median_time(lambda labels=labels: smooth_outlines(labels, SIGMA_PX),
                             args.repeats)
        t_gauss = median_time(lambda labels=labels: ndimage.gaussian_filter(
            (labels == 0).astype(np.float32), SIGMA_PX, truncate=TRUNCATE), args.repeats)
        mpx = size * size / 1e6
        print(f"{size}² px, {labels.max()} cells: {t_ours / mpx * 1e3:.0f} ms per megapixel "
              f"({labels.max() / t_ours:.0f} cells/s), {t_ours / t_gauss:.1f}x one "
              f"whole-image Gaussian (median of {args.repeats})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
