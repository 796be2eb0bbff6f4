"""A disk-backed :class:`GeneSegNet.slide.windows.SpotIndex` for out-of-core runs.

The inside spots of a :class:`GeneSegNet.io.spot_stream.SpotSpill` are sorted by square
bin (``bin_size`` px, row-major) with a two-pass counting sort: pass 1 counts the spots
per bin, pass 2 scatters each batch (stable: file order within a bin) into one file of
records ``(row, col, code)`` int32 (12 bytes a spot). Queries read the contiguous record
ranges of the bins they touch with ``np.fromfile(offset=...)``; only the bin offsets
(int64, one per bin) stay in memory. The query logic is :class:`SpotIndex`'s own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from GeneSegNet.io.atomic import atomic_path
from GeneSegNet.io.spot_stream import BATCH_ROWS, SpotSpill
from GeneSegNet.io.spots import spot_pixels
from GeneSegNet.mapping import key_runs, stable_order
from GeneSegNet.slide.windows import SpotIndex

logger = logging.getLogger(__name__)

RECORD = np.dtype([("row", "<i4"), ("col", "<i4"), ("code", "<i4")])


def inside_pixels(spill: SpotSpill, shape: tuple[int, int], batch_rows: int = BATCH_ROWS
                  ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(rows, cols, gene codes) of the spots inside an image of ``shape`` (H, W), batch by
    batch in file order (int64 px, int64 px, int32 spill codes;
    :func:`GeneSegNet.io.spots.spot_pixels`)."""
    for batch in spill.batches(batch_rows):
        rows, cols, inside = spot_pixels(batch.x, batch.y, shape)
        yield rows, cols, batch.gene[inside]


class DiskSpotIndex(SpotIndex):
    """:class:`SpotIndex` over a record file (module docstring); build with :meth:`build`.

    Picklable (dask workers reopen the file per query)."""

    def __init__(self, path: str | Path, offsets: np.ndarray, shape: tuple[int, int],
                 bin_size: int) -> None:
        self.path = Path(path)
        self.shape = (int(shape[0]), int(shape[1]))
        self.bin = int(bin_size)
        self.n_bin_cols = -(-self.shape[1] // self.bin)
        self.offsets = np.asarray(offsets, np.int64)
        self.n = int(self.offsets[-1])

    def __len__(self) -> int:
        return self.n

    def _read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rec = np.fromfile(self.path, dtype=RECORD, count=stop - start,
                          offset=start * RECORD.itemsize)
        return rec["row"], rec["col"], rec["code"]

    @classmethod
    def build(cls, spill: SpotSpill, shape: tuple[int, int], path: str | Path, *,
              bin_size: int = 256, code_table: np.ndarray | None = None,
              batch_rows: int = BATCH_ROWS, progress: bool = False) -> DiskSpotIndex:
        """Sort the inside spots of ``spill`` into ``path`` (written atomically).

        code_table : int [G] model gene code per spill code (-1 unknown); None: all -1.
        """
        height, width = int(shape[0]), int(shape[1])
        n_bin_cols = -(-width // bin_size)
        n_bins = -(-height // bin_size) * n_bin_cols
        table = None if code_table is None else np.asarray(code_table, np.int32)

        def keyed() -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
            batches = inside_pixels(spill, shape, batch_rows)
            for rows, cols, genes in tqdm(batches, desc="spot index", unit="batch",
                                          disable=not progress):
                yield (rows // bin_size) * n_bin_cols + cols // bin_size, rows, cols, genes

        counts = np.zeros(n_bins, np.int64)
        for key, *_ in keyed():  # pass 1: spots per bin
            counts += np.bincount(key, minlength=n_bins)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        cursor = offsets[:-1].copy()
        with atomic_path(Path(path)) as tmp:
            with open(tmp, "wb") as handle:
                handle.truncate(int(offsets[-1]) * RECORD.itemsize)
                fd = handle.fileno()
                for key, rows, cols, genes in keyed():  # pass 2: stable scatter
                    if not len(key):
                        continue
                    order = stable_order(key)
                    rec = np.empty(len(order), RECORD)
                    rec["row"], rec["col"] = rows[order], cols[order]
                    rec["code"] = -1 if table is None else table[genes[order]]
                    raw = rec.view(np.uint8)
                    for k, a, b in key_runs(key[order]):
                        os.pwrite(fd, raw[a * RECORD.itemsize: b * RECORD.itemsize],
                                  int(cursor[k]) * RECORD.itemsize)
                        cursor[k] += b - a
        logger.info("spot index: %d spots in %d bins of %d px -> %s", int(offsets[-1]),
                    n_bins, bin_size, path)
        return cls(path, offsets, shape, bin_size)
