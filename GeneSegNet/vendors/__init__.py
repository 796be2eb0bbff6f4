"""Importers from vendors' output folders ("bundles") to the raw layout.

``import_bundle`` writes, for one sample::

    <base>/images/<sample>.tif           DAPI, tiled BigTIFF, written tile by tile
    <base>/spots/<sample>.parquet        x, y (image px, x = column), gene, vendor columns
    <base>/controls/<sample>.parquet     control / blank probes (+ category), same columns
    <base>/metadata/<sample>.json        SampleMetadata + transcript counts + import details
    <base>/labels/<sample>.tif           optional: vendor nuclei on the image grid
    <base>/nuclei/<sample>_ids.csv       optional: label id -> vendor cell id

Platforms: :mod:`.xenium`, :mod:`.merscope`, :mod:`.cosmx`, :mod:`.generic`. Each has
``open_bundle(...) -> Bundle``; :func:`import_bundle` does the writing.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from GeneSegNet.io.images import write_tiled_tiff
from GeneSegNet.io.metadata import SampleMetadata, metadata_path
from GeneSegNet.vendors.common import (
    CONTROLS_DIR,
    IMAGE_TILE,
    NUCLEI_DIR,
    Affine,
    RowReader,
    Staging,
    pixel_size_of,
    row_tiles,
    write_sample_metadata,
)
from GeneSegNet.vendors.transcripts import (
    TranscriptCounts,
    TranscriptSink,
    prefetched,
)

logger = logging.getLogger(__name__)

PLATFORMS = ("xenium", "merscope", "cosmx", "generic")


@dataclass
class Bundle:
    """A vendor bundle opened lazily: how to read its image, transcripts and nuclei.

    image_reader : (row0, row1) -> (row1 - row0, W) strip of the DAPI image.
    image_shape : (H, W) px of the imported image.
    affine : (2, 3) µm -> image px.
    batches : yields Arrow tables with x, y (float64 image px), gene, optional qv, extras.
    nuclei : (shape) -> (uint32 labels (H, W), vendor ids), or None when the bundle has none.
    polygons : () -> the nuclei as a PolygonSet in image px (drawn strip by strip on large
        images), or None when the bundle's nuclei are not polygons.
    """

    platform: str
    image_reader: RowReader
    image_shape: tuple[int, int]
    image_dtype: np.dtype
    affine: Affine
    pixel_size_um: float
    pixel_size_source: str
    transcripts_path: Path
    batches: Callable[[], Iterator[pa.Table]]
    min_qv: float | None = None
    details: dict[str, Any] = field(default_factory=dict)
    nuclei: Callable[[tuple[int, int]], tuple[np.ndarray, list[Any]]] | None = None
    polygons: Callable[[], Any] | None = None
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for fn in self.closers:
            fn()
        self.closers = []


def open_bundle(platform: str, **options: Any) -> Bundle:
    """Open a bundle of ``platform`` (see ``open_<platform>`` in each module for options)."""
    from GeneSegNet.vendors import cosmx, generic, merscope, xenium

    openers = {"xenium": xenium.open_xenium, "merscope": merscope.open_merscope,
               "cosmx": cosmx.open_cosmx, "generic": generic.open_generic}
    return openers[platform](**options)


@dataclass
class ImportResult:
    outputs: list[Path]
    counts: TranscriptCounts
    metadata: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per phase


def import_bundle(bundle: Bundle, base_dir: str | Path, sample: str, *,
                  with_labels: bool = False, expand_um: float = 0.0,
                  overwrite: bool = False, max_outside_fraction: float = 0.05,
                  compression: str | None = "zlib", tiled_labels: bool | None = None
                  ) -> ImportResult:
    """Write ``bundle`` into the raw layout under ``base_dir`` as ``sample``.

    Every output is written under a temporary name and renamed only when all succeeded.
    Transcripts first (the transform's fit to the image is checked, InputError if more
    than ``max_outside_fraction`` of the genes fall outside), then the image strip by
    strip, then the optional labels (strip by strip on large images, ``tiled_labels``
    None = by size; see :mod:`.tiled_labels`) and the metadata.
    """
    base = Path(base_dir)
    staging = Staging(overwrite=overwrite)
    try:
        spots_tmp = staging.path(base / "spots" / f"{sample}.parquet")
        controls_tmp = staging.path(base / CONTROLS_DIR / f"{sample}.parquet")
        image_tmp = staging.path(base / "images" / f"{sample}.tif")
        meta_tmp = staging.path(metadata_path(base, sample))
        labels_tmp = ids_tmp = None
        if with_labels:
            if bundle.nuclei is None:
                from GeneSegNet.errors import InputError

                raise InputError(f"the {bundle.platform} bundle has no vendor nuclei; use "
                                 "preprocess/make_starting_labels.py --segment")
            labels_tmp = staging.path(base / "labels" / f"{sample}.tif")
            ids_tmp = staging.path(base / NUCLEI_DIR / f"{sample}_ids.csv")
        sink = TranscriptSink(spots_tmp, controls_tmp, bundle.image_shape,
                              bundle.transcripts_path, min_qv=bundle.min_qv,
                              max_outside_fraction=max_outside_fraction)
        clock = time.perf_counter()
        seconds: dict[str, float] = {}
        schema = None
        batches = prefetched(bundle.batches())
        try:
            for batch in tqdm(batches, desc="transcripts", unit="batch", leave=False):
                schema = batch.schema
                sink.add(batch)
                if 1_000_000 <= sink.counts.read < 1_000_000 + batch.num_rows:
                    sink.check_fit()  # fail early on a wrong transform
        finally:
            batches.close()  # stops the reading thread at once on an error
        counts = sink.close(schema)
        logger.info("%s: %d transcripts read, %d spots kept, %d controls %s, %d below qv, "
                    "%d outside the image", bundle.transcripts_path, counts.read,
                    counts.spots, sum(counts.controls.values()), counts.controls,
                    counts.low_qv, counts.outside)
        seconds["transcripts"] = time.perf_counter() - clock
        clock = time.perf_counter()
        write_tiled_tiff(image_tmp, row_tiles(bundle.image_reader, bundle.image_shape,
                                              bundle.image_dtype, IMAGE_TILE),
                         bundle.image_shape, bundle.image_dtype, IMAGE_TILE,
                         pixel_size_um=bundle.pixel_size_um, compression=compression)
        seconds["image"] = time.perf_counter() - clock
        clock = time.perf_counter()
        n_cells = None
        if labels_tmp is not None:
            from GeneSegNet.vendors.tiled_labels import write_vendor_labels

            ids = write_vendor_labels(bundle, labels_tmp, expand_um, tiled_labels)
            write_ids(ids_tmp, ids)
            n_cells = len(ids)
            seconds["labels"] = time.perf_counter() - clock
        meta = SampleMetadata(pixel_size_um=bundle.pixel_size_um, platform=bundle.platform,
                              um_to_px=tuple(tuple(float(v) for v in r) for r in bundle.affine),
                              source=bundle.pixel_size_source)
        extra = {"image_shape": list(bundle.image_shape),
                 "transcripts_file": str(bundle.transcripts_path),
                 "transcripts": counts.to_dict(),
                 "min_qv": bundle.min_qv, "import": bundle.details,
                 "starting_labels": None if n_cells is None else
                 {"source": "vendor nuclei", "cells": n_cells, "expand_um": expand_um}}
        write_sample_metadata(meta_tmp, meta, extra)
        outputs = staging.commit()
    except BaseException:
        staging.discard()
        raise
    finally:
        bundle.close()
    return ImportResult(outputs, counts, meta.to_dict() | extra, seconds)


def write_ids(path: Path, ids: list[Any]) -> None:
    """``label,vendor_id`` rows (label k = ids[k - 1])."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["label", "vendor_id"])
        for k, vid in enumerate(ids, start=1):
            writer.writerow([k, vid])


__all__ = ["PLATFORMS", "Bundle", "ImportResult", "import_bundle", "open_bundle",
           "pixel_size_of"]
