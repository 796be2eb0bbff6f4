"""Shared machinery of the vendor importers: control probes, affines, staged outputs,
streamed transcript tables and tile-by-tile image copies.

Coordinates: x = column, y = row. Image pixel (row, col) covers [row, row + 1) x
[col, col + 1) px; a point at (x, y) px lies in pixel (floor(y), floor(x)) (the rule of
:func:`GeneSegNet.io.spots.spot_pixels`). An affine ``um_to_px`` is a 2x3 matrix ``A``
with ``[x_px, y_px] = A @ [x_um, y_um, 1]``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import tifffile

from GeneSegNet.errors import InputError
from GeneSegNet.io.atomic import temp_file
from GeneSegNet.io.metadata import METADATA_DIR, SampleMetadata, check_pixel_size
from GeneSegNet.io.records import json_ready

logger = logging.getLogger(__name__)

CONTROLS_DIR = "controls"
NUCLEI_DIR = "nuclei"  # id tables of vendor nuclei (label id -> vendor cell id)
IMAGE_TILE = 512  # px, tile edge of the written BigTIFF

# category name -> regular expression on the gene name (matched at the start)
CONTROL_PATTERNS: dict[str, str] = {
    "NegControlProbe": r"NegControlProbe_",
    "NegControlCodeword": r"NegControlCodeword_",
    "UnassignedCodeword": r"UnassignedCodeword_",
    "DeprecatedCodeword": r"DeprecatedCodeword_",
    "BLANK": r"BLANK_",
    "Blank": r"Blank-",
    "NegPrb": r"NegPrb",
    "FalseCode": r"FalseCode",
    "SystemControl": r"SystemControl",
    "antisense": r"antisense_",
}
_CONTROL_RES = {name: re.compile(p) for name, p in CONTROL_PATTERNS.items()}

Affine = np.ndarray  # (2, 3) float64, µm -> px


def control_category(gene: str) -> str:
    """The control category of a gene name (a key of CONTROL_PATTERNS), or "" for a gene."""
    for name, regex in _CONTROL_RES.items():
        if regex.match(gene):
            return name
    return ""


def check_affine(affine: Any, where: str) -> Affine:
    """``affine`` as a finite, invertible (2, 3) float64 array; else InputError."""
    try:
        a = np.asarray(affine, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where}: µm -> px transform is not numeric") from exc
    if a.shape == (3, 3):
        if not np.allclose(a[2], (0, 0, 1)):
            raise InputError(f"{where}: last row of the 3x3 transform must be 0 0 1, got {a[2]}")
        a = a[:2]
    if a.shape != (2, 3):
        raise InputError(f"{where}: expected a 2x3 or 3x3 transform, got shape {a.shape}")
    det = float(np.linalg.det(a[:, :2]))
    if not np.all(np.isfinite(a)) or not math.isfinite(det) or abs(det) < 1e-12:
        raise InputError(f"{where}: transform is not finite and invertible: {a.tolist()}")
    return a


def pixel_size_of(affine: Affine) -> float:
    """Edge of one pixel in µm implied by a µm -> px affine (geometric mean of the axes)."""
    return 1.0 / math.sqrt(abs(float(np.linalg.det(affine[:, :2]))))


def scale_affine(pixel_size_x: float, pixel_size_y: float | None = None,
                 origin_um: tuple[float, float] = (0.0, 0.0)) -> Affine:
    """µm -> px affine for an image whose pixel (0, 0) corner sits at ``origin_um``."""
    psy = pixel_size_x if pixel_size_y is None else pixel_size_y
    return np.array([[1 / pixel_size_x, 0, -origin_um[0] / pixel_size_x],
                     [0, 1 / psy, -origin_um[1] / psy]], dtype=np.float64)


def apply_affine(affine: Affine, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x_px, y_px) = affine @ (x_um, y_um, 1); (N,) float64 arrays."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return _affine_row(affine[0], x, y), _affine_row(affine[1], x, y)


def _affine_row(row: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``row[0] x + row[1] y + row[2]`` (float64, (N,)), skipping a zero x or y term.

    Equal to the full sum: a zero term adds exactly 0.0 (a non-finite x or y, whose zero
    term would be NaN, makes the other coordinate NaN, and such rows are dropped)."""
    a, b, c = (float(v) for v in row)
    if b == 0.0:
        out = np.multiply(x, a)
    elif a == 0.0:
        out = np.multiply(y, b)
    else:
        out = np.multiply(x, a)
        out += b * y
    out += c
    return out


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a non-empty file; else InputError naming it and ``what`` it is."""
    if not path.is_file():
        raise InputError(f"required {what} not found", path)
    if path.stat().st_size == 0:
        raise InputError(f"{what} is empty", path)
    return path


# ---------------------------------------------------------------- staged outputs
class Staging:
    """Outputs written under temporary names and renamed together by :meth:`commit`.

    ``path(final)`` returns a temporary path beside ``final`` (same suffix). If the work
    fails, :meth:`discard` deletes every temporary file, so no output is half-written.
    """

    def __init__(self, overwrite: bool = False) -> None:
        self.overwrite = overwrite
        self._pending: list[tuple[Path, Path]] = []

    def path(self, final: str | Path) -> Path:
        final = Path(final)
        if final.exists() and not self.overwrite:
            raise InputError("output already exists (use --overwrite to replace it)", final)
        tmp = temp_file(final)
        self._pending.append((tmp, final))
        return tmp

    def commit(self) -> list[Path]:
        done = []
        for tmp, final in self._pending:
            os.replace(tmp, final)
            done.append(final)
        self._pending = []
        return done

    def discard(self) -> None:
        for tmp, _ in self._pending:
            tmp.unlink(missing_ok=True)
        self._pending = []

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


# ---------------------------------------------------------------- transcripts
GENE_TYPE = pa.dictionary(pa.int32(), pa.string())


@dataclass
class TranscriptCounts:
    """What happened to the transcripts of one import (all counts are transcripts)."""

    read: int = 0
    low_qv: int = 0
    invalid: int = 0  # non-finite coordinates
    outside: int = 0  # genes mapped outside the image (dropped)
    controls: dict[str, int] = field(default_factory=dict)
    controls_outside: int = 0
    spots: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"read": self.read, "dropped_low_qv": self.low_qv,
                "dropped_invalid": self.invalid, "dropped_outside_image": self.outside,
                "controls": dict(sorted(self.controls.items())),
                "controls_total": int(sum(self.controls.values())),
                "controls_outside_image": self.controls_outside, "spots": self.spots}


class TranscriptSink:
    """Streams transcript batches into ``spots`` and ``controls`` Parquet files.

    Each batch given to :meth:`add` is an Arrow table with ``x``, ``y`` (float64, image
    px), ``gene`` (string or dictionary) and any extra columns to keep; an optional
    ``qv`` column is filtered with ``min_qv``. Control probes (CONTROL_PATTERNS) go to
    the controls file with a ``category`` column; genes inside the image go to the spots
    file. Genes outside the image are counted and dropped; if more than
    ``max_outside_fraction`` of them are outside, :meth:`close` raises InputError (the
    transform does not fit the image).
    """

    def __init__(self, spots_path: Path, controls_path: Path, shape: tuple[int, int],
                 source: Path, min_qv: float | None = None,
                 max_outside_fraction: float = 0.05) -> None:
        self.spots_path, self.controls_path = spots_path, controls_path
        self.height, self.width = int(shape[0]), int(shape[1])
        self.source = source
        self.min_qv = min_qv
        self.max_outside = max_outside_fraction
        self.counts = TranscriptCounts()
        self._spots: pq.ParquetWriter | None = None
        self._controls: pq.ParquetWriter | None = None
        self._category_cache: dict[str, str] = {}
        # Parquet encoding runs in one background thread (pyarrow releases the GIL), so
        # that writing batch k overlaps reading batch k + 1; one batch in flight at most
        from concurrent.futures import Future, ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending: Future | None = None

    def _categories(self, dictionary: pa.Array) -> np.ndarray:
        """Control category (or "") of each entry of a gene dictionary: (D,) object."""
        out = np.empty(len(dictionary), dtype=object)
        for i, gene in enumerate(dictionary.to_pylist()):
            cat = self._category_cache.get(gene)
            if cat is None:
                cat = self._category_cache[gene] = control_category(str(gene))
            out[i] = cat
        return out

    def add(self, batch: pa.Table) -> None:
        """Split one batch into spots and controls, count the drops, queue the writes.

        Per-row work is vectorised: boolean masks over (N,) numpy views of the Arrow
        columns (zero-copy where the column has no nulls), control status looked up once
        per gene dictionary entry and gathered by the dictionary codes."""
        n = batch.num_rows
        if n == 0:
            return
        self.counts.read += n
        gene = batch.column("gene")
        if not pa.types.is_dictionary(gene.type):
            gene = pc.dictionary_encode(gene.cast(pa.string()))
        gene = gene.combine_chunks() if isinstance(gene, pa.ChunkedArray) else gene
        if gene.type != GENE_TYPE:
            gene = gene.cast(GENE_TYPE)
        batch = batch.set_column(batch.schema.get_field_index("gene"), "gene", gene)
        x, y = _numpy_column(batch, "x"), _numpy_column(batch, "y")
        # NaN compares False, so a non-finite coordinate is never "inside"
        inside = x >= 0
        inside &= x < self.width
        inside &= y >= 0
        inside &= y < self.height
        keep = None
        if self.min_qv is not None and "qv" in batch.column_names:
            keep = _numpy_column(batch, "qv") >= self.min_qv
            self.counts.low_qv += n - int(np.count_nonzero(keep))
        outside = ~inside if keep is None else keep & ~inside
        out_rows = np.flatnonzero(outside)
        if len(out_rows):
            bad = ~(np.isfinite(x[out_rows]) & np.isfinite(y[out_rows]))
            self.counts.invalid += int(np.count_nonzero(bad))
            if keep is None:
                keep = np.ones(n, dtype=bool)
            keep[out_rows[bad]] = False
            outside[out_rows[bad]] = False
        cats = self._categories(gene.dictionary)
        is_control_entry = cats != ""
        table = None
        if is_control_entry.any():
            codes = gene.indices.to_numpy(zero_copy_only=False)
            is_control = is_control_entry[codes]
            ctrl = is_control if keep is None else keep & is_control
            ctrl_rows = np.flatnonzero(ctrl)
            if len(ctrl_rows):
                ctrl_codes = codes[ctrl_rows]
                per_entry = np.bincount(ctrl_codes, minlength=len(cats))
                for i in np.flatnonzero(per_entry):
                    self.counts.controls[cats[i]] = self.counts.controls.get(cats[i], 0) + int(
                        per_entry[i])
                self.counts.controls_outside += int(np.count_nonzero(outside[ctrl_rows]))
                table = batch.take(pa.array(ctrl_rows))
                category = pa.array(cats.astype(str)).take(pa.array(ctrl_codes))
                table = table.append_column("category", category.dictionary_encode())
            genes = ~is_control if keep is None else keep & ~is_control
        else:
            genes = np.ones(n, dtype=bool) if keep is None else keep
        self.counts.outside += int(np.count_nonzero(genes & outside))
        genes &= inside
        n_genes = int(np.count_nonzero(genes))
        self.counts.spots += n_genes
        spots = batch if n_genes == n else batch.filter(pa.array(genes))
        self._wait()
        self._pending = self._pool.submit(self._write_both, spots, table)

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def _write_both(self, spots: pa.Table, controls: pa.Table | None) -> None:
        if controls is not None:
            self._controls = self._write(self._controls, self.controls_path, controls)
        self._spots = self._write(self._spots, self.spots_path, spots)

    @staticmethod
    def _write(writer: pq.ParquetWriter | None, path: Path, table: pa.Table
               ) -> pq.ParquetWriter:
        if writer is None:
            # dictionary pages only for dictionary columns (genes, ids): trying them on
            # random floats costs more than the rest of the import
            # and no min/max statistics for them either (Arrow computes those on the decoded
            # strings: a third of the write time, and no reader here filters on genes)
            text = [f.name for f in table.schema if pa.types.is_dictionary(f.type)]
            numeric = [f.name for f in table.schema if f.name not in text]
            writer = pq.ParquetWriter(path, table.schema, compression="lz4",
                                      use_dictionary=text, write_statistics=numeric)
        elif table.schema != writer.schema:
            table = table.cast(writer.schema)
        writer.write_table(table)
        return writer

    def check_fit(self) -> None:
        """InputError if too many genes fall outside the image (a wrong transform)."""
        genes = self.counts.read - self.counts.low_qv - self.counts.invalid - sum(
            self.counts.controls.values())
        if genes > 0 and self.counts.outside > self.max_outside * genes:
            raise InputError(
                f"the µm -> px transform maps {self.counts.outside} of {genes} transcripts "
                f"outside the {self.width} x {self.height} px image "
                f"(more than {self.max_outside:.0%}): wrong transform, image or level?",
                self.source)

    def close(self, schema: pa.Schema | None = None) -> TranscriptCounts:
        """Finish both files (empty ones get ``schema``) and check the transform's fit."""
        try:
            self._wait()
        finally:
            self._pool.shutdown(wait=True)
        for attr, path in (("_spots", self.spots_path), ("_controls", self.controls_path)):
            writer = getattr(self, attr)
            if writer is None:
                empty = schema if schema is not None else pa.schema(
                    [("x", pa.float64()), ("y", pa.float64()), ("gene", GENE_TYPE)])
                if attr == "_controls" and "category" not in empty.names:
                    empty = empty.append(pa.field("category", GENE_TYPE))
                pq.write_table(empty.empty_table(), path)
            else:
                writer.close()
        self.check_fit()
        if self.counts.read == 0:
            raise InputError("no transcripts found", self.source)
        return self.counts


