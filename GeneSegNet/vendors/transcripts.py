"""Transcript tables of the vendor importers: control-probe categories, streamed reading
(by Parquet row group or CSV block, prefetched in a thread) and the sink that splits each
batch into spots and controls and writes both as Parquet.

Coordinates: x = column, y = row, in image pixels; a point at (x, y) px lies in pixel
(floor(y), floor(x)) (the rule of :func:`GeneSegNet.io.spots.spot_pixels`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from GeneSegNet.errors import InputError

logger = logging.getLogger(__name__)

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

def control_category(gene: str) -> str:
    """The control category of a gene name (a key of CONTROL_PATTERNS), or "" for a gene."""
    for name, regex in _CONTROL_RES.items():
        if regex.match(gene):
            return name
    return ""



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
