"""Mapping speed: one vectorised lookup vs upstream's loop over cell ids.

1. 10^5 spots and 1,000 cells: median time of both, and the ratio.
2. 10^7 spots on a 10,000×10,000 label image: time of the lookup and sort.

Run: python bench/bench_mapping.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_time, single_thread  # noqa: E402

from GeneSegNet.mapping import map_transcripts  # noqa: E402


def voronoi_labels(shape, n_cells, rng):
    from scipy import ndimage

    seeds = np.zeros(shape, bool)
    seeds[rng.integers(0, shape[0], n_cells), rng.integers(0, shape[1], n_cells)] = True
    markers, _ = ndimage.label(seeds)
    _, (r, c) = ndimage.distance_transform_edt(~seeds, return_indices=True)
    return markers[r, c].astype(np.int32)


def loop_reference(labels, x, y):
    """Upstream's algorithm: for each id, look every spot up again and keep those on it."""
    xs, ys = x.astype(np.int32), y.astype(np.int32)
    rows = []
    for cell in np.unique(labels):
        sel = np.flatnonzero(labels[ys, xs] == cell)
        rows.append(np.stack([np.full(len(sel), cell), sel], axis=1))
    return np.concatenate(rows)


def main() -> int:
    print(single_thread())
    rng = np.random.default_rng(0)
    labels = voronoi_labels((2000, 2000), 1000, rng)
    n = 100_000
    # Genes as a categorical column, as GeneSegNet.io.read_spots returns them.
    spots = pd.DataFrame({"x": rng.uniform(0, 2000, n), "y": rng.uniform(0, 2000, n),
                          "gene": pd.Categorical(rng.choice(["a", "b", "c"], n))})
    x, y = spots.x.to_numpy(), spots.y.to_numpy()
    ours = median_time(lambda: map_transcripts(labels, spots), repeats=7)
    ref = median_time(lambda: loop_reference(labels, x, y), repeats=3)
    a = map_transcripts(labels, spots).table.cell_id.to_numpy()
    b = loop_reference(labels, x, y)[:, 0]
    assert np.array_equal(a, b), "vectorised result differs from the loop"
    print(f"10^5 spots, {len(np.unique(labels))} cells: vectorised {ours * 1e3:.1f} ms, "
          f"loop over ids {ref * 1e3:.0f} ms, speed-up {ref / ours:.0f}× (same ids)")
    big_labels = voronoi_labels((10_000, 10_000), 100_000, rng)
    n = 10_000_000
    big = pd.DataFrame({"x": rng.uniform(0, 10_000, n), "y": rng.uniform(0, 10_000, n),
                        "gene": pd.Categorical.from_codes(np.zeros(n, np.int8), ["a"])})
    times = []
    for _ in range(3):
        start = time.perf_counter()
        result = map_transcripts(big_labels, big)
        times.append(time.perf_counter() - start)
    print(f"10^7 spots on a 10,000×10,000 label image with {int(big_labels.max())} cells: "
          f"median {sorted(times)[1]:.2f} s ({result.n_assigned} assigned)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