# ---------------------------------------------------------------- images
RowReader = Callable[[int, int], np.ndarray]  # (row0, row1) -> (row1 - row0, W) array


def zarr_row_reader(store_array: Any, axes: str, select: dict[str, int]) -> RowReader:
    """Row-strip reader over a zarr array (tifffile ``aszarr``) with ``axes`` such as
    "CYX" or "ZYX": axes other than Y and X take the index in ``select`` (default 0)."""
    def read(r0: int, r1: int) -> np.ndarray:
        index = tuple(slice(r0, r1) if a == "Y" else slice(None) if a == "X"
                      else select.get(a, 0) for a in axes)
        return np.asarray(store_array[index])
    return read


def open_tiff_level(path: Path, level: int = 0, select: dict[str, int] | None = None
                    ) -> tuple[RowReader, tuple[int, int], np.dtype, tifffile.TiffFile]:
    """Open series 0 of a TIFF at pyramid ``level`` as a lazy row-strip reader.

    Returns (reader, (H, W), dtype, open TiffFile: close it when done). ``select`` gives
    the index of each non-spatial axis (e.g. ``{"C": 0}`` = first channel); an index out
    of range raises InputError.
    """
    import zarr

    select = dict(select or {})
    try:
        tif = tifffile.TiffFile(path)
    except (OSError, tifffile.TiffFileError) as exc:
        raise InputError(f"cannot read TIFF ({exc})", path) from exc
    try:
        if not tif.series:
            raise InputError("TIFF contains no image", path)
        series = tif.series[0]
        levels = series.levels or [series]
        if not 0 <= level < len(levels):
            raise InputError(f"pyramid level {level} requested; the file has levels "
                             f"0..{len(levels) - 1}", path)
        lev = levels[level]
        axes = lev.axes
        if "Y" not in axes or "X" not in axes:
            raise InputError(f"image axes {axes!r} have no Y and X", path)
        for ax, size in zip(axes, lev.shape, strict=True):
            if ax in select and not -size <= select[ax] < size:
                raise InputError(f"{ax} index {select[ax]} out of range (size {size})", path)
        array = zarr.open(series.aszarr(level=level), mode="r")
        shape = (lev.shape[axes.index("Y")], lev.shape[axes.index("X")])
        return zarr_row_reader(array, axes, select), shape, np.dtype(lev.dtype), tif
    except BaseException:
        tif.close()
        raise


