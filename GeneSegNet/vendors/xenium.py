"""10x Genomics Xenium output folder -> raw layout.

Read from the bundle:

* ``transcripts.parquet`` (or ``transcripts.csv.gz``): ``x_location``, ``y_location``,
  ``z_location`` (µm), ``feature_name``, ``qv``, ``cell_id``, ``overlaps_nucleus``,
  ``transcript_id``. Transcripts with ``qv < min_qv`` (default 20, Xenium's own
  threshold: Q20 = 1 % decoding error) are dropped and counted.
* DAPI: ``morphology_focus/`` (multi-file OME-TIFF; the file of channel 0 = DAPI:
  ``*_0000.ome.tif`` or ``ch0000_*``), else ``morphology_mip.ome.tif``, else
  ``morphology.ome.tif`` (a Z stack: plane ``z``, default the middle). Pyramidal:
  ``level`` N (default 0) is read tile by tile.
* pixel size: ``experiment.xenium`` (JSON key ``pixel_size``, µm/px at level 0), else the
  OME ``PhysicalSizeX/Y``. µm -> px at level N: x_px = x_um / (pixel_size * 2^N) (Xenium's
  image origin is the µm origin).
* nuclei: ``nucleus_boundaries.parquet`` (``cell_id``, ``vertex_x``, ``vertex_y`` µm, one row
  per vertex) or ``cells.zarr.zip`` (``masks/0``: nucleus labels at level-0 px).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from GeneSegNet.errors import InputError
from GeneSegNet.vendors import Bundle
from GeneSegNet.vendors.common import (
    apply_affine,
    ome_pixel_size,
    open_tiff_level,
    require_file,
    scale_affine,
)
from GeneSegNet.vendors.transcripts import (
    as_float,
    iter_table,
    require_columns,
)

logger = logging.getLogger(__name__)

DEFAULT_MIN_QV = 20.0
X, Y, Z, GENE = "x_location", "y_location", "z_location", "feature_name"
OPTIONAL = ("qv", "cell_id", "overlaps_nucleus", "transcript_id")
RENAMED = {X: "x_um", Y: "y_um", Z: "z_um", GENE: "gene"}


def find_transcripts(bundle: Path) -> Path:
    for name in ("transcripts.parquet", "transcripts.csv.gz", "transcripts.csv"):
        if (bundle / name).is_file():
            return bundle / name
    raise InputError("required transcripts.parquet (or transcripts.csv.gz) not found", bundle)


def find_image(bundle: Path) -> tuple[Path, dict[str, int]]:
    """(DAPI file, axis selection) following Xenium's layouts (see the module doc)."""
    focus = bundle / "morphology_focus"
    if focus.is_dir():
        files = sorted(focus.glob("*.ome.tif"))
        if not files:
            raise InputError("morphology_focus/ holds no .ome.tif file", focus)
        for f in files:
            if "0000" in f.name or "dapi" in f.name.lower():
                return f, {"C": 0}
        return files[0], {"C": 0}
    for name in ("morphology_mip.ome.tif", "morphology.ome.tif"):
        if (bundle / name).is_file():
            return bundle / name, {"C": 0}
    raise InputError("no DAPI image: expected morphology_focus/, morphology_mip.ome.tif or "
                     "morphology.ome.tif", bundle)


def read_pixel_size(bundle: Path, tif: Any, image: Path) -> tuple[float, float, str]:
    """(size_x, size_y) µm/px at level 0 and where it came from; InputError if none > 0."""
    exp = bundle / "experiment.xenium"
    if exp.is_file():
        try:
            value = json.loads(exp.read_text(encoding="utf-8")).get("pixel_size")
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"cannot read experiment.xenium ({exc})", exp) from exc
        if value is None:
            raise InputError("no 'pixel_size' key", exp)
        if not isinstance(value, int | float) or not value > 0:
            raise InputError(f"pixel_size must be a number > 0 µm/px, got {value!r}", exp)
        return float(value), float(value), "experiment.xenium"
    px, py = ome_pixel_size(tif)
    if px is None or not px > 0:
        raise InputError("no experiment.xenium and no PhysicalSizeX > 0 in the OME metadata: "
                         "pixel size unknown", image)
    return px, (py if py and py > 0 else px), f"{image.name} PhysicalSizeX"


