"""Assign transcripts to cells by one vectorised lookup into a label image.

A spot at (x, y) lies in pixel (row, col) = (floor(y), floor(x)) and is inside the
image iff 0 <= x < W and 0 <= y < H (:func:`GeneSegNet.io.spots.spot_pixels`, the rule the
heatmaps use too); for inside spots this equals upstream's ``int(float())`` truncation.
Spots with a non-finite coordinate, or outside the image, are never wrapped around: they
are counted and either written with cell id 0 (background, the default) or dropped.

A label image that is not a NumPy array (a zarr array of an out-of-core run) is read chunk
by chunk: the spots are bucketed by chunk and each chunk is read once
(:func:`lookup_chunked`), so memory is one chunk plus a few arrays per spot.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import fastremap
import numpy as np
import pandas as pd

from GeneSegNet.errors import InputError
from GeneSegNet.io.layout import RAW_LABEL_PREFIXES, RAW_LABEL_SUFFIXES, RAW_SPOT_SUFFIXES

logger = logging.getLogger(__name__)

OUT_OF_BOUNDS_POLICIES = ("background", "drop")


@dataclass
class MappingResult:
    """Per-spot cell ids and counts of what happened to the spots."""

    table: pd.DataFrame  # cell_id, spotX, spotY, gene; sorted by cell_id (stable)
    n_spots: int
    n_invalid: int  # non-numeric or non-finite coordinates
    n_out_of_bounds: int  # finite but outside the image
    n_background: int  # inside the image, on a pixel with id 0
    n_assigned: int  # inside a cell

    def summary(self) -> str:
        return (f"{self.n_spots} spots: {self.n_assigned} in cells, {self.n_background} on "
                f"background, {self.n_out_of_bounds} outside the image, {self.n_invalid} with "
                f"invalid coordinates")


def lookup_cell_ids(labels: np.ndarray, x: np.ndarray, y: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell id under each spot.

    Parameters
    ----------
    labels : (H, W) integer label image (a NumPy array, or an array-like read chunk by
        chunk with :func:`lookup_chunked`, e.g. zarr).
    x, y : float spot coordinates (x = column, y = row), shape (N,).

    Returns
    -------
    cell_ids : (N,) int64, 0 for background and for spots that are not inside the image.
    finite : (N,) bool, coordinates are finite numbers.
    inside : (N,) bool, finite and inside the image.
    """
    from GeneSegNet.io.spots import spot_pixels

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    rows, cols, inside = spot_pixels(x, y, labels.shape)
    cell_ids = np.zeros(x.shape, dtype=np.int64)
    if isinstance(labels, np.ndarray):
        cell_ids[inside] = labels[rows, cols]
    else:
        cell_ids[inside] = lookup_chunked(labels, rows, cols)
    return cell_ids, finite, inside


