"""Simulated spatial-transcriptomics tissue with known truth, for demos, tests and benchmarks.

Each sample has
- a DAPI-like nuclear image: elliptical nuclei with chromatin speckle and per-nucleus
  brightness (a fraction of them dim), under a smooth slide-scale brightness field,
  blurred by the optics, with shot and read noise;
- true cell masks: a Voronoi tessellation of the nucleus centres, each cell clipped to
  a jagged maximum radius about twice its nucleus radius, with tissue gaps without cells;
- transcripts drawn uniformly inside each cell from its cell type's gene profile
  (marker genes per type plus shared housekeeping genes), plus uniform background;
- starting labels as users have them from a nucleus segmentation: the detectable (not
  dim) nuclei expanded by ``label_expansion_um``.

Parameters are physical (µm, transcripts per µm²); see ``sim_config`` for the presets.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from skimage.segmentation import expand_labels

from GeneSegNet.data.sim_config import PRESET_NAMES, PRESETS, TissueConfig, preset_config
from GeneSegNet.data.sim_genes import gene_names, gene_profiles, marker_genes, place_transcripts
from GeneSegNet.data.sim_render import brightness_field, render_image, smooth_unit_field
from GeneSegNet.io import staged_directory, write_image, write_label
from GeneSegNet.io.metadata import SampleMetadata, metadata_path, write_metadata

logger = logging.getLogger(__name__)

__all__ = [
    "PRESETS",
    "PRESET_NAMES",
    "SimulatedSample",
    "TissueConfig",
    "gene_names",
    "marker_genes",
    "preset_config",
    "sample_statistics",
    "simulate_tissue",
    "write_simulated_dataset",
]


@dataclass
class SimulatedSample:
    image: np.ndarray  # (H, W) uint8 or uint16 nuclear stain
    cells: np.ndarray  # (H, W) int32 true cell ids 1..n
    nuclei: np.ndarray  # (H, W) int32 nucleus ids (same id as the cell)
    labels: np.ndarray  # (H, W) int32 starting labels (expanded detectable nuclei)
    spots: pd.DataFrame  # x, y (px, x = column), gene, cell_id (true source cell, 0 = noise)
    cell_types: np.ndarray  # (n + 1,) type of each cell id, -1 for id 0
    dim: np.ndarray  # (n + 1,) bool, nucleus below the detection threshold (False for id 0)
    field: np.ndarray  # (H, W) float32 multiplicative brightness field in [1/ratio, 1]
    profiles: np.ndarray  # (n_cell_types, n_genes) expression probabilities
    pixel_size_um: float  # µm per px


def _nucleus_centres(cfg: TissueConfig, rng: np.random.Generator) -> np.ndarray:
    """Dart throwing on a grid: (n, 2) float (row, col) px centres at least the minimum
    distance apart, minus those falling into tissue gaps."""
    d = cfg.um_to_px(cfg.min_center_distance_um)
    cell = d / np.sqrt(2)
    grid_h, grid_w = int(np.ceil(cfg.height / cell)), int(np.ceil(cfg.width / cell))
    grid = -np.ones((grid_h, grid_w), dtype=np.int64)
    candidates = rng.uniform((0, 0), (cfg.height, cfg.width), size=(grid_h * grid_w * 6, 2))
    accepted = np.empty((grid_h * grid_w, 2))
    count = 0
    for point in candidates:
        gr, gc = int(point[0] / cell), int(point[1] / cell)
        window = grid[max(gr - 2, 0): gr + 3, max(gc - 2, 0): gc + 3]
        neighbours = window[window >= 0]
        if neighbours.size and np.min(np.sum((accepted[neighbours] - point) ** 2, axis=1)) < d * d:
            continue
        grid[gr, gc] = count
        accepted[count] = point
        count += 1
    centres = accepted[:count]
    gaps = smooth_unit_field((cfg.height, cfg.width), cfg.um_to_px(cfg.gap_scale_um), rng)
    tissue = gaps > np.quantile(gaps, cfg.gap_fraction)
    return centres[tissue[centres[:, 0].astype(int), centres[:, 1].astype(int)]]


def _cells_and_nuclei(cfg: TissueConfig, centres: np.ndarray, rng: np.random.Generator
                      ) -> tuple[np.ndarray, np.ndarray]:
    """True cells and nuclei (H, W) int32, both numbered 1..n in the order of ``centres``."""
    shape = (cfg.height, cfg.width)
    n = len(centres)
    rows = np.clip(centres[:, 0].astype(int), 0, cfg.height - 1)
    cols = np.clip(centres[:, 1].astype(int), 0, cfg.width - 1)
    seeds = np.ones(shape, dtype=bool)
    seeds[rows, cols] = False
    seed_id = np.zeros(shape, dtype=np.int32)
    seed_id[rows, cols] = np.arange(1, n + 1)
    distance, (near_r, near_c) = ndimage.distance_transform_edt(seeds, return_indices=True)
    owner = seed_id[near_r, near_c]
    # nucleus semi-axes (px) and the cell's maximum radius, per id (index 0 unused)
    major = np.concatenate([[0.0], rng.uniform(*cfg.nucleus_diameter_um, n) / 2])
    minor = major * np.concatenate([[1.0], rng.uniform(*cfg.nucleus_aspect, n)])
    max_radius = np.sqrt(major * minor) * np.concatenate([[0.0], rng.uniform(
        *cfg.cell_nucleus_ratio, n)])
    angle = np.concatenate([[0.0], rng.uniform(0, np.pi, n)])
    major, minor, max_radius = (cfg.um_to_px(v) for v in (major, minor, max_radius))
    jitter = smooth_unit_field(shape, cfg.um_to_px(cfg.jitter_scale_um), rng)
    cells = np.where(distance <= max_radius[owner] * (1.0 + cfg.boundary_jitter * jitter),
                     owner, 0).astype(np.int32)
    rr, cc = np.mgrid[: cfg.height, : cfg.width]
    dy = rr - centres[owner - 1, 0]
    dx = cc - centres[owner - 1, 1]
    th = angle[owner]
    u = dy * np.cos(th) + dx * np.sin(th)
    v = -dy * np.sin(th) + dx * np.cos(th)
    a, b = np.maximum(major[owner], 1e-9), np.maximum(minor[owner], 1e-9)
    inside = (u / a) ** 2 + (v / b) ** 2 <= 1.0
    nuclei = np.where(inside & (cells > 0), cells, 0).astype(np.int32)
    return _renumber(cells, nuclei)


def _renumber(cells: np.ndarray, nuclei: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop cells with no nucleus pixel (tiny seeds at gaps); keep ids consecutive 1..n."""
    keep = np.unique(nuclei[nuclei > 0])
    lookup = np.zeros(int(cells.max()) + 1, dtype=np.int32)
    lookup[keep] = np.arange(1, keep.size + 1, dtype=np.int32)
    return lookup[cells], lookup[nuclei]


