"""Write every requested output of one segmented sample (the ``--outputs`` switch).

:func:`write_sample_outputs` maps the transcripts once, traces the cell polygons once
and builds the AnnData once, then hands them to the writers of :mod:`GeneSegNet.export`.
Files, all in ``folder`` (each written atomically):

=============  ==========================================================================
csv            ``<name>.csv`` (``cell_id,spotX,spotY,gene`` first, as upstream, then
               ``cell_probability`` (with a probability map), ``boundary_distance_um``
               (``_px`` without a pixel size), ``nearest_cell_id``) and
               ``<name>_cell_by_gene.csv``
h5ad           ``<name>.h5ad``
geojson        ``<name>_cells.geojson`` (QuPath, pixels)
geoparquet     ``<name>_cells.parquet`` (GeoParquet 1.0, pixels)
spatialdata    ``<name>.zarr``
xenium         ``xenium/<name>_cells.tif``, ``..._transcript_assignment.csv``,
               ``..._cell_polygons_um.geojson``
qc             ``<name>_qc/qc.html`` and its figures
=============  ==========================================================================
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from GeneSegNet.errors import InputError
from GeneSegNet.export.outputs import parse_outputs
from GeneSegNet.io import atomic_path
from GeneSegNet.io.metadata import check_pixel_size

logger = logging.getLogger(__name__)

NEEDS_PIXEL_SIZE = ("h5ad", "spatialdata", "xenium", "qc")


@dataclass
class SampleOutput:
    """What the writers need of one segmented sample.

    labels : (H, W) int cell labels (0 = background).
    image : (H, W) DAPI or (H, W, C) image, or None.
    pixel_size_um : µm per px, or None (then only px outputs: csv, geojson, geoparquet).
    cell_logit : (H, W) cell-probability logits of the network, or None.
    nuclei : (H, W) nucleus labels carrying their cell's id, or None.
    settings : the run's settings (recorded in the h5ad).
    """

    labels: np.ndarray
    image: np.ndarray | None = None
    pixel_size_um: float | None = None
    cell_logit: np.ndarray | None = None
    nuclei: np.ndarray | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)


def check_export_settings(outputs: Iterable[str] | str, pixel_sizes: Mapping[str, float | None]
                          ) -> tuple[str, ...]:
    """Check before a run that every sample has the pixel size its µm ``outputs`` need.

    pixel_sizes : sample name -> µm/px or None. Raises InputError naming the samples.
    """
    kinds = parse_outputs(outputs)
    needs = [k for k in kinds if k in NEEDS_PIXEL_SIZE]
    missing = sorted(name for name, px in pixel_sizes.items() if px is None)
    if needs and missing:
        raise InputError(f"--outputs {','.join(needs)} need the pixel size (µm/px) of "
                         f"{', '.join(missing[:5])}: give --pixel_size or a "
                         "metadata/<sample>.json")
    if "spatialdata" in kinds:
        from GeneSegNet.export.spatialdata_writer import spatialdata_available

        if not spatialdata_available():
            raise InputError("--outputs spatialdata needs the optional extra: "
                             "pip install 'spatialdata<0.8'")
    return kinds


def empty_spots() -> pd.DataFrame:
    return pd.DataFrame({"x": np.zeros(0), "y": np.zeros(0), "gene": np.zeros(0, dtype=object)})


def mapping_table(sample: SampleOutput, spots: pd.DataFrame,
                  out_of_bounds: str = "background", confidence: bool = True) -> pd.DataFrame:
    """Upstream's mapping table (sorted by cell id) with the confidence columns appended."""
    from GeneSegNet.export.confidence import transcript_confidence
    from GeneSegNet.mapping import map_transcripts

    table = map_transcripts(sample.labels, spots, out_of_bounds).table
    if not confidence:
        return table
    extra = transcript_confidence(
        sample.labels, table["spotX"].to_numpy(), table["spotY"].to_numpy(),
        cell_logit=sample.cell_logit, pixel_size_um=sample.pixel_size_um)
    extra.index = table.index
    return pd.concat([table, extra], axis=1)


def write_mapping_csv(folder: Path, name: str, labels: np.ndarray, table: pd.DataFrame
                      ) -> list[Path]:
    """``<name>.csv`` (the table) and ``<name>_cell_by_gene.csv``, atomically."""
    from GeneSegNet.mapping import cell_by_gene_counts

    out = folder / f"{name}.csv"
    with atomic_path(out) as tmp:
        table.to_csv(tmp, index=False, float_format="%.10g")
    counts = cell_by_gene_counts(labels, table["cell_id"].to_numpy(), table["gene"].to_numpy())
    with atomic_path(folder / f"{name}_cell_by_gene.csv") as tmp:
        counts.to_csv(tmp)
    return [out, folder / f"{name}_cell_by_gene.csv"]


