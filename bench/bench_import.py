"""Scale of the Xenium import: peak memory and transcripts per second.

Writes a synthetic Xenium bundle, streamed (transcripts.parquet in row groups of 1 M rows
with Xenium's columns and types; morphology_mip.ome.tif: a tiled pyramidal OME-TIFF of
--side px with 3 sub-resolutions), then imports it in a child process (so that its peak
resident memory, VmHWM, is its own) and prints peak memory, transcripts/s of the
transcript phase, and the image phase's time. Targets: <= 4 GB, >= 5 M transcripts/s.

Each import is repeated ``--repeat`` times on the same bundle (the median is printed) and
each run also prints a same-run reference: the time pyarrow alone takes to decode the
vendor's table (the machine is shared; the reference shows how busy it was). The child
runs with OMP_NUM_THREADS=1 (pyarrow and tifffile keep their own thread pools).

``--labels vendor|segment|both`` then makes starting labels (``make_starting_labels``,
tiled above 2^26 px) from synthetic nucleus boundaries and/or by segmentation and prints
their peak memory and time.

Run: python bench/bench_import.py [--transcripts 1e8] [--side 40000] [--work DIR]
         [--repeat 3] [--labels none|vendor|segment|both]
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
import json, sys, time
import pyarrow.parquet as pq
from bench.common import peak_rss_mb
from GeneSegNet.vendors import import_bundle, open_bundle
bundle, base, comp = sys.argv[1], sys.argv[2], sys.argv[3]
# same-run reference of the machine's speed: pyarrow decoding the vendor table alone
t0 = time.perf_counter()
# (pre_buffer off, as the import reads: with it Arrow keeps every row group read so far,
# 2 GB at 10^8 rows, and this process's peak memory would be the reference's)
rows = sum(b.num_rows for b in pq.ParquetFile(bundle + "/transcripts.parquet",
           read_dictionary=["feature_name", "cell_id"], pre_buffer=False).iter_batches(
           batch_size=1 << 20))
ref = time.perf_counter() - t0
res = import_bundle(open_bundle("xenium", bundle=bundle), base, "bench", overwrite=True,
                    compression=None if comp == "none" else comp)
print(json.dumps({"peak_rss_mb": peak_rss_mb(), "seconds": res.seconds,
                  "counts": res.counts.to_dict(), "reference_s": ref}))
"""

LABELS_CHILD = """
import json, sys, time
from bench.common import peak_rss_mb
from preprocess import make_starting_labels
base, bundle, mode = sys.argv[1], sys.argv[2], sys.argv[3]
argv = ["--base_dir", base, "--sample", "bench", "--expand_um", "2", "--overwrite"]
argv += ["--bundle", bundle] if mode == "vendor" else ["--segment"]
t0 = time.perf_counter()
assert make_starting_labels.main(argv) == 0
print(json.dumps({"peak_rss_mb": peak_rss_mb(), "seconds": time.perf_counter() - t0}))
"""

PIXEL_SIZE = 0.2125
TILE = 512
NUCLEUS_SPACING_UM = 12.0  # synthetic nuclei: one per 12 µm grid cell, 4 µm radius


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