def ome_pixel_size(tif: tifffile.TiffFile) -> tuple[float | None, float | None]:
    """(PhysicalSizeX, PhysicalSizeY) in µm of an OME-TIFF's first image, or None each."""
    xml = tif.ome_metadata or ""
    out = []
    for key in ("PhysicalSizeX", "PhysicalSizeY"):
        m = re.search(rf'{key}="([^"]+)"', xml)
        unit = re.search(rf'{key}Unit="([^"]+)"', xml)
        value = float(m.group(1)) if m else None
        if value is not None and unit and unit.group(1) in ("nm",):
            value /= 1000.0
        out.append(value)
    return out[0], out[1]


def row_tiles(read_rows: RowReader, shape: tuple[int, int], dtype: np.dtype,
              tile: int = IMAGE_TILE) -> Iterator[np.ndarray]:
    """``tile`` x ``tile`` tiles (row-major, edge tiles zero-padded) of an (H, W) image read
    one strip of ``tile`` rows at a time (memory: one strip)."""
    from tqdm import tqdm

    height, width = int(shape[0]), int(shape[1])
    padded_w = -(-width // tile) * tile
    for r0 in tqdm(range(0, height, tile), desc="image", unit="strip", leave=False):
        r1 = min(r0 + tile, height)
        strip = np.zeros((tile, padded_w), dtype=dtype)
        strip[: r1 - r0, :width] = read_rows(r0, r1)
        for c0 in range(0, padded_w, tile):
            yield strip[:, c0:c0 + tile]


# ---------------------------------------------------------------- metadata
def write_sample_metadata(path: Path, meta: SampleMetadata, extra: dict[str, Any]) -> None:
    """Write the SampleMetadata JSON plus ``extra`` keys (counts, import details)."""
    check_pixel_size(meta.pixel_size_um, str(path))
    data = meta.to_dict() | json_ready(extra)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def metadata_dir(base: Path) -> Path:
    return base / METADATA_DIR


# ---------------------------------------------------------------- table streaming
BATCH_ROWS = 1 << 20


def table_columns(path: Path) -> list[str]:
    """Column names of a Parquet or CSV(.gz) table (header only)."""
    try:
        if path.suffix in (".parquet", ".pq"):
            return list(pq.read_schema(path).names)
        import pyarrow.csv as pcsv

        with pa.input_stream(str(path), compression="detect") as stream:
            reader = pcsv.open_csv(stream, read_options=pcsv.ReadOptions(block_size=1 << 16))
            return list(reader.schema.names)
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"cannot read table header ({exc})", path) from exc


