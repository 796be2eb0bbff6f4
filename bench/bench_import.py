"""Scale of the Xenium import: peak memory and transcripts per second.

Writes a synthetic Xenium bundle, streamed (transcripts.parquet in row groups of 1 M rows
with Xenium's columns and types; morphology_mip.ome.tif: a tiled pyramidal OME-TIFF of
--side px with 3 sub-resolutions), then imports it in a child process (so that its peak
resident memory, VmHWM, is its own) and prints peak memory, transcripts/s of the
transcript phase, and the image phase's time. Targets: <= 4 GB, >= 5 M transcripts/s.

Run: python bench/bench_import.py [--transcripts 1e8] [--side 40000] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHILD = """
import json, sys
from bench.common import peak_rss_mb
from GeneSegNet.vendors import import_bundle, open_bundle
bundle, base, comp = sys.argv[1], sys.argv[2], sys.argv[3]
res = import_bundle(open_bundle("xenium", bundle=bundle), base, "bench", overwrite=True,
                    compression=None if comp == "none" else comp)
print(json.dumps({"peak_rss_mb": peak_rss_mb(), "seconds": res.seconds,
                  "counts": res.counts.to_dict()}))
"""

PIXEL_SIZE = 0.2125
TILE = 512


def write_transcripts(path: Path, n: int, side_um: float, seed: int = 0) -> None:
    """``n`` transcripts uniform over the image, 300 genes + 20 control probes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    genes = np.array([f"Gene{i:03d}" for i in range(300)]
                     + [f"NegControlProbe_{i:05d}" for i in range(10)]
                     + [f"UnassignedCodeword_{i:04d}" for i in range(10)], dtype=object)
    cells = np.array(["UNASSIGNED"] + [f"aaa{i:05d}-1" for i in range(999)], dtype=object)
    writer = None
    done = 0
    while done < n:
        m = min(1 << 20, n - done)
        table = pa.table({
            "transcript_id": pa.array(np.arange(done, done + m, dtype=np.uint64)),
            "cell_id": pa.array(cells[rng.integers(0, len(cells), m)], pa.string()),
            "overlaps_nucleus": pa.array(rng.integers(0, 2, m, dtype=np.uint8)),
            "feature_name": pa.array(genes[rng.integers(0, len(genes), m)], pa.string()),
            "x_location": pa.array(rng.uniform(0, side_um, m).astype(np.float32)),
            "y_location": pa.array(rng.uniform(0, side_um, m).astype(np.float32)),
            "z_location": pa.array(rng.uniform(0, 20, m).astype(np.float32)),
            "qv": pa.array(rng.uniform(0, 40, m).astype(np.float32)),
        })
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema, compression="zstd")
        writer.write_table(table, row_group_size=1 << 20)
        done += m
    writer.close()


def write_pyramid(path: Path, side: int, levels: int = 4) -> None:
    """A (1, side, side) uint16 tiled pyramidal OME-TIFF, written tile by tile."""
    import tifffile

    rng = np.random.default_rng(1)
    base_tile = (rng.random((TILE, TILE)) * 3000).astype(np.uint16)

    def tiles(n: int):
        for _ in range((-(-n // TILE)) ** 2):
            yield base_tile

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(tiles(side), shape=(1, side, side), dtype=np.uint16, tile=(TILE, TILE),
                 subifds=levels - 1, compression="zlib",
                 metadata={"axes": "CYX", "PhysicalSizeX": PIXEL_SIZE,
                           "PhysicalSizeY": PIXEL_SIZE})
        for k in range(1, levels):
            s = -(-side // 2 ** k)
            tw.write(tiles(s), shape=(1, s, s), dtype=np.uint16, tile=(TILE, TILE),
                     subfiletype=1, compression="zlib")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transcripts", type=float, default=1e8)
    parser.add_argument("--side", type=int, default=40000, help="image side (px)")
    parser.add_argument("--compression", default="zlib", choices=("zlib", "none"))
    parser.add_argument("--work", type=Path, default=None, help="scratch folder")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench_import_", dir=args.work))
    try:
        bundle = work / "bundle"
        bundle.mkdir()
        n = int(args.transcripts)
        t0 = time.perf_counter()
        write_transcripts(bundle / "transcripts.parquet", n, args.side * PIXEL_SIZE)
        write_pyramid(bundle / "morphology_mip.ome.tif", args.side)
        (bundle / "experiment.xenium").write_text(json.dumps({"pixel_size": PIXEL_SIZE}))
        print(f"bundle: {n:,} transcripts, {args.side} px side, written in "
              f"{time.perf_counter() - t0:.1f} s")
        root = Path(__file__).resolve().parent.parent
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", CHILD, str(bundle), str(work / "raw"),
                              args.compression], check=True, capture_output=True, text=True,
                             cwd=root)
        wall = time.perf_counter() - t0
        report = json.loads(out.stdout.strip().splitlines()[-1])
        sec = report["seconds"]
        print(f"import: {wall:.1f} s wall (child), transcripts {sec['transcripts']:.1f} s = "
              f"{n / sec['transcripts'] / 1e6:.2f} M transcripts/s, image "
              f"{sec['image']:.1f} s ({args.side ** 2 / sec['image'] / 1e6:.1f} Mpx/s, "
              f"{args.compression})")
        print(f"peak memory of the import process: {report['peak_rss_mb'] / 1024:.2f} GB "
              f"(target <= 4 GB); spots {report['counts']['spots']:,}, controls "
              f"{report['counts']['controls_total']:,}, low qv "
              f"{report['counts']['dropped_low_qv']:,}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
