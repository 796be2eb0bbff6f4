"""Writers of segmentation results in the formats other spatial-omics tools read.

Each writer is atomic (temporary name beside the target, then rename) and imports its
optional libraries only when called, so ``import GeneSegNet.export`` stays light.

Outputs selectable with ``--outputs`` (:data:`OUTPUT_KINDS`):

- ``csv``: upstream's mapping CSV (``cell_id,spotX,spotY,gene`` + confidence columns)
  and ``<sample>_cell_by_gene.csv`` (:mod:`GeneSegNet.mapping`, :mod:`.confidence`);
- ``h5ad``: AnnData cells × genes (:mod:`.anndata_writer`);
- ``geojson`` / ``geoparquet``: cell polygons (:mod:`.polygons`);
- ``spatialdata``: a SpatialData zarr store (:mod:`.spatialdata_writer`, optional extra);
- ``xenium``: files for ``xeniumranger import-segmentation`` (:mod:`.xenium`);
- ``qc``: QC figures and ``qc.html`` (:mod:`.qc`).
"""

from __future__ import annotations

from GeneSegNet.export.outputs import DEFAULT_OUTPUTS, OUTPUT_KINDS, parse_outputs

__all__ = ["DEFAULT_OUTPUTS", "OUTPUT_KINDS", "parse_outputs"]