def require_columns(path: Path, needed: list[str]) -> list[str]:
    """The table's columns; InputError naming the missing ones."""
    columns = table_columns(path)
    missing = [c for c in needed if c not in columns]
    if missing:
        raise InputError(f"missing column(s) {missing} (found {columns})", path)
    return columns


def iter_table(path: Path, columns: list[str], dictionary: list[str] = (),
               batch_rows: int = BATCH_ROWS) -> Iterator[pa.Table]:
    """Stream ``columns`` of a Parquet (by row group / batch) or CSV(.gz) (by block) table.

    ``dictionary`` columns are read dictionary-encoded (genes: one string per gene, not
    per transcript). Memory: one batch (it stays flat over the whole table).
    """
    try:
        if path.suffix in (".parquet", ".pq"):
            # pre_buffer off: with it, Arrow keeps every row group's bytes read so far
            # until the iteration ends (+20 MB per 1 M Xenium rows: 2 GB at 10^8)
            pf = pq.ParquetFile(path, read_dictionary=list(dictionary), pre_buffer=False)
            for rb in pf.iter_batches(batch_size=batch_rows, columns=columns):
                yield pa.Table.from_batches([rb])
            return
        import pyarrow.csv as pcsv

        convert = pcsv.ConvertOptions(
            include_columns=columns,
            column_types={c: pa.dictionary(pa.int32(), pa.string()) for c in dictionary})
        with pa.input_stream(str(path), compression="detect") as stream:
            reader = pcsv.open_csv(stream, convert_options=convert,
                                   read_options=pcsv.ReadOptions(block_size=64 << 20))
            for rb in reader:
                yield pa.Table.from_batches([rb])
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"cannot read transcripts ({exc})", path) from exc


