"""Inputs of 10x ``xeniumranger import-segmentation`` (Xenium Explorer re-segmentation).

Two routes (flags as documented by 10x for Xenium Ranger 2.x/3.x; check
https://www.10xgenomics.com/support/software/xenium-ranger/latest/analysis/running-pipelines/XR-import-segmentation
for your version):

1. Label masks: ``<sample>_cells.tif`` (uint32 label TIFF, 0 = background, in pixels of
   the bundle's ``morphology_focus`` / ``morphology.ome.tif`` level 0) for ``--cells``
   (and ``--nuclei`` when nucleus labels exist) with ``--units pixels``.
2. Transcript assignment (Baysor-style): ``<sample>_transcript_assignment.csv`` with
   ``transcript_id`` (the spot table's ``transcript_id`` column when present, which must
   be the bundle's ids; else the row number), ``cell`` (``"cell-<id>"``, empty for
   background), ``is_noise`` (1 for background), ``x``, ``y`` (µm), ``gene``; and
   ``<sample>_cell_polygons_um.geojson`` (one Polygon per cell in µm, each feature with
   ``"id"`` and ``properties.cell`` equal to the ``cell`` value) for
   ``--transcript-assignment`` / ``--viz-polygons`` with ``--units microns``.

Coordinates in µm are pixel coordinates times the pixel size; they match the bundle only
when the image is the bundle's morphology image at full resolution (no crop or offset).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from GeneSegNet.export.polygons import scale_polygons, write_geojson
from GeneSegNet.io import atomic_path
from GeneSegNet.io.images import write_label

logger = logging.getLogger(__name__)

CELL_PREFIX = "cell-"


def transcript_assignment_table(cell_ids: np.ndarray, x_px: np.ndarray, y_px: np.ndarray,
                                genes: np.ndarray, pixel_size_um: float,
                                transcript_ids: np.ndarray | None = None) -> pd.DataFrame:
    """Baysor-style assignment table, rows in input order (see the module docstring)."""
    cell_ids = np.asarray(cell_ids, dtype=np.int64)
    n = len(cell_ids)
    ids = np.arange(n, dtype=np.int64) if transcript_ids is None else np.asarray(transcript_ids)
    cell = np.where(cell_ids > 0, np.char.add(CELL_PREFIX, cell_ids.astype(str)), "")
    return pd.DataFrame({
        "transcript_id": ids,
        "cell": cell,
        "is_noise": (cell_ids == 0).astype(np.int8),
        "x": np.asarray(x_px, dtype=np.float64) * pixel_size_um,
        "y": np.asarray(y_px, dtype=np.float64) * pixel_size_um,
        "gene": np.asarray(genes).astype(str),
    })


def write_xenium_inputs(folder: str | Path, name: str, labels: np.ndarray, cell_ids: np.ndarray,
                        spots: pd.DataFrame, pixel_size_um: float, ids: np.ndarray,
                        polygons: np.ndarray, nuclei: np.ndarray | None = None) -> list[Path]:
    """Write the files of both routes into ``folder``; returns their paths.

    ``cell_ids`` (N,) are the cells of the rows of ``spots`` (columns x, y in px, gene,
    optional transcript_id); ``ids``/``polygons`` the cells' polygons in px.
    """
    folder = Path(folder)
    written = [write_label(folder / f"{name}_cells.tif", labels, dtype=np.uint32)]
    if nuclei is not None:
        written.append(write_label(folder / f"{name}_nuclei.tif", nuclei, dtype=np.uint32))
    transcript_ids = spots["transcript_id"].to_numpy() if "transcript_id" in spots else None
    table = transcript_assignment_table(cell_ids, spots["x"].to_numpy(), spots["y"].to_numpy(),
                                        spots["gene"].to_numpy(), pixel_size_um, transcript_ids)
    finite = np.isfinite(table["x"].to_numpy()) & np.isfinite(table["y"].to_numpy())
    if not finite.all():
        logger.warning("%s: %d transcript(s) with invalid coordinates left out of the Xenium "
                       "assignment", name, int((~finite).sum()))
        table = table[finite]
    path = folder / f"{name}_transcript_assignment.csv"
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6f")
    written.append(path)
    written.append(write_geojson(
        folder / f"{name}_cell_polygons_um.geojson", ids,
        scale_polygons(polygons, pixel_size_um),
        pd.DataFrame({"cell": [f"{CELL_PREFIX}{i}" for i in ids]}, index=ids),
        feature_id_prefix=CELL_PREFIX, name_prefix=CELL_PREFIX))
    logger.info("xeniumranger import-segmentation inputs -> %s", folder)
    return written