def simulate_tissue(cfg: TissueConfig | None = None,
                    rng: np.random.Generator | int | None = None) -> SimulatedSample:
    """Simulate one tissue image with its truth (see the module docstring)."""
    cfg = TissueConfig() if cfg is None else cfg
    rng = np.random.default_rng(rng)
    centres = _nucleus_centres(cfg, rng)
    cells, nuclei = _cells_and_nuclei(cfg, centres, rng)
    n = int(cells.max())
    dim = np.concatenate([[False], rng.uniform(size=n) < cfg.dim_fraction])
    brightness = np.where(dim, rng.uniform(*cfg.dim_range, n + 1),
                          rng.uniform(*cfg.bright_range, n + 1))
    brightness[0] = 0.0
    field = brightness_field(cfg, rng)
    image = render_image(cfg, nuclei, brightness, field, rng)
    detected = np.where(brightness[nuclei] >= cfg.detection_threshold, nuclei, 0)
    expansion_px = int(round(cfg.um_to_px(cfg.label_expansion_um)))
    labels = expand_labels(detected, expansion_px).astype(np.int32)
    types = np.concatenate([[-1], rng.integers(0, cfg.n_cell_types, n)])
    profiles = gene_profiles(cfg, rng)
    spots = place_transcripts(cfg, cells, types, profiles, rng)
    return SimulatedSample(image, cells, nuclei, labels, spots, types, dim, field, profiles,
                           cfg.pixel_size_um)


def _equivalent_diameters_px(labels: np.ndarray) -> np.ndarray:
    """(n,) diameter of the disk of equal area of each id 1..max present, px."""
    areas = np.bincount(labels.ravel())[1:]
    return 2.0 * np.sqrt(areas[areas > 0] / np.pi)


