"""Cell polygons from a label image, written as GeoJSON (QuPath conventions) and GeoParquet.

Pixel-edge convention: pixel (r, c) covers [c, c+1) × [r, r+1) in (x, y) pixel units, so a
polygon traces the pixel edges of its cell (a single pixel is the unit square with corners
(c, r) and (c+1, r+1)); QuPath and shapely share this convention.

Tracing: each cell's bounding box is doubled in size (every pixel becomes 2×2), padded
and traced with OpenCV's border following (outer contours only). In the doubled mask a
left/top border pixel has an even index 2k and a right/bottom one an odd index 2k+1, so
``ceil(i / 2)`` maps every traced pixel onto the pixel corner it stands for: the ring runs
exactly along the pixel edges. The largest component (largest ring area) is kept, holes
are dropped, and the ring is simplified (Douglas-Peucker, tolerance ≤ 0.5 px, topology
preserved); rings that would fall below 4 vertices or become invalid stay unsimplified.
Self-touching rings (pixels meeting only at a corner) are repaired with
``shapely.make_valid`` and the largest part kept.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage

from GeneSegNet.errors import InputError
from GeneSegNet.io import atomic_path

logger = logging.getLogger(__name__)

SIMPLIFY_TOLERANCE_PX = 0.5


def _trace(mask: np.ndarray) -> np.ndarray | None:
    """Outer ring of the largest component of a bool crop as (M, 2) float64 (x, y) pixel
    corners of the crop (not closed), or None for an empty mask."""
    padded = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), dtype=np.uint8)
    padded[1:-1, 1:-1] = mask
    doubled = np.repeat(np.repeat(padded, 2, axis=0), 2, axis=1)
    contours, _ = cv2.findContours(doubled, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    if len(contours) > 1:
        best = max(contours, key=lambda c: abs(cv2.contourArea(c)))
    else:
        best = contours[0]
    points = best[:, 0, :].astype(np.int64)
    corners = (points + (points & 1)) // 2 - 1  # back to crop pixel corners
    keep = np.ones(len(corners), dtype=bool)
    keep[1:] = np.any(corners[1:] != corners[:-1], axis=1)
    corners = corners[keep]
    if len(corners) > 1 and np.all(corners[0] == corners[-1]):
        corners = corners[:-1]
    return corners.astype(np.float64)


def _largest_polygon(geometry):
    import shapely

    parts = [g for g in getattr(geometry, "geoms", [geometry]) if g.geom_type == "Polygon"]
    if not parts:  # e.g. a GeometryCollection of lines: take its polygons, if any
        parts = [g for g in shapely.get_parts(geometry) if g.geom_type == "Polygon"]
    if not parts:
        return None
    best = max(parts, key=lambda g: g.area)
    return shapely.Polygon(best.exterior)


def cell_polygons(labels: np.ndarray, simplify: float = SIMPLIFY_TOLERANCE_PX
                  ) -> tuple[np.ndarray, np.ndarray]:
    """One polygon per cell of ``labels``.

    Parameters
    ----------
    labels : (H, W) integer label image, 0 = background.
    simplify : Douglas-Peucker tolerance in px (0 keeps every pixel corner; at most 0.5).

    Returns
    -------
    ids : (K,) int64 cell ids, ascending.
    polygons : (K,) object array of shapely Polygons in pixel units (x = column, y = row),
        valid, with at least 4 vertices.
    """
    import shapely

    if not 0.0 <= simplify <= SIMPLIFY_TOLERANCE_PX:
        raise ValueError(f"simplify must lie in [0, {SIMPLIFY_TOLERANCE_PX}] px, got {simplify}")
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {labels.shape}")
    if labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if labels.size == 0 or not labels.any():
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=object)
    if labels.dtype.kind == "i" and labels.min() < 0:
        raise ValueError("labels must be >= 0")
    slices = ndimage.find_objects(labels)
    ids, rings = [], []
    for index, box in enumerate(slices):
        if box is None:
            continue
        cell_id = index + 1
        ring = _trace(labels[box] == cell_id)
        if ring is None:
            continue
        ring[:, 0] += box[1].start
        ring[:, 1] += box[0].start
        ids.append(cell_id)
        rings.append(ring)
    polygons = np.empty(len(rings), dtype=object)
    polygons[:] = [shapely.Polygon(r) if len(r) >= 3 else None for r in rings]
    bad = np.flatnonzero(~shapely.is_valid(polygons))
    for k in bad:
        polygons[k] = _largest_polygon(shapely.make_valid(shapely.Polygon(rings[k])))
    if simplify > 0:
        simple = shapely.simplify(polygons, simplify, preserve_topology=True)
        ok = (shapely.get_num_coordinates(simple) >= 5) & shapely.is_valid(simple)
        ok &= shapely.get_type_id(simple) == 3  # still a Polygon
        polygons = np.where(ok, simple, polygons)
    ids_arr = np.asarray(ids, dtype=np.int64)
    present = np.array([p is not None and not p.is_empty for p in polygons], dtype=bool)
    if not present.all():
        logger.warning("%d cell(s) gave no polygon and are left out", int((~present).sum()))
    return ids_arr[present], polygons[present]


def scale_polygons(polygons: np.ndarray, factor: float) -> np.ndarray:
    """Polygons with every coordinate multiplied by ``factor`` (e.g. px -> µm)."""
    import shapely

    return shapely.transform(polygons, lambda xy: xy * float(factor))


def _json_value(value):
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _coordinate_text(ring: np.ndarray) -> str:
    """JSON text of a closed ring [[[x, y], ...]]; integers written without decimals,
    other values rounded to 6 decimals."""
    if np.all(ring == np.round(ring)):
        values = ring.astype(np.int64).tolist()
    else:
        values = np.round(ring, 6).tolist()
    return json.dumps([values], separators=(",", ":"))


def write_geojson(path: str | Path, ids: np.ndarray, polygons: np.ndarray,
                  properties: pd.DataFrame | None = None, *, object_type: str = "cell",
                  name_prefix: str = "", feature_id_prefix: str | None = None,
                  collection_properties: Mapping | None = None) -> Path:
    """Write a GeoJSON FeatureCollection, one Polygon feature per cell, atomically.

    QuPath conventions: ``properties`` holds ``objectType`` (``object_type``), ``name``
    (``name_prefix`` + str(cell_id)) and ``cell_id`` (int), then the columns of
    ``properties`` (a DataFrame indexed by cell id; missing ids get nulls). Coordinates
    are those of ``polygons`` (pixels unless scaled). ``feature_id_prefix`` given: each
    feature also gets ``"id": prefix + str(cell_id)``.
    """
    import shapely

    path = Path(path)
    ids = np.asarray(ids, dtype=np.int64)
    extra = None
    if properties is not None and len(properties.columns):
        extra = properties.reindex(ids)
    coords, which = shapely.get_coordinates(shapely.get_exterior_ring(polygons),
                                            return_index=True)
    bounds = np.searchsorted(which, np.arange(len(ids) + 1))
    head = {"type": "FeatureCollection"}
    if collection_properties:
        head["properties"] = {k: _json_value(v) for k, v in collection_properties.items()}
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(head, ensure_ascii=False)[:-1] + ', "features": [\n')
        for k, cell_id in enumerate(ids):
            props = {"objectType": object_type, "name": f"{name_prefix}{cell_id}",
                     "cell_id": int(cell_id)}
            if extra is not None:
                props.update({str(c): _json_value(v) for c, v in extra.iloc[k].items()})
            feature_id = ("" if feature_id_prefix is None else
                          f'"id": {json.dumps(feature_id_prefix + str(cell_id))}, ')
            ring = _coordinate_text(coords[bounds[k]:bounds[k + 1]])
            fh.write(('' if k == 0 else ',\n') + '{"type": "Feature", ' + feature_id
                     + '"geometry": {"type": "Polygon", "coordinates": ' + ring + '}, '
                     + '"properties": ' + json.dumps(props, ensure_ascii=False) + '}')
        fh.write("\n]}\n")
    logger.info("%d polygons -> %s", len(ids), path)
    return path


def write_geoparquet(path: str | Path, ids: np.ndarray, polygons: np.ndarray,
                     properties: pd.DataFrame | None = None, *, units: str = "pixel") -> Path:
    """Write polygons as GeoParquet 1.0 (pyarrow; WKB ``geometry`` column, ``geo`` metadata).

    Columns: ``cell_id`` (int64), ``name`` (str), the columns of ``properties`` (indexed by
    cell id), ``geometry``. The CRS is null (image pixel units, not geographic); ``units``
    is recorded in the file's ``genesegnet`` metadata.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    import shapely

    path = Path(path)
    ids = np.asarray(ids, dtype=np.int64)
    data = {"cell_id": pa.array(ids, pa.int64()),
            "name": pa.array([str(i) for i in ids], pa.string())}
    if properties is not None:
        extra = properties.reindex(ids)
        for column in extra.columns:
            if column in data or column == "geometry":
                raise ValueError(f"property column {column!r} clashes with a fixed column")
            data[str(column)] = pa.array(extra[column].to_numpy())
    wkb = shapely.to_wkb(polygons, output_dimension=2)
    data["geometry"] = pa.array(list(wkb), pa.binary())
    table = pa.table(data)
    bbox = (list(map(float, shapely.total_bounds(polygons))) if len(polygons)
            else [0.0, 0.0, 0.0, 0.0])
    geo = {"version": "1.0.0", "primary_column": "geometry",
           "columns": {"geometry": {"encoding": "WKB", "geometry_types": ["Polygon"],
                                    "crs": None, "bbox": bbox}}}
    meta = dict(table.schema.metadata or {})
    meta[b"geo"] = json.dumps(geo).encode()
    meta[b"genesegnet"] = json.dumps({"units": units, "pixel_convention":
                                      "pixel (r, c) covers [c, c+1) x [r, r+1)"}).encode()
    table = table.replace_schema_metadata(meta)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    logger.info("%d polygons -> %s", len(ids), path)
    return path


def read_geojson_ids(path: str | Path) -> list[int]:
    """Cell ids of a GeoJSON written by :func:`write_geojson` (InputError naming the file)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return [int(f["properties"]["cell_id"]) for f in data["features"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"not a GeneSegNet polygon GeoJSON ({exc})", path) from exc
