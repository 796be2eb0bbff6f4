"""Spot tables read in batches and spilled to flat binary files (out-of-core runs).

:func:`iter_spot_batches` reads a ``.csv``/``.csv.gz``/``.parquet`` spot table as
:func:`GeneSegNet.io.spots.read_spots` does with ``strict=False`` (same column detection,
scale, non-numeric or non-finite coordinates kept as NaN), ``batch_rows`` rows at a time.
Genes are int32 codes into a growing :class:`GeneVocabulary` (each distinct name held
once), never N Python strings.

:func:`spill_spots` writes the batches to a folder of plain little-endian files, one value
per spot in file order: ``x.f8``, ``y.f8`` (float64 px), ``gene.i4`` (int32 codes), with
``vocabulary.json`` and ``meta.json`` (the spot file's identity: path, size, mtime, scale).
The folder is built under a temporary name and renamed; an existing one is reused only
when its identity matches. :class:`SpotSpill` reads it back in batches with
``np.fromfile(offset=...)`` (no memory map, so nothing of it stays resident).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from GeneSegNet.errors import InputError
from GeneSegNet.io.atomic import staged_directory
from GeneSegNet.io.spots import spot_columns

logger = logging.getLogger(__name__)

SPILL_FORMAT = 1
BATCH_ROWS = 1_000_000
_FILES = {"x": ("x.f8", np.dtype("<f8")), "y": ("y.f8", np.dtype("<f8")),
          "gene": ("gene.i4", np.dtype("<i4"))}


class GeneVocabulary:
    """Gene names in order of first appearance; ``code(name)`` = its position."""

    def __init__(self, names: list[str] | None = None) -> None:
        self.names: list[str] = []
        self._code: dict[str, int] = {}
        for name in names or []:
            self._add(name)

    def _add(self, name: str) -> int:
        code = self._code.get(name)
        if code is None:
            code = self._code[name] = len(self.names)
            self.names.append(name)
        return code

    def encode(self, names) -> np.ndarray:
        """int32 [k] codes of the (few, distinct) ``names``, adding new ones."""
        return np.fromiter((self._add(str(n)) for n in names), np.int32, count=len(names))

    def __len__(self) -> int:
        return len(self.names)

    def as_array(self) -> np.ndarray:
        """object [G] names, for ``as_array()[codes]``."""
        out = np.empty(len(self.names), dtype=object)
        out[:] = self.names
        return out


@dataclass
class SpotBatch:
    """x, y : float64 [n] px (NaN: invalid); gene : int32 [n] codes into the vocabulary."""

    x: np.ndarray
    y: np.ndarray
    gene: np.ndarray


def _numbers(values) -> np.ndarray:
    return pd.to_numeric(values, errors="coerce").to_numpy(np.float64)


def _csv_batches(path: Path, x_col: str, y_col: str, gene_col: str | None,
                 batch_rows: int, vocab: GeneVocabulary) -> Iterator[SpotBatch]:
    use = [x_col, y_col] + ([gene_col] if gene_col else [])
    reader = pd.read_csv(path, usecols=use, dtype=dict.fromkeys(use, str),
                         keep_default_na=False, chunksize=batch_rows)
    with reader:
        for chunk in reader:
            if gene_col:
                local, uniques = pd.factorize(chunk[gene_col].astype(str), use_na_sentinel=False)
                gene = vocab.encode(uniques)[local]
            else:
                gene = np.full(len(chunk), vocab.encode(["NA"])[0], np.int32)
            yield SpotBatch(_numbers(chunk[x_col]), _numbers(chunk[y_col]), gene)


def _parquet_genes(column, vocab: GeneVocabulary, null_name: str) -> np.ndarray:
    """int32 codes of a pyarrow gene column, names converted as pandas' ``astype(str)``
    (``null_name``: that of a missing value in the file's column type)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    encoded = column if pa.types.is_dictionary(column.type) else pc.dictionary_encode(column)
    names = encoded.dictionary.to_pandas().astype(str)
    table = vocab.encode(names.to_numpy())
    indices = encoded.indices
    codes = table[indices.fill_null(0).to_numpy(zero_copy_only=False)] if len(table) else \
        np.zeros(len(indices), np.int32)
    if indices.null_count:
        codes[indices.is_null().to_numpy(zero_copy_only=False)] = vocab.encode([null_name])[0]
    return codes.astype(np.int32, copy=False)


def _parquet_batches(path: Path, x_col: str, y_col: str, gene_col: str | None,
                     batch_rows: int, vocab: GeneVocabulary) -> Iterator[SpotBatch]:
    import pyarrow.parquet as pq

    use = [x_col, y_col] + ([gene_col] if gene_col else [])
    import pyarrow as pa

    kind = pq.read_schema(path).field(gene_col).type if gene_col else None
    as_dict = kind is not None and (pa.types.is_string(kind) or pa.types.is_large_string(kind))
    handle = pq.ParquetFile(path, read_dictionary=[gene_col] if as_dict else None)
    null_name = pa.array([None], type=kind).to_pandas().astype(str).iloc[0] if gene_col else ""
    # one reader per row group: a single iter_batches over the file keeps what it has read
    # allocated (RSS grew with the file in pyarrow 26)
    for group in range(handle.metadata.num_row_groups):
        for batch in handle.iter_batches(batch_size=batch_rows, row_groups=[group],
                                         columns=use):
            if gene_col:
                gene = _parquet_genes(batch.column(gene_col), vocab, null_name)
            else:
                gene = np.full(batch.num_rows, vocab.encode(["NA"])[0], np.int32)
            yield SpotBatch(_numbers(batch.column(x_col).to_pandas()),
                            _numbers(batch.column(y_col).to_pandas()), gene)


def iter_spot_batches(path: str | Path, scale: float = 1.0, batch_rows: int = BATCH_ROWS,
                      vocabulary: GeneVocabulary | None = None) -> Iterator[SpotBatch]:
    """The spots of ``path`` in file order, ``batch_rows`` at a time (module docstring).

    x, y are multiplied by ``scale`` (px per stored unit); codes refer to ``vocabulary``
    (filled as names appear; pass one to read them). InputError names the file when it
    is missing, empty, has no x/y columns or cannot be read.
    """
    path, is_parquet, (x_col, y_col, gene_col, layout) = spot_columns(path)
    vocab = GeneVocabulary() if vocabulary is None else vocabulary
    reader = _parquet_batches if is_parquet else _csv_batches
    logger.debug("%s: streaming spots, layout %s", path, layout)
    batches = reader(path, x_col, y_col, gene_col, max(1, int(batch_rows)), vocab)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - pandas/pyarrow raise many types
            raise InputError(f"cannot read spot table ({exc})", path) from exc
        yield SpotBatch(batch.x * scale, batch.y * scale, batch.gene)


class SpotSpill:
    """A spilled spot table (module docstring): ``n`` spots, ``vocabulary``, and
    :meth:`batches` in file order."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.n = int(self.meta["n"])
        names = json.loads((self.folder / "vocabulary.json").read_text())
        self.vocabulary = GeneVocabulary(names)

    def __len__(self) -> int:
        return self.n

    def read(self, start: int, stop: int) -> SpotBatch:
        """Spots ``start:stop`` (file order)."""
        start, stop = max(0, int(start)), min(self.n, int(stop))
        count = max(0, stop - start)
        parts = {key: np.fromfile(self.folder / name, dtype=dtype, count=count,
                                  offset=start * dtype.itemsize)
                 for key, (name, dtype) in _FILES.items()}
        return SpotBatch(parts["x"], parts["y"], parts["gene"])

    def batches(self, batch_rows: int = BATCH_ROWS) -> Iterator[SpotBatch]:
        for start in range(0, self.n, max(1, int(batch_rows))):
            yield self.read(start, start + batch_rows)


class FrameSpots:
    """An in-memory spot table (columns x, y, gene) with :class:`SpotSpill`'s interface."""

    def __init__(self, table: pd.DataFrame) -> None:
        self.table = table
        codes, uniques = pd.factorize(table["gene"], use_na_sentinel=False)
        self.vocabulary = GeneVocabulary()
        self._codes = self.vocabulary.encode(uniques)[codes] if len(uniques) else \
            np.zeros(len(table), np.int32)
        self.n = len(table)

    def __len__(self) -> int:
        return self.n

    def batches(self, batch_rows: int = BATCH_ROWS) -> Iterator[SpotBatch]:
        x = self.table["x"].to_numpy(np.float64)
        y = self.table["y"].to_numpy(np.float64)
        for start in range(0, self.n, max(1, int(batch_rows))):
            part = slice(start, start + batch_rows)
            yield SpotBatch(x[part], y[part], self._codes[part])


def spot_file_identity(path: str | Path, scale: float) -> dict:
    """What a spill was made from: resolved path, size, mtime (ns), scale, format."""
    path = Path(path)
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
            "scale": float(scale), "format": SPILL_FORMAT}


