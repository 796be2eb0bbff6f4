"""AnnData ``.h5ad`` of one sample: cells × genes transcript counts with per-cell data.

Layout (``X`` int32 scipy CSR, cells ascending by id):

- ``obs`` indexed by str(cell_id): ``cell_id`` (int64, the label value), ``area_um2``,
  ``transcript_count`` (transcripts of non-control genes in the cell = row sum of X),
  ``control_count`` (control-probe transcripts in the cell), ``centroid_x_um``,
  ``centroid_y_um`` (mean pixel centre, x = column; pixel (r, c) covers [c, c+1) ×
  [r, r+1), so its centre is c + 0.5), ``mean_dapi`` (mean image intensity over the cell);
- ``var`` indexed by gene name (control probes, :mod:`.controls`, left out);
- ``obsm["spatial"]`` (K, 2) float64 centroids (x, y) in µm;
  ``obsm["chromatin"]`` (K, F) float32 (:func:`.features.chromatin_features`);
- ``uns["genesegnet"]``: pixel size, units, the names of the chromatin features and
  what they were computed over, the control-probe counts and the run's settings (JSON).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import GeneSegNet
from GeneSegNet.export.controls import CONTROL_PATTERNS, control_mask
from GeneSegNet.export.features import CHROMATIN_FEATURES, basic_measurements, chromatin_features
from GeneSegNet.io import atomic_path

logger = logging.getLogger(__name__)


def count_matrix(cell_ids: np.ndarray, genes: np.ndarray, ids: np.ndarray):
    """Cells × genes counts.

    Parameters
    ----------
    cell_ids : (N,) cell id of each transcript (0 = background, not counted).
    genes : (N,) gene name of each transcript.
    ids : (K,) cell ids, the rows.

    Returns
    -------
    matrix : scipy CSR (K, G) int32 of non-control genes;
    gene_names : (G,) sorted non-control gene names;
    control_per_cell : (K,) int64 control-probe transcripts per cell;
    controls : dict with ``n_total``, ``n_in_cells``, ``n_background`` and ``per_probe``
        (name -> [in cells, on background]).
    """
    import scipy.sparse as sp

    ids = np.asarray(ids, dtype=np.int64)
    cell_ids = np.asarray(cell_ids, dtype=np.int64)
    codes, names = pd.factorize(pd.Series(genes).astype(str), sort=True)
    names = np.asarray(names, dtype=object)
    is_control = control_mask(names)
    top = int(max(cell_ids.max(initial=0), ids.max(initial=0)))
    lut = np.full(top + 1, -1, dtype=np.int64)
    lut[ids] = np.arange(len(ids))
    rows = np.where(cell_ids > 0, lut[np.clip(cell_ids, 0, top)], -1)
    in_cell = rows >= 0
    ctrl = is_control[codes]
    per_probe_in = np.bincount(codes[in_cell & ctrl], minlength=len(names))
    per_probe_out = np.bincount(codes[~in_cell & ctrl], minlength=len(names))
    controls = {
        "n_total": int(ctrl.sum()),
        "n_in_cells": int((in_cell & ctrl).sum()),
        "n_background": int((~in_cell & ctrl).sum()),
        "per_probe": {str(names[g]): [int(per_probe_in[g]), int(per_probe_out[g])]
                      for g in np.flatnonzero(is_control)},
    }
    control_per_cell = np.bincount(rows[in_cell & ctrl], minlength=len(ids)).astype(np.int64)
    gene_col = np.cumsum(~is_control) - 1
    keep = in_cell & ~ctrl
    matrix = sp.csr_matrix(
        (np.ones(int(keep.sum()), dtype=np.int32), (rows[keep], gene_col[codes[keep]])),
        shape=(len(ids), int((~is_control).sum())), dtype=np.int32)
    matrix.sum_duplicates()
    return matrix, names[~is_control], control_per_cell, controls


def build_anndata(labels: np.ndarray, cell_ids: np.ndarray, genes: np.ndarray, *,
                  pixel_size_um: float, image: np.ndarray | None = None,
                  nuclei: np.ndarray | None = None, ids: np.ndarray | None = None,
                  polygons: np.ndarray | None = None,
                  settings: Mapping[str, Any] | None = None, sample: str = ""):
    """The AnnData of one sample (see the module docstring).

    labels : (H, W) cell labels; cell_ids, genes : (N,) per transcript (cell id 0 =
    background); pixel_size_um : µm per px; image : (H, W) DAPI (mean_dapi and chromatin
    features need it; NaN without); nuclei : optional (H, W) nucleus labels with the cell's
    id (chromatin features then use nuclei); ids : the cells (default: all ids in labels);
    polygons : (K,) cell polygons in px for ``ids`` (hull of the solidity feature).
    """
    import anndata as ad
    import fastremap

    if ids is None:
        ids = fastremap.unique(labels)
        ids = ids[ids != 0].astype(np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    matrix, gene_names, control_per_cell, controls = count_matrix(cell_ids, genes, ids)
    basic = basic_measurements(labels, ids, image)
    px = float(pixel_size_um)
    obs = pd.DataFrame({
        "cell_id": ids,
        "area_um2": basic["area_px"] * px * px,
        "transcript_count": np.asarray(matrix.sum(axis=1)).ravel().astype(np.int64),
        "control_count": control_per_cell,
        "centroid_x_um": basic["centroid_x_px"] * px,
        "centroid_y_um": basic["centroid_y_px"] * px,
        "mean_dapi": basic.get("mean_intensity", np.full(len(ids), np.nan)),
    }, index=pd.Index([str(i) for i in ids], name="cell"))
    var = pd.DataFrame(index=pd.Index([str(g) for g in gene_names], name="gene"))
    adata = ad.AnnData(X=matrix, obs=obs, var=var)
    adata.obsm["spatial"] = obs[["centroid_x_um", "centroid_y_um"]].to_numpy(np.float64)
    source = "none"
    if image is not None:
        objects, source = (nuclei, "nuclei") if nuclei is not None else (labels, "cells")
        adata.obsm["chromatin"] = chromatin_features(
            objects, image, ids, polygons=None if nuclei is not None else polygons)
    else:
        adata.obsm["chromatin"] = np.full((len(ids), len(CHROMATIN_FEATURES)), np.nan,
                                          dtype=np.float32)
    adata.uns["genesegnet"] = {
        "sample": sample,
        "package_version": GeneSegNet.__version__,
        "pixel_size_um": px,
        "spatial_units": "um",
        "obsm_spatial": "cell centroid (x, y) in micrometres; x = image column, y = row; "
                        "pixel (r, c) covers [c, c+1) x [r, r+1)",
        "chromatin_features": list(CHROMATIN_FEATURES),
        "chromatin_source": source,
        "chromatin_units": "area_px in pixels; intensities in image units",
        "control_patterns": list(CONTROL_PATTERNS),
        "control_probes_total": controls["n_total"],
        "control_probes_in_cells": controls["n_in_cells"],
        "control_probes_background": controls["n_background"],
        "control_probes_per_name": json.dumps(controls["per_probe"], ensure_ascii=False),
        "settings": json.dumps(dict(settings or {}), default=str, ensure_ascii=False),
    }
    return adata


def write_h5ad(path: str | Path, adata) -> Path:
    """Write ``adata`` to ``path`` atomically (compressed with gzip)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp, compression="gzip")
    logger.info("%d cells × %d genes -> %s", adata.n_obs, adata.n_vars, path)
    return path
