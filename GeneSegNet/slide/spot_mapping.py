"""Transcript mapping of an out-of-core run store, streamed (memory flat in spot count).

Writes the files of :func:`GeneSegNet.slide.slides_ooc.write_mapping_out_of_core` from a
spot source with batches in file order (:class:`GeneSegNet.io.spot_stream.SpotSpill`, or
:class:`~GeneSegNet.io.spot_stream.FrameSpots` for a table in memory):

1. each batch's cell ids and cell-probability logits are looked up chunk by chunk in the
   store (:func:`GeneSegNet.mapping.lookup_chunked`) and its rows appended, in file
   order, to on-disk buckets by cell-id range (bucket 0: background and, with
   ``out_of_bounds="background"``, the spots outside the image);
2. bucket 0 is copied out in file order; every other bucket is sorted by cell id in
   memory (stable, so file order within a cell) and appended to the CSV, and its
   cell-by-gene counts (one bincount) appended to the second CSV.

Values and formatting equal the in-memory table's (:func:`GeneSegNet.mapping.
map_transcripts` + ``cell_probability``, ``float_format="%.10g"``).
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from GeneSegNet.export.confidence import PROBABILITY_COLUMN, cell_probability
from GeneSegNet.io.atomic import atomic_path, temp_dir
from GeneSegNet.io.spot_stream import BATCH_ROWS
from GeneSegNet.io.spots import spot_pixels
from GeneSegNet.mapping import OUT_OF_BOUNDS_POLICIES, key_runs, lookup_chunked, stable_order

logger = logging.getLogger(__name__)

ROW = np.dtype([("cell", "<i4"), ("x", "<f8"), ("y", "<f8"), ("gene", "<i4"),
                ("prob", "<f4")])
BUCKET_ROWS = 4_000_000  # spots per bucket aimed at (a bucket is sorted in memory)
CBG_ROWS = 20_000  # cells per block of the cell-by-gene CSV


class Plane:
    """Channel ``c`` of a [C, H, W] zarr array as a 2-D array-like (for chunked reads)."""

    def __init__(self, array, c: int) -> None:
        self.array, self.c = array, c
        self.shape, self.dtype = tuple(array.shape[1:]), array.dtype
        self.chunks = tuple(array.chunks[1:])

    def __getitem__(self, key) -> np.ndarray:
        return np.asarray(self.array[(self.c, *key)])


@dataclass
class MappingCounts:
    """What happened to the spots (as :class:`GeneSegNet.mapping.MappingResult`)."""

    n_spots: int = 0
    n_invalid: int = 0
    n_out_of_bounds: int = 0
    n_assigned: int = 0


def _bucket(store, spots, folder: Path, out_of_bounds: str, cells_per: int,
            batch_rows: int, progress: bool) -> tuple[MappingCounts, np.ndarray]:
    """Step 1 (module docstring); returns the counts and which spill codes are written."""
    counts = MappingCounts()
    present = np.zeros(0, bool)
    handles: dict[int, object] = {}
    labels, logits = store.labels, Plane(store.field, 2)
    try:
        for batch in tqdm(spots.batches(batch_rows), desc="mapping", unit="batch",
                          disable=not progress):
            rows, cols, inside = spot_pixels(batch.x, batch.y, store.shape)
            finite = np.isfinite(batch.x) & np.isfinite(batch.y)
            cell = np.zeros(len(batch.x), np.int32)
            cell[inside] = lookup_chunked(labels, rows, cols)
            prob = np.full(len(batch.x), np.nan, np.float32)
            prob[inside] = cell_probability(lookup_chunked(logits, rows, cols))
            counts.n_spots += len(batch.x)
            counts.n_invalid += int((~finite).sum())
            counts.n_out_of_bounds += int((finite & ~inside).sum())
            counts.n_assigned += int(np.count_nonzero(cell))
            keep = np.flatnonzero(inside) if out_of_bounds == "drop" else slice(None)
            rec = np.empty(len(cell[keep]), ROW)
            rec["cell"], rec["x"], rec["y"] = cell[keep], batch.x[keep], batch.y[keep]
            rec["gene"], rec["prob"] = batch.gene[keep], prob[keep]
            used = np.bincount(rec["gene"], minlength=len(present)) > 0
            present = used | np.pad(present, (0, len(used) - len(present)))
            which = np.where(rec["cell"] > 0, (rec["cell"] - 1) // cells_per + 1, 0)
            order = stable_order(which)
            for k, a, b in key_runs(which[order]):
                if k not in handles:
                    handles[k] = open(folder / f"b{k}.rec", "ab")  # noqa: SIM115
                rec[order[a:b]].tofile(handles[k])
    finally:
        for handle in handles.values():
            handle.close()
    return counts, present


def _frame(rec: np.ndarray, names: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"cell_id": rec["cell"].astype(np.int64), "spotX": rec["x"],
                         "spotY": rec["y"], "gene": names[rec["gene"]],
                         PROBABILITY_COLUMN: rec["prob"]})


def write_mapping_streamed(folder: Path, name: str, store, spots,
                           out_of_bounds: str = "background", *, batch_rows: int = BATCH_ROWS,
                           bucket_rows: int = BUCKET_ROWS, progress: bool = False
                           ) -> list[Path]:
    """``<folder>/<name>.csv`` and ``<folder>/<name>_cell_by_gene.csv`` of a finished
    ``store`` (cells 1..K) for ``spots`` (module docstring), each written atomically."""
    if out_of_bounds not in OUT_OF_BOUNDS_POLICIES:
        raise ValueError(f"out_of_bounds must be one of {OUT_OF_BOUNDS_POLICIES}")
    folder = Path(folder)
    n_cells = int(store.group.attrs.get("n_cells", 0))
    n_buckets = max(1, math.ceil(len(spots) / max(1, int(bucket_rows))))
    cells_per = max(1, math.ceil(n_cells / n_buckets))
    out, cbg = folder / f"{name}.csv", folder / f"{name}_cell_by_gene.csv"
    work = temp_dir(folder / f"{name}.buckets")
    try:
        counts, present = _bucket(store, spots, work, out_of_bounds, cells_per, batch_rows,
                                  progress)
        names = spots.vocabulary.as_array()
        kept = np.flatnonzero(present)
        gene_order = kept[np.argsort(names[kept].astype(str), kind="stable")]
        columns = names[gene_order].astype(str)
        column_of = np.full(len(names), -1, np.int64)
        column_of[gene_order] = np.arange(len(gene_order))
        with atomic_path(out) as tmp_out, atomic_path(cbg) as tmp_cbg, \
                open(tmp_out, "w", newline="") as f_out, \
                open(tmp_cbg, "w", newline="") as f_cbg:
            first = True
            background = work / "b0.rec"
            total = background.stat().st_size // ROW.itemsize if background.exists() else 0
            for start in range(0, total, batch_rows):
                rec = np.fromfile(background, ROW, count=batch_rows, offset=start * ROW.itemsize)
                _frame(rec, names).to_csv(f_out, index=False, header=first, float_format="%.10g")
                first = False
            n_buckets = -(-n_cells // cells_per)
            for k in range(1, n_buckets + 1):
                path = work / f"b{k}.rec"
                rec = np.fromfile(path, ROW) if path.exists() else np.zeros(0, ROW)
                lo, hi = (k - 1) * cells_per + 1, min(k * cells_per, n_cells) + 1
                rec = rec[stable_order(rec["cell"] - lo)]
                for start in range(0, len(rec), batch_rows):
                    _frame(rec[start: start + batch_rows], names).to_csv(
                        f_out, index=False, header=first, float_format="%.10g")
                    first = False
                for c0 in range(lo, hi, CBG_ROWS):
                    c1 = min(c0 + CBG_ROWS, hi)
                    a, b = np.searchsorted(rec["cell"], [c0, c1])
                    flat = (rec["cell"][a:b] - c0).astype(np.int64) * len(columns) \
                        + column_of[rec["gene"][a:b]]
                    block = np.bincount(flat, minlength=(c1 - c0) * len(columns))
                    pd.DataFrame(block.reshape(c1 - c0, len(columns)).astype(np.int64),
                                 index=pd.Index(np.arange(c0, c1, dtype=np.int64),
                                                name="cell_id"),
                                 columns=columns).to_csv(f_cbg, header=k == 1 and c0 == lo)
            if first:
                _frame(np.zeros(0, ROW), names).to_csv(f_out, index=False)
            if n_cells == 0:
                pd.DataFrame(np.zeros((0, len(columns)), np.int64), columns=columns,
                             index=pd.Index([], dtype=np.int64, name="cell_id")).to_csv(f_cbg)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("%s: %d spots: %d in cells, %d outside the image, %d invalid (%s) -> %s",
                name, counts.n_spots, counts.n_assigned, counts.n_out_of_bounds,
                counts.n_invalid, "dropped" if out_of_bounds == "drop" else "cell id 0", out)
    return [out, cbg]