def spill_spots(path: str | Path, folder: str | Path, scale: float = 1.0,
                batch_rows: int = BATCH_ROWS) -> SpotSpill:
    """Spill the spot table ``path`` into ``folder`` (module docstring) and open it.
    An existing spill of the same file identity and scale is reused."""
    folder = Path(folder)
    if not Path(path).is_file():
        raise InputError("spot file not found", path)
    identity = spot_file_identity(path, scale)
    try:
        spill = SpotSpill(folder)
        if spill.meta.get("identity") == identity:
            logger.info("%s: reusing the spilled spots in %s", path, folder)
            return spill
    except (OSError, ValueError, KeyError):
        pass
    vocab = GeneVocabulary()
    n = 0
    with staged_directory(folder, overwrite=True) as stage:
        handles = {key: open(stage / name, "wb") for key, (name, _) in _FILES.items()}
        try:
            for batch in iter_spot_batches(path, scale, batch_rows, vocab):
                for key, (_, dtype) in _FILES.items():
                    getattr(batch, key).astype(dtype, copy=False).tofile(handles[key])
                n += len(batch.x)
        finally:
            for handle in handles.values():
                handle.close()
        (stage / "vocabulary.json").write_text(json.dumps(vocab.names))
        (stage / "meta.json").write_text(json.dumps({"n": n, "identity": identity}))
    logger.info("%s: %d spots, %d genes spilled to %s", path, n, len(vocab), folder)
    return SpotSpill(folder)
