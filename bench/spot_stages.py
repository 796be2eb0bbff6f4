"""Spot stages of an out-of-core run at many transcripts (``bench_outofcore.py --spots N``).

The parent writes a Xenium-like spot parquet (x_location, y_location in px, feature_name
strings of ``N_GENES`` genes; spots drawn field of view by field of view, 2048 px, as
Xenium files are ordered) in batches, and a run store with a finished label image (a
regular grid of square cells, written chunk by chunk). Children then time and measure
(VmHWM, reset between stages) the streamed stages (spill, disk index, density scale,
heatmap of the whole slide, bucketed mapping + cell_by_gene) or the in-memory way
(read_spots, SpotIndex, slide_density_scale, heatmap, map_transcripts + dense counts).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np

N_GENES = 300
FOV = 2048
SIGMA = 7.0
PIXEL_SIZE_UM = 0.2125


def write_spot_parquet(path: Path, n: int, side: int, seed: int = 0,
                       batch: int = 1_000_000) -> Path:
    """N spots over a side² px slide, one FOV after another, ``batch`` rows at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    names = pa.array([f"Gene{g:03d}_{'x' * (g % 7)}" for g in range(N_GENES)])
    weights = rng.gamma(0.7, size=N_GENES)
    weights /= weights.sum()
    grid = -(-side // FOV)
    per_fov = np.full(grid * grid, n // (grid * grid))
    per_fov[: n - per_fov.sum()] += 1
    schema = pa.schema([("x_location", pa.float64()), ("y_location", pa.float64()),
                        ("feature_name", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for f, count in enumerate(per_fov):
            r0, c0 = divmod(f, grid)
            for start in range(0, int(count), batch):
                m = min(batch, int(count) - start)
                y = rng.uniform(r0 * FOV, min((r0 + 1) * FOV, side), m)
                x = rng.uniform(c0 * FOV, min((c0 + 1) * FOV, side), m)
                genes = pa.DictionaryArray.from_arrays(
                    pa.array(rng.choice(N_GENES, m, p=weights).astype(np.int32)), names)
                writer.write_table(pa.table([x, y, genes.cast(pa.string())], schema=schema))
    return path


def write_grid_store(path: Path, side: int, pitch: int):
    """A finished run store: cells of (pitch - 4)² px on a pitch grid, ids row-major."""
    from GeneSegNet.slide.store import SlideStore

    store = SlideStore(path, (side, side), {"bench": "spots"}, "float16", chunk=1024)
    labels = store.fresh_labels()
    per_row = -(-side // pitch)
    for r0 in range(0, side, 1024):
        rr = np.arange(r0, min(r0 + 1024, side))[:, None]
        for c0 in range(0, side, 1024):
            cc = np.arange(c0, min(c0 + 1024, side))[None, :]
            ids = (rr // pitch) * per_row + cc // pitch + 1
            cell = (rr % pitch < pitch - 4) & (cc % pitch < pitch - 4)
            labels[r0: r0 + len(rr), c0: c0 + cc.shape[1]] = np.where(cell, ids, 0)
    store.finish(per_row * per_row)
    return store


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()[:16]


def _heatmap_checksum(index) -> int:
    from GeneSegNet.slide.windows import heatmap_tiles

    return int(sum(int(t.sum(dtype=np.int64)) for t in heatmap_tiles(index, SIGMA)))


def spot_child(mode: str, parquet: Path, store_path: Path, out: Path, stage_peak) -> dict:
    """Run the stages of ``mode`` ("stream" or "memory"); per-stage peak MiB and s."""
    import zarr

    from GeneSegNet.data.transcripts import slide_density_scale, slide_density_scale_stream
    from GeneSegNet.slide.store import SlideStore

    group = zarr.open_group(str(store_path), mode="r+")
    side = int(group["labels"].shape[0])
    store = SlideStore(store_path, (side, side), {"bench": "spots"}, "float16", chunk=1024)
    shape = store.shape
    stages, times, result = {}, {}, {}
    stage_peak()

    def done(name: str, start: float) -> None:
        times[name] = round(time.perf_counter() - start, 2)
        stages[name] = round(stage_peak(), 1)

    if mode == "stream":
        from GeneSegNet.io.spot_stream import spill_spots
        from GeneSegNet.slide.disk_spots import DiskSpotIndex, inside_pixels
        from GeneSegNet.slide.spot_mapping import write_mapping_streamed

        t = time.perf_counter()
        spill = spill_spots(parquet, store.path / "spots")
        done("read+spill", t)
        t = time.perf_counter()
        index = DiskSpotIndex.build(spill, shape, store.path / "spot_index.rec")
        done("index", t)
        t = time.perf_counter()
        result["scale"] = slide_density_scale_stream(
            lambda: ((r, c) for r, c, _ in inside_pixels(spill, shape)),
            pixel_size_um=PIXEL_SIZE_UM)
        done("density", t)
        t = time.perf_counter()
        result["heatmap"] = _heatmap_checksum(index)
        done("heatmap", t)
        t = time.perf_counter()
        files = write_mapping_streamed(out, "s", store, spill)
        done("mapping", t)
    else:
        from GeneSegNet.io import atomic_path, read_spots, spot_pixels
        from GeneSegNet.mapping import cell_by_gene_counts
        from GeneSegNet.slide.slides_ooc import map_spots_out_of_core
        from GeneSegNet.slide.windows import SpotIndex

        t = time.perf_counter()
        table = read_spots(parquet, strict=False)
        done("read", t)
        t = time.perf_counter()
        rows, cols, _ = spot_pixels(table["x"].to_numpy(), table["y"].to_numpy(), shape)
        index = SpotIndex(rows.astype(np.int32), cols.astype(np.int32), shape)
        done("index", t)
        t = time.perf_counter()
        result["scale"] = slide_density_scale(rows, cols, pixel_size_um=PIXEL_SIZE_UM)
        del rows, cols
        done("density", t)
        t = time.perf_counter()
        result["heatmap"] = _heatmap_checksum(index)
        done("heatmap", t)
        t = time.perf_counter()
        mapped = map_spots_out_of_core(store, table)
        files = [out / "s.csv", out / "s_cell_by_gene.csv"]
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(files[0]) as tmp:
            mapped.to_csv(tmp, index=False, float_format="%.10g")
        n_cells = int(store.group.attrs.get("n_cells", 0))
        counts = cell_by_gene_counts(None, mapped["cell_id"].to_numpy(),
                                     mapped["gene"].to_numpy(), cells=np.arange(1, n_cells + 1))
        with atomic_path(files[1]) as tmp:
            counts.to_csv(tmp)
        done("mapping", t)
    result.update(stages=stages, times=times, peak_mb=max(stages.values()),
                  seconds=round(sum(times.values()), 1),
                  digests=[_digest(f) for f in files])
    return result
