"""Export benchmark: h5ad, polygons and confidence columns for a large synthetic sample.

Builds a label image of ``--cells`` cells (jittered-grid seeds, each cell the pixels
within ``--radius`` px of its seed and nearer to it than to any other seed: touching
and free cells), a uint16 DAPI-like image and ``--transcripts`` uniformly placed
transcripts of 300 genes (10 control probes), then times, on one thread:

1. confidence columns (:func:`GeneSegNet.export.confidence.transcript_confidence`, with a
   logit map), 2. cell polygons (:func:`GeneSegNet.export.polygons.cell_polygons`) and the
   GeoJSON + GeoParquet writers, 3. the AnnData (counts, obs, chromatin features) and its
   ``.h5ad``. Prints the seconds of each and the process's peak resident memory.

Run pinned to one core:
``OMP_NUM_THREADS=1 taskset -c 0 .venv/bin/python bench/bench_export.py``
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import ndimage  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB (Linux)


def synthetic(n_cells: int, n_transcripts: int, radius: float, seed: int = 0):
    """labels (H, W) int32, image (H, W) uint16, spots DataFrame (x, y, gene)."""
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n_cells)))
    spacing = 2.0 * radius * 0.9
    size = int(np.ceil(side * spacing))
    gy, gx = np.divmod(np.arange(n_cells), side)
    cy = np.clip((gy + 0.5 + rng.uniform(-0.3, 0.3, n_cells)) * spacing, 0, size - 1)
    cx = np.clip((gx + 0.5 + rng.uniform(-0.3, 0.3, n_cells)) * spacing, 0, size - 1)
    seeds = np.ones((size, size), dtype=bool)
    seeds[cy.astype(int), cx.astype(int)] = False
    seed_id = np.zeros((size, size), dtype=np.int32)
    seed_id[cy.astype(int), cx.astype(int)] = np.arange(1, n_cells + 1, dtype=np.int32)
    dist, index = ndimage.distance_transform_edt(seeds, return_indices=True)
    del seeds
    labels = seed_id[index[0], index[1]]
    del index, seed_id
    labels[dist > radius * rng.uniform(0.8, 1.1, size=1)[0]] = 0
    image = (3000 * np.exp(-dist / radius)).astype(np.uint16)
    del dist
    image += rng.integers(0, 300, image.shape, dtype=np.uint16)
    genes = np.array([f"Gene{i:03d}" for i in range(290)]
                     + [f"NegControlProbe_{i}" for i in range(5)]
                     + [f"BLANK_{i:04d}" for i in range(5)])
    spots = pd.DataFrame({
        "x": rng.uniform(0, size, n_transcripts),
        "y": rng.uniform(0, size, n_transcripts),
        "gene": pd.Categorical.from_codes(rng.integers(0, len(genes), n_transcripts), genes),
    })
    return labels, image, spots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=100_000)
    parser.add_argument("--transcripts", type=int, default=10_000_000)
    parser.add_argument("--radius", type=float, default=9.0, help="cell radius, px")
    parser.add_argument("--pixel_size", type=float, default=0.5, help="µm per px")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: temp)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from GeneSegNet.export.anndata_writer import build_anndata, write_h5ad
    from GeneSegNet.export.confidence import transcript_confidence
    from GeneSegNet.export.polygons import cell_polygons, write_geojson, write_geoparquet
    from GeneSegNet.mapping import lookup_cell_ids

    t0 = time.perf_counter()
    labels, image, spots = synthetic(args.cells, args.transcripts, args.radius)
    logit = (image.astype(np.float32) / 1000.0 - 1.0).astype(np.float16)
    print(f"input: {labels.shape[1]}x{labels.shape[0]} px, {int(labels.max())} cells, "
          f"{len(spots)} transcripts ({time.perf_counter() - t0:.1f} s to build, peak "
          f"{peak_gb():.2f} GB)")
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_export."))
    times = {}
    x, y = spots["x"].to_numpy(), spots["y"].to_numpy()
    start = time.perf_counter()
    cell_ids, _, _ = lookup_cell_ids(labels, x, y)
    conf = transcript_confidence(labels, x, y, cell_logit=logit, pixel_size_um=args.pixel_size)
    times["confidence columns"] = time.perf_counter() - start
    start = time.perf_counter()
    ids, polygons = cell_polygons(labels)
    times["polygons (trace)"] = time.perf_counter() - start
    start = time.perf_counter()
    write_geojson(out / "bench_cells.geojson", ids, polygons)
    write_geoparquet(out / "bench_cells.parquet", ids, polygons)
    times["polygons (GeoJSON + GeoParquet)"] = time.perf_counter() - start
    start = time.perf_counter()
    adata = build_anndata(labels, cell_ids, spots["gene"].to_numpy(), pixel_size_um=args.pixel_size,
                          image=image, ids=ids, polygons=polygons)
    times["h5ad (build)"] = time.perf_counter() - start
    start = time.perf_counter()
    write_h5ad(out / "bench.h5ad", adata)
    times["h5ad (write)"] = time.perf_counter() - start
    for what, seconds in times.items():
        print(f"{what:34s} {seconds:7.1f} s")
    print(f"{'total':34s} {sum(times.values()):7.1f} s")
    print(f"peak resident memory (whole process) {peak_gb():.2f} GB")
    print(f"cells with polygons {len(ids)}; h5ad {adata.n_obs} x {adata.n_vars}, "
          f"{int(adata.X.sum())} counts; in cells {np.mean(cell_ids > 0):.3f}; "
          f"median |distance| {np.nanmedian(np.abs(conf.iloc[:, 1])):.2f} µm")
    print(f"outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
