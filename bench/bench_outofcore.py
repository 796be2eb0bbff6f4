"""Benchmark: out-of-core whole-slide masks (GeneSegNet.slide.outofcore) and dask workers.

1. Peak memory (VmHWM of a child process) against slide size (``--sizes`` in MP),
   in memory (``reconstruct_blockwise`` on a float16 canvas, as ``bench_inference.py
   --mode flows``) and out of core (the synthetic flows of ``bench_inference.py`` written
   to the zarr run store one band at a time, then block tasks and the merge).
2. Mask-stage time with 1 and 2 dask workers (LocalCluster, processes, one thread each)
   on ``--dask_size`` MP; prints the ratio.

Run: ``.venv/bin/python bench/bench_outofcore.py [--sizes 100,400] [--dask_size 16]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.bench_inference import PERIOD, synthetic_slide  # noqa: E402
from bench.common import peak_rss_mb  # noqa: E402
from GeneSegNet.slide.blockwise import reconstruct_blockwise  # noqa: E402
from GeneSegNet.slide.outofcore import MaskSettings, blocks_serial, merge_blocks  # noqa: E402
from GeneSegNet.slide.store import SlideStore  # noqa: E402

MS = MaskSettings(block_size=2048, halo=64)


def fill_store(store: SlideStore) -> None:
    """Synthetic flows into the store, one band of chunk rows at a time (each band starts
    on a lattice row, so the bands join as one image)."""
    height, width = store.shape
    for r0 in range(0, height, store.chunk):
        r1 = min(r0 + store.chunk, height)
        lead = r0 % PERIOD
        band = np.empty((3, r1 - r0 + lead, width), np.float16)
        synthetic_slide(band, np.empty(band.shape[1:], np.uint8))
        store.field[:, r0:r1] = band[:, lead:]
    store.group["done_field"][:] = 1


def child(mp: float, mode: str, folder: Path) -> dict:
    side = int(round(np.sqrt(mp * 1e6)))
    start = time.perf_counter()
    if mode == "memory":
        field = np.empty((3, side, side), np.float16)
        synthetic_slide(field, np.empty((side, side), np.uint8))
        labels = reconstruct_blockwise(field[:2], field[2], block_size=MS.block_size,
                                       halo=MS.halo)
        cells = int(labels.max())
    else:
        store = SlideStore(folder / "s.zarr", (side, side), {"bench": mp}, "float16")
        fill_store(store)
        blocks_serial(store, MS)
        cells = merge_blocks(store, MS)
    return {"mp": side * side / 1e6, "cells": cells, "peak_mb": peak_rss_mb(),
            "seconds": time.perf_counter() - start}


def dask_masks(mp: float, workers: int, folder: Path) -> tuple[float, int]:
    from GeneSegNet.slide.distributed import DaskExecutor, DaskSettings, dask_client

    side = int(round(np.sqrt(mp * 1e6)))
    store = SlideStore(folder / f"d{workers}.zarr", (side, side), {"bench": mp}, "float16")
    fill_store(store)
    ms = MaskSettings(block_size=1024, halo=64)
    settings = DaskSettings(workers=workers, processes=True)
    with dask_client(settings) as client:
        start = time.perf_counter()
        DaskExecutor(client, settings)._blocks(store, ms)
        seconds = time.perf_counter() - start
    return seconds, merge_blocks(store, ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100", help="comma-separated megapixels")
    parser.add_argument("--dask_size", type=float, default=16.0)
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(child(float(args.child[0]), args.child[1], Path(tmp))))
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    print("peak memory, synthetic flows (float16 canvas, blocks 2048 + 64 halo, 1024 chunks):")
    for size in [float(s) for s in args.sizes.split(",") if s]:
        for mode in ("memory", "out-of-core"):
            done = subprocess.run([sys.executable, __file__, "--child", str(size), mode],
                                  capture_output=True, text=True, env=env, check=False)
            if done.returncode:
                print(f"  {size} MP {mode} failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"  {r['mp']:7.1f} MP {mode:12s} peak {r['peak_mb']:7.0f} MiB "
                  f"({r['peak_mb'] * 1.048576 / r['mp']:5.1f} B/px) {r['cells']:8d} cells "
                  f"{r['seconds']:7.1f} s")
    if args.dask_size:
        with tempfile.TemporaryDirectory() as tmp:
            t1, n1 = dask_masks(args.dask_size, 1, Path(tmp))
            t2, n2 = dask_masks(args.dask_size, 2, Path(tmp))
        print(f"mask stage, {args.dask_size:g} MP, blocks 1024 + 64 halo, dask LocalCluster:")
        print(f"  1 worker {t1:.1f} s, 2 workers {t2:.1f} s: speed-up {t1 / t2:.2f}x "
              f"(cells {n1} / {n2}, equal: {n1 == n2})")


if __name__ == "__main__":
    main()