def open_xenium(bundle: str | Path, level: int = 0, z: int | None = None,
                min_qv: float | None = DEFAULT_MIN_QV, transcripts: str | Path | None = None,
                image: str | Path | None = None, **_: Any) -> Bundle:
    """Open a Xenium output folder (see the module doc). ``min_qv`` None keeps every qv."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise InputError("Xenium output folder not found", bundle)
    tx_path = Path(transcripts) if transcripts else find_transcripts(bundle)
    require_file(tx_path, "transcript table")
    columns = require_columns(tx_path, [X, Y, GENE])
    extras = [c for c in (Z, *OPTIONAL) if c in columns]
    if min_qv is not None and "qv" not in columns:
        logger.warning("%s: no qv column; --min_qv not applied", tx_path)
    img_path, select = (Path(image), {"C": 0}) if image else find_image(bundle)
    require_file(img_path, "DAPI image")
    from GeneSegNet.vendors.common import open_tiff_level as _open

    with_z = dict(select)
    reader, shape, dtype, tif = _open(img_path, level, with_z)
    axes = tif.series[0].levels[level].axes if tif.series[0].levels else tif.series[0].axes
    if "Z" in axes:
        nz = tif.series[0].levels[level].shape[axes.index("Z")]
        with_z["Z"] = nz // 2 if z is None else z
        tif.close()
        reader, shape, dtype, tif = open_tiff_level(img_path, level, with_z)
    psx, psy, source = read_pixel_size(bundle, tif, img_path)
    scale = 2 ** level
    affine = scale_affine(psx * scale, psy * scale)
    logger.info("%s: DAPI %s level %d, %d x %d px, %.4g µm/px (%s)", bundle, img_path.name,
                level, shape[1], shape[0], psx * scale, source)

    dict_cols = [GENE] + (["cell_id"] if "cell_id" in extras and _is_text(tx_path, "cell_id")
                          else [])

    def batches() -> Iterator[pa.Table]:
        for t in iter_table(tx_path, [X, Y, GENE, *extras], dictionary=dict_cols):
            gene = t.column(GENE)
            if pa.types.is_dictionary(gene.type) and not pa.types.is_string(
                    gene.type.value_type):
                gene = pc.cast(gene, pa.string())
            xp, yp = apply_affine(affine, as_float(t, X), as_float(t, Y))
            cols = {"x": pa.array(xp), "y": pa.array(yp), "gene": gene}
            for c in (X, Y, *extras):
                col = t.column(c)
                if c == "cell_id" and c not in dict_cols:
                    col = pc.cast(col, pa.string())
                cols[RENAMED.get(c, c)] = col
            yield pa.table(cols)

    details = {"bundle": str(bundle), "image_file": str(img_path), "level": level,
               "image_axes": with_z, "pixel_size_level0_um": [psx, psy]}
    return Bundle(platform="xenium", image_reader=reader, image_shape=shape, image_dtype=dtype,
                  affine=affine, pixel_size_um=float(np.sqrt(psx * psy)) * scale,
                  pixel_size_source=source + (f" x 2^{level} (level {level})" if level else ""),
                  transcripts_path=tx_path, batches=batches, min_qv=min_qv, details=details,
                  nuclei=_nuclei_loader(bundle, affine, level),
                  polygons=_polygon_loader(bundle, affine), closers=[tif.close])


def _is_text(path: Path, column: str) -> bool:
    """Whether a Parquet column holds strings (CSV: always read as text here)."""
    if path.suffix != ".parquet":
        return True
    import pyarrow.parquet as pq

    kind = pq.read_schema(path).field(column).type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(
        kind)


def _nuclei_loader(bundle: Path, affine: np.ndarray, level: int) -> Any:
    boundaries = bundle / "nucleus_boundaries.parquet"
    masks = bundle / "cells.zarr.zip"
    if boundaries.is_file():
        return lambda shape: nuclei_from_boundaries(boundaries, affine, shape)
    if masks.is_file():
        return lambda shape: nuclei_from_masks(masks, level, shape)
    return None


def _polygon_loader(bundle: Path, affine: np.ndarray) -> Any:
    boundaries = bundle / "nucleus_boundaries.parquet"
    if boundaries.is_file():
        return lambda: xenium_polygons(boundaries, affine)
    return None


def xenium_polygons(path: Path, affine: np.ndarray) -> Any:
    """``nucleus_boundaries.parquet`` (one row per vertex, µm, rows of a cell together) as a
    :class:`~GeneSegNet.data.nuclei.PolygonSet` in image px: one ring per cell, labels in
    file order. Built without a Python object per cell."""
    import pyarrow.parquet as pq

    from GeneSegNet.data.nuclei import PolygonSet

    require_columns(path, ["cell_id", "vertex_x", "vertex_y"])
    try:
        table = pq.read_table(path, columns=["cell_id", "vertex_x", "vertex_y"])
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"cannot read nucleus boundaries ({exc})", path) from exc
    xs, ys = apply_affine(affine, as_float(table, "vertex_x"), as_float(table, "vertex_y"))
    cell = table.column("cell_id").combine_chunks()
    if pa.types.is_dictionary(cell.type):
        cell = cell.dictionary_decode()
    n = len(cell)
    if n == 0:
        starts = np.zeros(1, np.int64)
        ids: list[Any] = []
    else:
        same = pc.equal(cell.slice(1), cell.slice(0, n - 1)).fill_null(False)
        change = np.flatnonzero(~same.to_numpy(zero_copy_only=False)) + 1
        starts = np.concatenate([[0], change, [n]]).astype(np.int64)
        first = cell.take(pa.array(starts[:-1]))
        ids = [v.decode() if isinstance(v, bytes) else v for v in first.to_pylist()]
    k = len(ids)
    return PolygonSet(xs, ys, starts, np.zeros(k, bool), np.arange(k + 1, dtype=np.int64),
                      ids)


def nuclei_from_boundaries(path: Path, affine: np.ndarray, shape: tuple[int, int]
                           ) -> tuple[np.ndarray, list[Any]]:
    """Rasterise ``nucleus_boundaries.parquet`` (vertices in µm) onto the (H, W) grid."""
    polys = xenium_polygons(path, affine)
    return polys.render(shape, (0, int(shape[0]))), polys.ids


def nuclei_from_masks(path: Path, level: int, shape: tuple[int, int]
                      ) -> tuple[np.ndarray, list[Any]]:
    """``cells.zarr.zip`` ``masks/0`` (level-0 nucleus labels) sampled onto level ``level``.

    Labels keep the stored ids (vendor id = the mask value)."""
    import zarr

    from GeneSegNet.data.nuclei import sample_level

    try:
        store = zarr.storage.ZipStore(path, mode="r")
        group = zarr.open_group(store, mode="r")
        masks = group["masks"]["0"]
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"cannot read masks/0 from the zipped zarr ({exc})", path) from exc
    try:
        labels = sample_level(lambda r0, r1: np.asarray(masks[r0:r1, :]), masks.shape, level,
                              shape)
    finally:
        store.close()
    top = int(labels.max(initial=0))
    return labels, list(range(1, top + 1))