def write_nuclei(path: Path, side_um: float, seed: int = 2) -> int:
    """Xenium ``nucleus_boundaries.parquet``: a jittered grid of 13-vertex nuclei (4 µm
    radius, one per NUCLEUS_SPACING_UM), written in row groups; returns the cell count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    centres = np.arange(NUCLEUS_SPACING_UM / 2, side_um, NUCLEUS_SPACING_UM)
    ang = np.linspace(0, 2 * np.pi, 13)  # closed ring: last vertex = first
    writer = None
    for k, cy in enumerate(centres):
        cx = centres + rng.uniform(-2, 2, len(centres))
        y = cy + rng.uniform(-2, 2, len(centres))
        rad = rng.uniform(3.5, 4.5, (len(centres), 1))
        vx = (cx[:, None] + rad * np.cos(ang)).ravel()
        vy = (y[:, None] + rad * np.sin(ang)).ravel()
        ids = np.repeat([f"n{k:05d}-{j:05d}" for j in range(len(centres))], len(ang))
        table = pa.table({"cell_id": pa.array(ids, pa.string()),
                          "vertex_x": pa.array(vx.astype(np.float32)),
                          "vertex_y": pa.array(vy.astype(np.float32))})
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema, compression="zstd")
        writer.write_table(table)
    writer.close()
    return len(centres) ** 2


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


def run_import(bundle: Path, base: Path, compression: str) -> dict:
    """Import ``bundle`` in a child process (OMP_NUM_THREADS=1); its JSON report."""
    import os

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1")
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, str(bundle), str(base), compression],
                         check=True, capture_output=True, text=True, cwd=root, env=env)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    report["wall_s"] = time.perf_counter() - t0
    return report


def run_labels(base: Path, bundle: Path, mode: str) -> dict:
    """make_starting_labels (``mode`` vendor or segment) in a child process; its report."""
    import os

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", LABELS_CHILD, str(base), str(bundle), mode],
                         check=True, capture_output=True, text=True, cwd=root, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    import statistics

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transcripts", type=float, default=1e8)
    parser.add_argument("--side", type=int, default=40000, help="image side (px)")
    parser.add_argument("--compression", default="zlib", choices=("zlib", "none"))
    parser.add_argument("--repeat", type=int, default=3, help="imports of the same bundle")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder")
    parser.add_argument("--labels", choices=("none", "vendor", "segment", "both"),
                        default="none", help="then make starting labels (2 µm expansion) "
                        "from the bundle's nucleus boundaries and/or by segmentation, in "
                        "a child process: its peak memory and time")
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
        if args.labels != "none":
            cells = write_nuclei(bundle / "nucleus_boundaries.parquet", args.side * PIXEL_SIZE)
            print(f"nucleus_boundaries.parquet: {cells:,} nuclei")
        print(f"bundle: {n:,} transcripts, {args.side} px side, written in "
              f"{time.perf_counter() - t0:.1f} s; child threads: OMP_NUM_THREADS=1", flush=True)
        rates, peaks = [], []
        for k in range(max(1, args.repeat)):
            report = run_import(bundle, work / "raw", args.compression)
            sec = report["seconds"]
            rates.append(n / sec["transcripts"] / 1e6)
            peaks.append(report["peak_rss_mb"] / 1024)
            print(f"run {k + 1}: {report['wall_s']:.1f} s wall (child), transcripts "
                  f"{sec['transcripts']:.1f} s = {rates[-1]:.2f} M transcripts/s "
                  f"(reference: pyarrow decodes the table alone at "
                  f"{n / report['reference_s'] / 1e6:.2f} M rows/s), image "
                  f"{sec['image']:.1f} s ({args.side ** 2 / sec['image'] / 1e6:.1f} Mpx/s, "
                  f"{args.compression}), peak memory {peaks[-1]:.2f} GB", flush=True)
        c = report["counts"]
        print(f"median of {len(rates)}: {statistics.median(rates):.2f} M transcripts/s "
              f"(target >= 5); peak memory of the import process max {max(peaks):.2f} GB "
              f"(target <= 4 GB); spots {c['spots']:,}, controls {c['controls_total']:,}, "
              f"low qv {c['dropped_low_qv']:,}")
        for mode in {"vendor": ["vendor"], "segment": ["segment"],
                     "both": ["vendor", "segment"]}.get(args.labels, []):
            report = run_labels(work / "raw", bundle, mode)
            how = "tiled" if args.side ** 2 > 1 << 26 else "in memory"
            print(f"starting labels ({mode}, {args.side} x {args.side} px, {how}, 2 µm "
                  f"expansion): {report['seconds']:.1f} s, peak memory "
                  f"{report['peak_rss_mb'] / 1024:.2f} GB (a whole int32 label image: "
                  f"{4 * args.side ** 2 / 2 ** 30:.2f} GB)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