def prefetched(items: Iterable[Any], depth: int = 1) -> Iterator[Any]:
    """Yield ``items``, producing up to ``depth`` of them ahead in a background thread.

    Decoding the next transcript batch (Parquet / CSV decoding releases the GIL) then
    overlaps the work on the current one. An exception of the producer is raised here;
    closing this generator early stops the producer."""
    import queue
    import threading

    box: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        box.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            box.put((done, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            box.put((done, exc))

    worker = threading.Thread(target=produce, name="prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, exc = box.get()
            if item is done:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        while worker.is_alive():
            try:
                box.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.1)


def as_float(table: pa.Table, name: str) -> np.ndarray:
    """Column ``name`` as a (N,) float64 array (nulls -> NaN)."""
    col = table.column(name)
    if col.null_count == 0 and pa.types.is_floating(col.type):
        return _numpy_column(table, name).astype(np.float64, copy=False)
    return pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False)


def _numpy_column(table: pa.Table, name: str) -> np.ndarray:
    """Column ``name`` as a (N,) numpy array, zero-copy when it is one chunk without nulls
    (nulls of a numeric column -> NaN)."""
    col = table.column(name)
    if col.num_chunks == 1 and col.null_count == 0:
        return col.chunk(0).to_numpy(zero_copy_only=False)
    return col.to_numpy()