def lookup_chunked(values, rows: np.ndarray, cols: np.ndarray,
                   chunk: tuple[int, int] | None = None) -> np.ndarray:
    """``values[rows, cols]`` of a 2-D array-like read one chunk at a time.

    values : (H, W) array with slicing (e.g. a zarr array); chunk : (rows, cols) of a
    read (default: ``values.chunks``, else 1024²). rows, cols : (N,) in-range pixels.
    Returns (N,) of ``values``' dtype; spots are visited in chunk order, each chunk once.
    """
    rows, cols = np.asarray(rows, np.int64), np.asarray(cols, np.int64)
    if chunk is None:
        chunk = tuple(getattr(values, "chunks", (1024, 1024))[-2:])
    ch, cw = int(chunk[0]), int(chunk[1])
    n_cols = -(-int(values.shape[-1]) // cw)
    key = (rows // ch) * n_cols + cols // cw
    order = stable_order(key)
    out = np.zeros(rows.shape, dtype=np.dtype(values.dtype))
    if not len(order):
        return out
    for k, a, b in key_runs(key[order]):
        i, j = divmod(k, n_cols)
        block = np.asarray(values[i * ch : (i + 1) * ch, j * cw : (j + 1) * cw])
        take = order[a:b]
        out[take] = block[rows[take] - i * ch, cols[take] - j * cw]
    return out


def stable_order(keys: np.ndarray) -> np.ndarray:
    """Indices that sort non-negative integer ``keys`` stably (equal keys keep their order).

    Keys below 2**16 use numpy's O(n) radix sort; larger keys sort the unique composite
    key ``key·n + position``, which is faster than a stable sort of 64-bit integers.
    """
    keys = np.asarray(keys)
    if keys.size == 0:
        return np.zeros(0, dtype=np.int64)
    if int(keys.max()) < 2**16:
        return np.argsort(keys.astype(np.uint16), kind="stable")
    n = keys.size
    if int(keys.max()) < np.iinfo(np.int64).max // max(n, 1):
        return np.argsort(keys.astype(np.int64) * n + np.arange(n))
    return np.argsort(keys, kind="stable")


def key_runs(sorted_keys: np.ndarray) -> Iterator[tuple[int, int, int]]:
    """(key, start, stop) of each run of equal values in sorted integer ``sorted_keys``,
    in order; nothing for an empty array."""
    sorted_keys = np.asarray(sorted_keys)
    if not sorted_keys.size:
        return
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    stops = np.r_[starts[1:], sorted_keys.size]
    for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
        yield int(sorted_keys[a]), a, b


def map_transcripts(labels: np.ndarray, spots: pd.DataFrame, out_of_bounds: str = "background"
                    ) -> MappingResult:
    """Assign every spot of ``spots`` (columns x, y, gene) to the cell under it.

    The table keeps the original coordinates, is sorted by cell id (background first)
    and keeps file order within a cell, as upstream.
    """
    if out_of_bounds not in OUT_OF_BOUNDS_POLICIES:
        raise ValueError(f"out_of_bounds must be one of {OUT_OF_BOUNDS_POLICIES}")
    x = spots["x"].to_numpy(np.float64)
    y = spots["y"].to_numpy(np.float64)
    cell_ids, finite, inside = lookup_cell_ids(labels, x, y)
    keep = np.flatnonzero(inside) if out_of_bounds == "drop" else np.arange(len(x))
    order = keep[stable_order(cell_ids[keep])]
    table = pd.DataFrame({
        "cell_id": cell_ids[order],
        "spotX": x[order],
        "spotY": y[order],
        "gene": spots["gene"].take(order).array,
    })
    n_assigned = int(np.count_nonzero(cell_ids))
    return MappingResult(
        table=table,
        n_spots=len(x),
        n_invalid=int((~finite).sum()),
        n_out_of_bounds=int((finite & ~inside).sum()),
        n_background=int(inside.sum()) - n_assigned,
        n_assigned=n_assigned,
    )


def cell_by_gene_counts(labels: np.ndarray | None, cell_ids: np.ndarray, genes: np.ndarray,
                        cells: np.ndarray | None = None) -> pd.DataFrame:
    """Cell-by-gene transcript counts.

    Rows are all cells of ``labels`` (ascending id, index ``cell_id``), including cells
    without transcripts, or the ids ``cells`` when given (e.g. 1..K of an out-of-core
    label image, without reading it); columns are the genes (sorted). Background spots
    (id 0) are not counted.
    """
    if cells is None:
        cells = fastremap.unique(labels)
    cells = np.asarray(cells)
    cells = np.sort(cells[cells != 0].astype(np.int64))
    gene_names, gene_codes = np.unique(np.asarray(genes).astype(str), return_inverse=True)
    assigned = np.asarray(cell_ids) != 0
    rows = np.searchsorted(cells, np.asarray(cell_ids)[assigned])
    flat = rows * len(gene_names) + gene_codes[assigned]
    counts = np.bincount(flat, minlength=len(cells) * len(gene_names))
    matrix = counts.reshape(len(cells), len(gene_names)).astype(np.int64)
    frame = pd.DataFrame(matrix, index=pd.Index(cells, name="cell_id"), columns=gene_names)
    return frame


# Raw label/spot affixes accepted when pairing by sample name: one list, shared with
# preprocessing (GeneSegNet.io.layout).
LABEL_PREFIXES = RAW_LABEL_PREFIXES
LABEL_SUFFIXES = RAW_LABEL_SUFFIXES
SPOT_SUFFIXES = RAW_SPOT_SUFFIXES


def label_spot_pairs(label_dir: str | Path, spot_dir: str | Path
                     ) -> list[tuple[str, dict[str, Path]]]:
    """``[(sample, {"labels": path, "spots": path})]``: label images and spot tables paired
    by sample name (``label_<name>.png`` as written by inference pairs with ``<name>.csv``);
    InputError for no spot tables or an unpaired file."""
    from GeneSegNet.io import (
        LABEL_EXTENSIONS,
        SPOT_EXTENSIONS,
        index_by_sample,
        list_files,
        pair_samples,
    )

    groups = {
        "labels": index_by_sample(list_files(label_dir, LABEL_EXTENSIONS), LABEL_PREFIXES,
                                  LABEL_SUFFIXES, prefer=LABEL_EXTENSIONS),
        "spots": index_by_sample(list_files(spot_dir, SPOT_EXTENSIONS), (), SPOT_SUFFIXES),
    }
    if not groups["spots"]:
        raise InputError("no spot tables found (expected .csv, .csv.gz or .parquet)", spot_dir)
    return pair_samples(groups)


def map_dataset(label_dir: str | Path, spot_dir: str | Path, save_dir: str | Path, *,
                out_of_bounds: str = "background", spot_scale: float = 1.0,
                progress: bool = False) -> list[tuple[Path, MappingResult]]:
    """Map every spot table of ``spot_dir`` onto its label image of ``label_dir``.

    Files are paired by sample name (``label_<name>.png`` as written by the inference
    script pairs with ``<name>.csv``). For each sample writes ``<save_dir>/<name>.csv``
    (cell_id, spotX, spotY, gene) and ``<save_dir>/<name>_cell_by_gene.csv``.
    """
    from tqdm import tqdm

    from GeneSegNet.io import read_label, read_spots

    pairs = label_spot_pairs(label_dir, spot_dir)
    save_dir = Path(save_dir)
    results = []
    for name, paths in tqdm(pairs, desc="samples", disable=not progress):
        labels = read_label(paths["labels"])
        spots = read_spots(paths["spots"], scale=spot_scale, strict=False)
        result = write_mapping(save_dir, name, labels, spots, out_of_bounds, source=paths["spots"])
        results.append((save_dir / f"{name}.csv", result))
    return results


def write_mapping(folder: str | Path, name: str, labels: np.ndarray, spots: pd.DataFrame,
                  out_of_bounds: str = "background", source: str | Path | None = None
                  ) -> MappingResult:
    """Map ``spots`` onto ``labels`` and write ``<folder>/<name>.csv`` (cell_id, spotX,
    spotY, gene) and ``<folder>/<name>_cell_by_gene.csv``, each atomically.

    Spots outside the image or with invalid coordinates are reported as a warning that
    names ``source`` (the spot file) when given.
    """
    from GeneSegNet.io import atomic_path

    folder = Path(folder)
    result = map_transcripts(labels, spots, out_of_bounds)
    if result.n_invalid or result.n_out_of_bounds:
        logger.warning("%s: %d spot(s) outside the image and %d with invalid coordinates were "
                       "%s", source or name, result.n_out_of_bounds, result.n_invalid,
                       "dropped" if out_of_bounds == "drop" else "given cell id 0")
    out = folder / f"{name}.csv"
    with atomic_path(out) as tmp:
        result.table.to_csv(tmp, index=False, float_format="%.10g")
    counts = cell_by_gene_counts(labels, result.table["cell_id"].to_numpy(),
                                 result.table["gene"].to_numpy())
    with atomic_path(folder / f"{name}_cell_by_gene.csv") as tmp:
        counts.to_csv(tmp)
    logger.info("%s: %s -> %s", name, result.summary(), out)
    return result
