"""Vizgen MERSCOPE output folder -> raw layout.

Read from the bundle:

* ``detected_transcripts.csv``: ``global_x``, ``global_y`` (µm), ``gene``, optional
  ``global_z``, ``fov``, ``cell_id``, ``transcript_id`` (its fov-local ``x``/``y`` are not
  kept: the written ``x``/``y`` are mosaic px).
* ``images/mosaic_DAPI_z<N>.tif``: plane ``z`` (default the middle of those present).
* ``images/micron_to_mosaic_pixel_transform.csv``: 3x3 affine, whitespace-separated,
  [x_px, y_px, 1] = A @ [x_um, y_um, 1] (scale and translation); pixel size =
  1 / sqrt(|det A[:2, :2]|).
* nuclei / cells: ``cell_boundaries.parquet`` (``EntityID``, ``Geometry`` WKB polygons or
  multipolygons in µm, optional ``ZIndex``: the row of plane ``z`` is used, else the
  first per entity).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from GeneSegNet.errors import InputError
from GeneSegNet.vendors import Bundle
from GeneSegNet.vendors.common import (
    apply_affine,
    check_affine,
    open_tiff_level,
    pixel_size_of,
    require_file,
)
from GeneSegNet.vendors.transcripts import (
    as_float,
    iter_table,
    require_columns,
)

logger = logging.getLogger(__name__)

TRANSFORM = Path("images") / "micron_to_mosaic_pixel_transform.csv"
OPTIONAL = ("global_z", "fov", "cell_id", "transcript_id")


def read_transform(path: Path) -> np.ndarray:
    """The (2, 3) µm -> mosaic px affine of ``micron_to_mosaic_pixel_transform.csv``."""
    require_file(path, "µm -> mosaic px transform")
    try:
        rows = [[float(v) for v in line.replace(",", " ").split()]
                for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except ValueError as exc:
        raise InputError(f"transform is not numeric ({exc})", path) from exc
    return check_affine(rows, str(path))


def find_planes(bundle: Path) -> dict[int, Path]:
    planes = {}
    for f in (bundle / "images").glob("mosaic_DAPI_z*.tif"):
        m = re.fullmatch(r"mosaic_DAPI_z(\d+)\.tif", f.name)
        if m:
            planes[int(m.group(1))] = f
    return planes


def open_merscope(bundle: str | Path, z: int | None = None, transcripts: str | Path | None = None,
                **_: Any) -> Bundle:
    """Open a MERSCOPE output folder (see the module doc)."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise InputError("MERSCOPE output folder not found", bundle)
    tx_path = Path(transcripts) if transcripts else bundle / "detected_transcripts.csv"
    require_file(tx_path, "transcript table (detected_transcripts.csv)")
    columns = require_columns(tx_path, ["global_x", "global_y", "gene"])
    extras = [c for c in OPTIONAL if c in columns]
    affine = read_transform(bundle / TRANSFORM)
    planes = find_planes(bundle)
    if not planes:
        raise InputError("required images/mosaic_DAPI_z<N>.tif not found", bundle / "images")
    zs = sorted(planes)
    plane = zs[len(zs) // 2] if z is None else z
    if plane not in planes:
        raise InputError(f"no mosaic_DAPI_z{plane}.tif (planes present: {zs})",
                         bundle / "images")
    reader, shape, dtype, tif = open_tiff_level(planes[plane], 0)
    pixel = pixel_size_of(affine)
    logger.info("%s: DAPI plane z%d, %d x %d px, %.4g µm/px", bundle, plane, shape[1],
                shape[0], pixel)

    def batches() -> Iterator[pa.Table]:
        for t in iter_table(tx_path, ["global_x", "global_y", "gene", *extras],
                            dictionary=["gene"]):
            xp, yp = apply_affine(affine, as_float(t, "global_x"), as_float(t, "global_y"))
            cols = {"x": pa.array(xp), "y": pa.array(yp), "gene": t.column("gene"),
                    "x_um": t.column("global_x"), "y_um": t.column("global_y")}
            for c in extras:
                cols[c] = t.column(c)
            yield pa.table(cols)

    boundaries = bundle / "cell_boundaries.parquet"
    nuclei = polygons = None
    if boundaries.is_file():
        def nuclei(shape: tuple[int, int]) -> tuple[np.ndarray, list[Any]]:
            return cells_from_boundaries(boundaries, affine, shape, plane)

        def polygons() -> Any:
            return merscope_polygons(boundaries, affine, plane)

    return Bundle(platform="merscope", image_reader=reader, image_shape=shape,
                  image_dtype=dtype, affine=affine, pixel_size_um=pixel,
                  pixel_size_source=str(TRANSFORM), transcripts_path=tx_path, batches=batches,
                  details={"bundle": str(bundle), "image_file": str(planes[plane]),
                           "z": plane},
                  nuclei=nuclei, polygons=polygons, closers=[tif.close])


def merscope_polygons(path: Path, affine: np.ndarray, z: int | None) -> Any:
    """``cell_boundaries.parquet`` WKB (multi)polygons (µm) as a
    :class:`~GeneSegNet.data.nuclei.PolygonSet` in image px (labels in file order)."""
    import pyarrow.parquet as pq
    import shapely

    from GeneSegNet.data.nuclei import PolygonSet

    columns = require_columns(path, ["EntityID", "Geometry"])
    use = ["EntityID", "Geometry"] + (["ZIndex"] if "ZIndex" in columns else [])
    frame = pq.read_table(path, columns=use).to_pandas()
    if "ZIndex" in frame and z is not None and (frame["ZIndex"] == z).any():
        frame = frame[frame["ZIndex"] == z]
    frame = frame.drop_duplicates("EntityID", keep="first")
    try:
        geoms = shapely.from_wkb(frame["Geometry"].to_numpy())
    except shapely.errors.GEOSException as exc:
        raise InputError(f"Geometry is not valid WKB ({exc})", path) from exc

    def to_px(coords: np.ndarray) -> np.ndarray:
        xp, yp = apply_affine(affine, coords[:, 0], coords[:, 1])
        return np.column_stack([xp, yp])

    def cells() -> Iterator[tuple[Any, list[np.ndarray], list[np.ndarray]]]:
        for vid, geom in zip(frame["EntityID"], geoms, strict=True):
            parts = [] if geom is None else list(getattr(geom, "geoms", [geom]))
            ext = [to_px(np.asarray(p.exterior.coords)) for p in parts]
            holes = [to_px(np.asarray(r.coords)) for p in parts for r in p.interiors]
            yield vid, ext, holes

    return PolygonSet.from_cells(cells())


def cells_from_boundaries(path: Path, affine: np.ndarray, shape: tuple[int, int],
                          z: int | None) -> tuple[np.ndarray, list[Any]]:
    """Rasterise ``cell_boundaries.parquet`` WKB (multi)polygons (µm) onto the grid."""
    polys = merscope_polygons(path, affine, z)
    return polys.render(shape, (0, int(shape[0]))), polys.ids
