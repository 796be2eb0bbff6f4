"""SpatialData zarr store of one sample (optional extra: ``pip install "spatialdata<0.8"``).

Elements, all in the ``global`` coordinate system in image pixels (x = column, y = row;
pixel (r, c) covers [c, c+1) × [r, r+1)) and, with a pixel size, also in ``microns``
(a scale transformation):

- images ``<sample>_image`` (c, y, x) and labels ``genesegnet_labels`` (y, x);
- shapes ``genesegnet_boundaries``: one polygon per cell, indexed by the cell id;
- points ``transcripts``: x, y (px), gene and ``genesegnet_cell_id`` (this project's cell,
  0 = background) plus the confidence columns when present;
- table ``table``: the AnnData of :mod:`.anndata_writer`, linked to the shapes as sopa
  writes it (``region = "genesegnet_boundaries"``, ``region_key = "region"``,
  ``instance_key = "cell_id"``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from GeneSegNet.errors import InputError
from GeneSegNet.io.atomic import temp_dir

logger = logging.getLogger(__name__)

SHAPES_KEY = "genesegnet_boundaries"
LABELS_KEY = "genesegnet_labels"
POINTS_KEY = "transcripts"
TABLE_KEY = "table"
CELL_COLUMN = "genesegnet_cell_id"
REGION_KEY = "region"
INSTANCE_KEY = "cell_id"


def spatialdata_available() -> bool:
    """True if the optional ``spatialdata`` package imports."""
    try:
        import spatialdata  # noqa: F401
    except ImportError:
        return False
    return True


def build_spatialdata(name: str, image: np.ndarray | None, labels: np.ndarray,
                      ids: np.ndarray, polygons: np.ndarray, transcripts: pd.DataFrame,
                      adata, pixel_size_um: float | None = None):
    """A ``spatialdata.SpatialData`` of one sample (see the module docstring).

    image : (H, W) or (H, W, C); labels : (H, W); ids, polygons : (K,) cells and their
    polygons (px); transcripts : x, y (px), gene, ``genesegnet_cell_id`` and optional
    extra columns; adata : AnnData with ``obs["cell_id"]`` for the ids.
    """
    try:
        import geopandas as gpd
        from spatialdata import SpatialData
        from spatialdata.models import (
            Image2DModel,
            Labels2DModel,
            PointsModel,
            ShapesModel,
            TableModel,
        )
        from spatialdata.transformations import Identity, Scale
    except ImportError as exc:
        raise InputError(f"the spatialdata output needs the optional extra: pip install "
                         f"'spatialdata<0.8' ({exc})") from None

    def transforms():
        out = {"global": Identity()}
        if pixel_size_um is not None:
            out["microns"] = Scale([pixel_size_um, pixel_size_um], axes=("y", "x"))
        return out

    elements = {}
    images = {}
    if image is not None:
        img = np.asarray(image)
        img = img[None] if img.ndim == 2 else np.moveaxis(img, -1, 0)
        images[f"{name}_image"] = Image2DModel.parse(img, dims=("c", "y", "x"),
                                                     transformations=transforms())
    elements["labels"] = {LABELS_KEY: Labels2DModel.parse(
        np.asarray(labels).astype(np.int32, copy=False), dims=("y", "x"),
        transformations=transforms())}
    gdf = gpd.GeoDataFrame({"geometry": list(polygons)},
                           index=pd.Index(np.asarray(ids, dtype=np.int64), name=INSTANCE_KEY))
    elements["shapes"] = {SHAPES_KEY: ShapesModel.parse(gdf, transformations=transforms())}
    points = transcripts.reset_index(drop=True).copy()
    points["gene"] = points["gene"].astype(str).astype("category")
    elements["points"] = {POINTS_KEY: PointsModel.parse(
        points, coordinates={"x": "x", "y": "y"}, feature_key="gene",
        transformations=transforms())}
    table = adata.copy()
    table.obs[REGION_KEY] = pd.Categorical([SHAPES_KEY] * table.n_obs)
    table.obs[INSTANCE_KEY] = table.obs["cell_id"].astype(np.int64)
    table = TableModel.parse(table, region=SHAPES_KEY, region_key=REGION_KEY,
                             instance_key=INSTANCE_KEY)
    return SpatialData(images=images, tables={TABLE_KEY: table}, **elements)


def _unsharded_zarr_tables() -> contextlib.AbstractContextManager:
    """anndata 0.12 warns once per array it writes to zarr v3 while its
    ``auto_shard_zarr_v3`` setting is unset (sharding will become its default). Set it to
    False, its current behaviour, for our writes; older anndata has no such setting."""
    import anndata

    try:
        return anndata.settings.override(auto_shard_zarr_v3=False)
    except AttributeError:
        return contextlib.nullcontext()


def write_spatialdata(path: str | Path, sdata, overwrite: bool = True) -> Path:
    """Write ``sdata`` to the zarr store ``path``: written under a temporary name in the
    same folder, then renamed onto ``path`` (an existing store is replaced only when
    ``overwrite``)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists")
    work = temp_dir(path)
    try:
        store = work / path.name
        with _unsharded_zarr_tables():
            sdata.write(store)
        if path.exists():
            os.replace(path, work / "old")
        os.replace(store, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("SpatialData -> %s", path)
    return path