def sample_statistics(sample: SimulatedSample) -> dict[str, float]:
    """Summary of one sample: cells, dim cells, transcript densities and diameters in µm.

    ``transcripts_per_um2_in_cells`` counts the transcripts whose true source is a cell,
    per µm² of cell area; ``cell_nucleus_ratio`` is mean cell / mean nucleus equivalent
    diameter.
    """
    px_um = sample.pixel_size_um
    cell_area_um2 = float((sample.cells > 0).sum()) * px_um ** 2
    cell_diam = float(_equivalent_diameters_px(sample.cells).mean()) * px_um
    nucleus_diam = float(_equivalent_diameters_px(sample.nuclei).mean()) * px_um
    return {
        "cells": int(sample.cells.max()),
        "dim_cells": int(sample.dim.sum()),
        "transcripts": len(sample.spots),
        "transcripts_per_um2_in_cells": float((sample.spots.cell_id > 0).sum()) / cell_area_um2,
        "transcripts_per_um2_image": len(sample.spots) / (sample.cells.size * px_um ** 2),
        "cell_diameter_um": cell_diam,
        "nucleus_diameter_um": nucleus_diam,
        "cell_nucleus_ratio": cell_diam / nucleus_diam,
    }


def _write_sample(stage: Path, name: str, sample: SimulatedSample, cfg: TissueConfig) -> None:
    write_image(stage / "images" / f"{name}.png", sample.image)
    write_label(stage / "labels" / f"{name}.png", sample.labels)
    write_label(stage / "truth" / f"{name}_cells.png", sample.cells)
    write_label(stage / "truth" / f"{name}_nuclei.png", sample.nuclei)
    upstream = sample.spots.rename(columns={"x": "spotX", "y": "spotY"})
    upstream[["spotX", "spotY", "gene"]].to_csv(stage / "spots" / f"{name}.csv", index=False)
    upstream.to_csv(stage / "truth" / f"{name}_spots.csv", index=False)
    ids = np.arange(1, len(sample.cell_types))
    pd.DataFrame({"cell_id": ids, "cell_type": sample.cell_types[1:],
                  "dim": sample.dim[1:]}).to_csv(stage / "truth" / f"{name}_cell_types.csv",
                                                 index=False)
    write_metadata(metadata_path(stage, name),
                   SampleMetadata(pixel_size_um=cfg.pixel_size_um, platform=cfg.platform))


def write_simulated_dataset(out_dir: str | Path, n_samples: int = 4,
                            cfg: TissueConfig | None = None, seed: int = 0,
                            overwrite: bool = False) -> Path:
    """Write ``n_samples`` simulated images in upstream's raw layout, plus truth and metadata::

        out/images/<name>.png   out/labels/<name>.png   out/spots/<name>.csv
        out/metadata/<name>.json (pixel size in µm/px, platform)
        out/truth/<name>_cells.png   <name>_nuclei.png   <name>_spots.csv (with cell_id)
                  <name>_cell_types.csv (cell_id, cell_type, dim)
        out/truth/simulation.json (the simulation parameters)

    The folder is built under a temporary name and renamed when complete.
    """
    cfg = TissueConfig() if cfg is None else cfg
    out_dir = Path(out_dir)
    with staged_directory(out_dir, overwrite=overwrite) as stage:
        for sub in ("images", "labels", "spots", "truth", "metadata"):
            (stage / sub).mkdir()
        (stage / "truth" / "simulation.json").write_text(
            json.dumps({"seed": seed, **asdict(cfg)}, indent=1))
        for index in range(n_samples):
            name = f"sample_{index:02d}"
            sample = simulate_tissue(cfg, np.random.default_rng([seed, index]))
            _write_sample(stage, name, sample, cfg)
            st = sample_statistics(sample)
            logger.info(
                "simulated %s: %d cells (%d dim, %d labelled), %.3g transcripts/µm² in cells, "
                "cell diameter %.1f µm, nucleus diameter %.1f µm, ratio %.2f",
                name, st["cells"], st["dim_cells"], len(np.unique(sample.labels)) - 1,
                st["transcripts_per_um2_in_cells"], st["cell_diameter_um"],
                st["nucleus_diameter_um"], st["cell_nucleus_ratio"])
    return out_dir