def write_sample_outputs(sample: SampleOutput, spots: pd.DataFrame | None, folder: str | Path,
                         name: str, outputs: Iterable[str] | str = ("csv",), *,
                         out_of_bounds: str = "background") -> dict[str, list[Path]]:
    """Write the ``outputs`` of one sample into ``folder``; returns the paths per kind.

    spots : x, y (px; x = column), gene (+ optional transcript_id); None: no transcripts.
    Raises InputError when a µm output is requested without a pixel size, or when the
    labels are not a 2-D integer image.
    """
    kinds = parse_outputs(outputs if not isinstance(outputs, str) else outputs)
    folder = Path(folder)
    labels = np.asarray(sample.labels)
    if labels.ndim != 2 or labels.dtype.kind not in "iu":
        raise InputError(f"{name}: labels must be a 2-D integer image, got {labels.dtype} "
                         f"{labels.shape}")
    needs_um = [k for k in kinds if k in NEEDS_PIXEL_SIZE]
    if needs_um:
        check_pixel_size(sample.pixel_size_um, f"{name}: outputs {needs_um}")
    if not labels.any():
        logger.warning("%s: the label image holds no cell; outputs describe zero cells", name)
    spots = empty_spots() if spots is None else spots
    written: dict[str, list[Path]] = {}
    table = mapping_table(sample, spots, out_of_bounds, confidence="csv" in kinds or
                          "spatialdata" in kinds)
    cell_ids = table["cell_id"].to_numpy()
    genes = table["gene"].to_numpy()
    if "csv" in kinds:
        written["csv"] = write_mapping_csv(folder, name, labels, table)
    ids = polygons = adata = None
    if any(k in kinds for k in ("h5ad", "geojson", "geoparquet", "spatialdata", "xenium", "qc")):
        from GeneSegNet.export.polygons import cell_polygons

        ids, polygons = cell_polygons(labels)
    if any(k in kinds for k in ("h5ad", "spatialdata", "qc")):
        from GeneSegNet.export.anndata_writer import build_anndata

        adata = build_anndata(labels, cell_ids, genes, pixel_size_um=sample.pixel_size_um,
                              image=sample.image, nuclei=sample.nuclei, ids=ids,
                              polygons=polygons, settings=sample.settings, sample=name)
    if "h5ad" in kinds:
        from GeneSegNet.export.anndata_writer import write_h5ad

        written["h5ad"] = [write_h5ad(folder / f"{name}.h5ad", adata)]
    props = None
    if ids is not None:
        props = pd.DataFrame({"area_px": np.bincount(labels.ravel())[ids]}, index=ids)
        if sample.pixel_size_um is not None:
            props["area_um2"] = props["area_px"] * float(sample.pixel_size_um) ** 2
    if "geojson" in kinds:
        from GeneSegNet.export.polygons import write_geojson

        written["geojson"] = [write_geojson(folder / f"{name}_cells.geojson", ids, polygons,
                                            props)]
    if "geoparquet" in kinds:
        from GeneSegNet.export.polygons import write_geoparquet

        written["geoparquet"] = [write_geoparquet(folder / f"{name}_cells.parquet", ids,
                                                  polygons, props)]
    if "spatialdata" in kinds:
        from GeneSegNet.export.spatialdata_writer import (
            CELL_COLUMN,
            build_spatialdata,
            write_spatialdata,
        )

        points = table.rename(columns={"spotX": "x", "spotY": "y", "cell_id": CELL_COLUMN})
        finite = np.isfinite(points["x"].to_numpy()) & np.isfinite(points["y"].to_numpy())
        sdata = build_spatialdata(name, sample.image, labels, ids, polygons, points[finite],
                                  adata, sample.pixel_size_um)
        written["spatialdata"] = [write_spatialdata(folder / f"{name}.zarr", sdata)]
    if "xenium" in kinds:
        from GeneSegNet.export.xenium import write_xenium_inputs

        xen = table.rename(columns={"spotX": "x", "spotY": "y"})
        if "transcript_id" in spots:
            xen = xen.assign(transcript_id=_sorted_column(sample, spots, "transcript_id",
                                                          out_of_bounds))
        written["xenium"] = write_xenium_inputs(folder / "xenium", name, labels, cell_ids, xen,
                                                sample.pixel_size_um, ids, polygons,
                                                sample.nuclei)
    if "qc" in kinds:
        from GeneSegNet.export.qc import write_qc

        written["qc"] = [write_qc(
            folder, name, labels=labels, image=sample.image, x=table["spotX"].to_numpy(),
            y=table["spotY"].to_numpy(), genes=genes, cell_ids=cell_ids,
            areas_um2=adata.obs["area_um2"].to_numpy(),
            counts_per_cell=adata.obs["transcript_count"].to_numpy())]
    return written


def _sorted_column(sample: SampleOutput, spots: pd.DataFrame, column: str,
                   out_of_bounds: str) -> np.ndarray:
    """``spots[column]`` in the row order of the mapping table (sorted by cell id)."""
    from GeneSegNet.mapping import lookup_cell_ids, stable_order

    cell_ids, _, inside = lookup_cell_ids(sample.labels, spots["x"].to_numpy(np.float64),
                                          spots["y"].to_numpy(np.float64))
    keep = np.flatnonzero(inside) if out_of_bounds == "drop" else np.arange(len(spots))
    order = keep[stable_order(cell_ids[keep])]
    return spots[column].to_numpy()[order]
