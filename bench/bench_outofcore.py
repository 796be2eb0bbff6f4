"""Benchmark: out-of-core whole-slide masks (GeneSegNet.slide.outofcore) and dask workers.

1. Peak memory (VmHWM of a child process) against slide size (``--sizes`` in MP),
   in memory (``reconstruct_blockwise`` on a float16 canvas, as ``bench_inference.py
   --mode flows``) and out of core (the synthetic flows of ``bench_inference.py`` written
   to the zarr run store one band at a time, then block tasks and the merge).
   ``--modes`` selects the paths (``out-of-core`` only for slides whose float16 canvas
   does not fit in memory).
2. ``--network MP``: one out-of-core run of the whole pipeline with a network (a tiny
   untrained one, nbase 8/16/16/16, on a synthetic nuclei image in a tiled TIFF with 0.03
   spots/px): window pass, masks, merge and the chunked transcript mapping.
4. ``--spots N[,N2]``: the spot stages of an out-of-core run at N transcripts on a
   ``--spot_side`` px slide (:mod:`bench.spot_stages`): streamed (spill, disk index,
   density scale, whole-slide heatmap, bucketed mapping) against the in-memory way
   (read_spots, SpotIndex, map_transcripts, dense counts; only up to ``--spot_memory_max``
   transcripts), each in a child process; prints peaks, seconds, ratios and whether the
   mapping files are byte-identical.
3. Mask-stage time with 1 and 2 dask workers (LocalCluster, processes, one thread each)
   on ``--dask_size`` MP; prints the ratio.

Children run with OMP/MKL/NUMBA threads = 1 (and torch 1 thread).
Run: ``.venv/bin/python bench/bench_outofcore.py [--sizes 100,400] [--modes memory,out-of-core]
[--network 16] [--dask_size 16]``
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
from GeneSegNet.slide.outofcore import (  # noqa: E402
    MaskSettings,
    block_cells,
    blocks_serial,
    merge_blocks,
)
from GeneSegNet.slide.store import SlideStore  # noqa: E402

MS = MaskSettings(block_size=2048, halo=64)


def fill_store(store: SlideStore, piece: int = 4096) -> None:
    """Synthetic flows into the store, one chunk row and ``piece`` columns at a time (each
    piece starts on a lattice point, so the pieces join as one image; memory does not grow
    with the slide's width)."""
    height, width = store.shape
    for r0 in range(0, height, store.chunk):
        r1 = min(r0 + store.chunk, height)
        for c0 in range(0, width, piece):
            c1 = min(c0 + piece, width)
            lr, lc = r0 % PERIOD, c0 % PERIOD
            part = np.empty((3, r1 - r0 + lr, c1 - c0 + lc), np.float16)
            synthetic_slide(part, np.empty(part.shape[1:], np.uint8))
            store.field[:, r0:r1, c0:c1] = part[:, lr:, lc:]
    store.group["done_field"][:] = 1


def stage_peak() -> float:
    """Peak RSS (MiB) since the last call, then reset the peak (Linux clear_refs 5)."""
    peak = peak_rss_mb()
    with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
        refs.write("5")
    return peak


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
        stages = {"setup": stage_peak()}
        fill_store(store)
        stages["fill (bench)"] = stage_peak()
        blocks_serial(store, MS)
        stages["blocks"] = stage_peak()
        cells = merge_blocks(store, MS)
        stages["merge"] = stage_peak()
        return {"mp": side * side / 1e6, "cells": cells, "peak_mb": max(stages.values()),
                "seconds": time.perf_counter() - start, "stages": stages}
    return {"mp": side * side / 1e6, "cells": cells, "peak_mb": peak_rss_mb(),
            "seconds": time.perf_counter() - start}


def network_child(mp: float, folder: Path) -> dict:
    """The out-of-core pipeline with a tiny untrained network (module docstring)."""
    import pandas as pd
    import torch

    from GeneSegNet.io.images import write_tiled_tiff
    from GeneSegNet.model.net import GeneSegUNet, NetConfig
    from GeneSegNet.model.predict import EvalConfig
    from GeneSegNet.slide.outofcore import segment_slide_out_of_core
    from GeneSegNet.slide.plan import SlideConfig, plan_windows
    from GeneSegNet.slide.slides_ooc import map_spots_out_of_core
    from GeneSegNet.slide.store import LazyImage
    from GeneSegNet.slide.windows import SpotIndex

    torch.set_num_threads(1)
    side = int(round(np.sqrt(mp * 1e6)))
    shape = (side, side)

    def image_tiles(tile=256):
        for r0 in range(0, side, tile):
            rows = min(tile, side - r0)
            band = np.empty((3, rows + r0 % PERIOD, side), np.float16)
            nuclei = np.empty(band.shape[1:], np.uint8)
            synthetic_slide(band, nuclei)
            nuclei = nuclei[r0 % PERIOD :]
            for c0 in range(0, side, tile):
                out = np.zeros((tile, tile), np.uint8)
                part = nuclei[:, c0 : c0 + tile]
                out[: part.shape[0], : part.shape[1]] = part
                yield out

    write_tiled_tiff(folder / "img.tif", image_tiles(), shape, np.uint8, 256)
    rng = np.random.default_rng(0)
    n_spots = int(0.03 * side * side)
    spots = pd.DataFrame({"x": rng.uniform(0, side, n_spots), "y": rng.uniform(0, side, n_spots),
                          "gene": pd.Categorical.from_codes(rng.integers(0, 100, n_spots),
                                                            [f"g{k}" for k in range(100)])})
    index = SpotIndex(spots.y.to_numpy().astype(np.int32), spots.x.to_numpy().astype(np.int32),
                      shape)
    torch.manual_seed(0)
    net = GeneSegUNet(NetConfig(nchan=2, nbase=(8, 16, 16, 16))).eval()
    cfg = SlideConfig(evaluation=EvalConfig(diameter=34.0))
    plan = plan_windows(shape, cfg, diam_mean=34.0, diam_labels=34.0,
                        size_multiple=net.config.size_multiple)
    store = SlideStore(folder / "n.zarr", shape, {"bench": mp}, cfg.canvas_dtype)
    start = time.perf_counter()
    cells = segment_slide_out_of_core(net, LazyImage(folder / "img.tif", 1), index, store,
                                      plan, cfg, MS, device="cpu")
    masks_s = time.perf_counter() - start
    mapped = map_spots_out_of_core(store, spots)
    return {"mp": side * side / 1e6, "cells": cells, "peak_mb": peak_rss_mb(),
            "seconds": time.perf_counter() - start, "masks_s": masks_s,
            "assigned": int((mapped["cell_id"] > 0).sum()), "spots": n_spots}


def warm_worker(side: int = 256) -> int:
    """One small block of synthetic flows through the mask stage in this process, so that
    imports and the numba kernels' cache loading are paid before the timing."""
    with tempfile.TemporaryDirectory() as tmp:
        store = SlideStore(Path(tmp) / "warm.zarr", (side, side), {"warm": 1}, "float16")
        fill_store(store)
        store.ensure_blocks(1)
        return block_cells(store, 0, MaskSettings(block_size=side, halo=0))


def dask_masks(mp: float, workers: int, folder: Path, warm: bool = False
               ) -> tuple[float, int]:
    """Mask-stage seconds on ``workers`` dask worker processes (one thread each) and the
    merged cell count; ``warm``: every worker runs :func:`warm_worker` first (untimed)."""
    from GeneSegNet.slide.distributed import DaskExecutor, DaskSettings, dask_client

    side = int(round(np.sqrt(mp * 1e6)))
    store = SlideStore(folder / f"d{workers}.zarr", (side, side), {"bench": mp}, "float16")
    fill_store(store)
    ms = MaskSettings(block_size=1024, halo=64)
    settings = DaskSettings(workers=workers, processes=True)
    with dask_client(settings) as client:
        if warm:
            client.run(warm_worker)
        start = time.perf_counter()
        DaskExecutor(client, settings)._blocks(store, ms)
        seconds = time.perf_counter() - start
    return seconds, merge_blocks(store, ms)


def spot_benchmark(args) -> None:
    """``--spots``: see the module docstring (item 4)."""
    import shutil

    from bench.spot_stages import write_grid_store, write_spot_parquet

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    side = args.spot_side
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        store = write_grid_store(folder / "label_s.zarr", side, args.cell_pitch)
        cells = int(store.group.attrs["n_cells"])
        print(f"store {side}x{side} px, {cells} cells ({time.perf_counter() - start:.0f} s)")
        for n in [int(float(v)) for v in args.spots.split(",") if v]:
            start = time.perf_counter()
            parquet = write_spot_parquet(folder / f"spots_{n}.parquet", n, side)
            print(f"{n:.3g} transcripts: parquet {parquet.stat().st_size / 2**20:.0f} MiB "
                  f"({time.perf_counter() - start:.0f} s)")
            got = {}
            modes = ["stream"] + (["memory"] if n <= args.spot_memory_max else [])
            for mode in modes:
                shutil.rmtree(folder / "label_s.zarr" / "spots", ignore_errors=True)
                done = subprocess.run(
                    [sys.executable, __file__, "--spot_child", mode, str(parquet),
                     str(folder / "label_s.zarr"), str(folder / f"out_{mode}")],
                    capture_output=True, text=True, env=env, check=False)
                if done.returncode:
                    print(f"  {mode} failed: {done.stderr.strip().splitlines()[-3:]}")
                    continue
                r = got[mode] = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"  {mode:6s} peak {r['peak_mb']:7.0f} MiB, {r['seconds']:7.1f} s; "
                      + ", ".join(f"{k} {r['stages'][k]:.0f} MiB/{r['times'][k]:.1f} s"
                                  for k in r["stages"]))
                shutil.rmtree(folder / f"out_{mode}", ignore_errors=True)
            if len(got) == 2:
                s, m = got["stream"], got["memory"]
                print(f"  memory/stream peak ratio {m['peak_mb'] / s['peak_mb']:.1f}x, time "
                      f"ratio {m['seconds'] / s['seconds']:.2f}x; same scale "
                      f"{s['scale'] == m['scale']}, heatmap {s['heatmap'] == m['heatmap']}, "
                      f"mapping files {s['digests'] == m['digests']}")
            parquet.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100", help="comma-separated megapixels")
    parser.add_argument("--modes", default="memory,out-of-core",
                        help="comma-separated: memory, out-of-core")
    parser.add_argument("--network", type=float, default=0.0,
                        help="MP of the out-of-core run with a network (0: none)")
    parser.add_argument("--dask_size", type=float, default=16.0)
    parser.add_argument("--spots", default="", help="comma-separated transcript counts")
    parser.add_argument("--spot_side", type=int, default=20000, help="slide edge (px)")
    parser.add_argument("--cell_pitch", type=int, default=40, help="cell grid pitch (px)")
    parser.add_argument("--spot_memory_max", type=float, default=2e7,
                        help="largest N also run the in-memory way")
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--spot_child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.spot_child:
        from bench.spot_stages import spot_child

        mode, parquet, store, out = args.spot_child
        print(json.dumps(spot_child(mode, Path(parquet), Path(store), Path(out), stage_peak)))
        return
    if args.spots:
        spot_benchmark(args)
        return
    if args.child:
        with tempfile.TemporaryDirectory() as tmp:
            if args.child[1] == "network":
                result = network_child(float(args.child[0]), Path(tmp))
            else:
                result = child(float(args.child[0]), args.child[1], Path(tmp))
            print(json.dumps(result))
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    print("peak memory, synthetic flows (float16 canvas, blocks 2048 + 64 halo, 1024 chunks):")
    modes = [m for m in args.modes.split(",") if m]
    for size in [float(s) for s in args.sizes.split(",") if s]:
        for mode in modes:
            done = subprocess.run([sys.executable, __file__, "--child", str(size), mode],
                                  capture_output=True, text=True, env=env, check=False)
            if done.returncode:
                print(f"  {size} MP {mode} failed: {done.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"  {r['mp']:7.1f} MP {mode:12s} peak {r['peak_mb']:7.0f} MiB "
                  f"({r['peak_mb'] * 1.048576 / r['mp']:5.1f} B/px) {r['cells']:8d} cells "
                  f"{r['seconds']:7.1f} s" + ("; stage peaks " + ", ".join(
                      f"{k} {v:.0f}" for k, v in r["stages"].items()) if "stages" in r else ""))
    if args.network:
        done = subprocess.run([sys.executable, __file__, "--child", str(args.network),
                               "network"], capture_output=True, text=True, env=env, check=False)
        if done.returncode:
            print(f"  network run failed: {done.stderr.strip().splitlines()[-3:]}")
        else:
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"network (nbase 8/16/16/16, untrained), out of core, {r['mp']:.1f} MP: peak "
                  f"{r['peak_mb']:.0f} MiB, {r['cells']} cells, windows+masks+merge "
                  f"{r['masks_s']:.1f} s, with mapping {r['seconds']:.1f} s "
                  f"({r['assigned']} of {r['spots']} spots in cells)")
    if args.dask_size:
        with tempfile.TemporaryDirectory() as tmp:
            times = {(w, warm): dask_masks(args.dask_size, w, Path(tmp) / f"{w}{warm}", warm)
                     for warm in (False, True) for w in (1, 2)}
        print(f"mask stage, {args.dask_size:g} MP, blocks 1024 + 64 halo, dask LocalCluster "
              "(processes, 1 thread each):")
        for warm in (False, True):
            (t1, n1), (t2, n2) = times[1, warm], times[2, warm]
            print(f"  {'warm workers' if warm else 'cold workers'}: 1 worker {t1:.1f} s, "
                  f"2 workers {t2:.1f} s: speed-up {t1 / t2:.2f}x (cells {n1} / {n2}, "
                  f"equal: {n1 == n2})")


if __name__ == "__main__":
    main()
