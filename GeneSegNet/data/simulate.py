"""Simulated spatial-transcriptomics tissue with known truth, for demos and tests.

Each sample has
- a DAPI-like nuclear image: nuclei (ellipses inside their cells) with per-cell
  brightness, a fraction of them dim, blurred, on a noisy background;
- true cell masks: a Voronoi tessellation of the nucleus centres, each cell clipped to
  a jagged radius well beyond its nucleus, with tissue gaps without cells;
- transcripts drawn uniformly inside each cell from its cell type's gene profile, plus
  uniform background noise;
- noisy starting labels, as users typically have: the detectable (not dim) nuclei,
  expanded by a few pixels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from skimage.segmentation import expand_labels

from GeneSegNet.io import staged_directory, write_image, write_label

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TissueConfig:
    """Parameters of one simulated image (lengths in pixels)."""

    height: int = 512
    width: int = 512
    min_center_distance: float = 17.0
    cell_radius: tuple[float, float] = (10.0, 15.0)
    nucleus_fraction: tuple[float, float] = (0.4, 0.6)  # nucleus radius / cell radius
    n_cell_types: int = 4
    n_genes: int = 24
    transcripts_per_pixel: float = 0.08
    noise_fraction: float = 0.1  # of all transcripts, uniform over the image
    dim_fraction: float = 0.2
    label_expansion: int = 3
    detection_threshold: float = 0.35  # nuclei dimmer than this are missing in the labels
    gap_fraction: float = 0.15  # approximate fraction of the image without tissue


@dataclass
class SimulatedSample:
    image: np.ndarray  # (H, W) uint8 nuclear stain
    cells: np.ndarray  # (H, W) int32 true cell ids
    nuclei: np.ndarray  # (H, W) int32 nucleus ids (same id as the cell)
    labels: np.ndarray  # (H, W) int32 noisy starting labels (expanded detectable nuclei)
    spots: pd.DataFrame  # x, y, gene, cell_id (true source cell, 0 = noise)
    cell_types: np.ndarray  # (n_cells + 1,) type of each cell id, -1 for id 0


def _poisson_disk_centres(cfg: TissueConfig, rng: np.random.Generator) -> np.ndarray:
    """Dart throwing on a grid: (n, 2) float (row, col) centres at least min distance apart."""
    d = cfg.min_center_distance
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
    # Tissue gaps: drop the cells whose centre falls in low regions of a smooth random field.
    field = ndimage.gaussian_filter(rng.normal(size=(cfg.height, cfg.width)), 30.0)
    tissue = field > np.quantile(field, cfg.gap_fraction)
    return centres[tissue[centres[:, 0].astype(int), centres[:, 1].astype(int)]]


def _cells_and_nuclei(cfg: TissueConfig, centres: np.ndarray, rng: np.random.Generator
                      ) -> tuple[np.ndarray, np.ndarray]:
    shape = (cfg.height, cfg.width)
    n = len(centres)
    seeds = np.zeros(shape, dtype=bool)
    rows = np.clip(centres[:, 0].astype(int), 0, cfg.height - 1)
    cols = np.clip(centres[:, 1].astype(int), 0, cfg.width - 1)
    seeds[rows, cols] = True
    seed_id = np.zeros(shape, dtype=np.int32)
    seed_id[rows, cols] = np.arange(1, n + 1)
    distance, (near_r, near_c) = ndimage.distance_transform_edt(~seeds, return_indices=True)
    owner = seed_id[near_r, near_c]
    radius = np.concatenate([[0.0], rng.uniform(*cfg.cell_radius, size=n)])
    jitter = ndimage.gaussian_filter(rng.normal(size=shape), 4.0)
    jitter /= max(np.abs(jitter).max(), 1e-9)
    cells = np.where(distance <= radius[owner] * (1.0 + 0.25 * jitter), owner, 0).astype(np.int32)
    rr, cc = np.mgrid[: cfg.height, : cfg.width]
    frac = rng.uniform(*cfg.nucleus_fraction, size=n)
    aspect = rng.uniform(0.75, 1.0, size=n)
    angle = rng.uniform(0, np.pi, size=n)
    dy, dx = rr - centres[owner - 1, 0], cc - centres[owner - 1, 1]
    a = (radius[owner] * np.concatenate([[0.0], frac])[owner])
    b = a * np.concatenate([[1.0], aspect])[owner]
    th = np.concatenate([[0.0], angle])[owner]
    u = dy * np.cos(th) + dx * np.sin(th)
    v = -dy * np.sin(th) + dx * np.cos(th)
    with np.errstate(divide="ignore", invalid="ignore"):
        inside = (u / np.maximum(a, 1e-9)) ** 2 + (v / np.maximum(b, 1e-9)) ** 2 <= 1.0
    nuclei = np.where(inside & (cells > 0), cells, 0).astype(np.int32)
    return cells, nuclei


def _render_image(cfg: TissueConfig, nuclei: np.ndarray, brightness: np.ndarray,
                  rng: np.random.Generator) -> np.ndarray:
    texture = 1.0 + 0.2 * ndimage.gaussian_filter(rng.normal(size=nuclei.shape), 1.0)
    signal = brightness[nuclei] * texture * (nuclei > 0)
    signal = ndimage.gaussian_filter(signal, 1.2)
    image = 0.06 + 0.85 * signal + rng.normal(0.0, 0.03, size=nuclei.shape)
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


def _transcripts(cfg: TissueConfig, cells: np.ndarray, types: np.ndarray,
                 rng: np.random.Generator) -> pd.DataFrame:
    profiles = rng.dirichlet(np.full(cfg.n_genes, 0.3), size=cfg.n_cell_types)
    genes = np.array([f"Gene{g:02d}" for g in range(cfg.n_genes)])
    flat = cells.ravel()
    order = np.argsort(flat, kind="stable")
    bounds = np.searchsorted(flat[order], np.arange(1, len(types) + 1))
    xs, ys, gs, ids = [], [], [], []
    for cell_id in range(1, len(types)):
        pixels = order[bounds[cell_id - 1]: bounds[cell_id]]
        if pixels.size == 0:
            continue
        count = rng.poisson(cfg.transcripts_per_pixel * pixels.size)
        chosen = rng.choice(pixels, size=count)
        ys.append(chosen // cfg.width + rng.uniform(0, 1, count))
        xs.append(chosen % cfg.width + rng.uniform(0, 1, count))
        gs.append(rng.choice(cfg.n_genes, size=count, p=profiles[types[cell_id]]))
        ids.append(np.full(count, cell_id))
    n_cell_spots = int(sum(len(i) for i in ids))
    n_noise = int(round(n_cell_spots * cfg.noise_fraction / max(1e-9, 1 - cfg.noise_fraction)))
    ys.append(rng.uniform(0, cfg.height, n_noise))
    xs.append(rng.uniform(0, cfg.width, n_noise))
    gs.append(rng.integers(0, cfg.n_genes, n_noise))
    ids.append(np.zeros(n_noise, dtype=np.int64))
    table = pd.DataFrame({
        "x": np.round(np.concatenate(xs), 2),
        "y": np.round(np.concatenate(ys), 2),
        "gene": genes[np.concatenate(gs)],
        "cell_id": np.concatenate(ids),
    })
    return table.iloc[rng.permutation(len(table))].reset_index(drop=True)


def simulate_tissue(cfg: TissueConfig = TissueConfig(), rng: np.random.Generator | int | None = None
                    ) -> SimulatedSample:
    """Simulate one tissue image with its truth (see the module docstring)."""
    rng = np.random.default_rng(rng)
    centres = _poisson_disk_centres(cfg, rng)
    cells, nuclei = _cells_and_nuclei(cfg, centres, rng)
    n = len(centres)
    dim = rng.uniform(size=n) < cfg.dim_fraction
    brightness = np.concatenate([[0.0], np.where(dim, rng.uniform(0.1, 0.25, n),
                                                  rng.uniform(0.6, 1.0, n))])
    image = _render_image(cfg, nuclei, brightness, rng)
    detected = np.where(brightness[nuclei] >= cfg.detection_threshold, nuclei, 0)
    labels = expand_labels(detected, cfg.label_expansion).astype(np.int32)
    types = np.concatenate([[-1], rng.integers(0, cfg.n_cell_types, n)])
    spots = _transcripts(cfg, cells, types, rng)
    return SimulatedSample(image, cells, nuclei, labels, spots, types)


def write_simulated_dataset(out_dir: str | Path, n_samples: int = 4,
                            cfg: TissueConfig = TissueConfig(), seed: int = 0,
                            overwrite: bool = False) -> Path:
    """Write ``n_samples`` simulated images in upstream's raw layout, plus the truth::

        out/images/<name>.png   out/labels/<name>.png   out/spots/<name>.csv
        out/truth/<name>_cells.png   <name>_nuclei.png   <name>_spots.csv (with cell_id)

    The folder is built under a temporary name and renamed when complete.
    """
    out_dir = Path(out_dir)
    with staged_directory(out_dir, overwrite=overwrite) as stage:
        for sub in ("images", "labels", "spots", "truth"):
            (stage / sub).mkdir()
        for index in range(n_samples):
            name = f"sample_{index:02d}"
            sample = simulate_tissue(cfg, np.random.default_rng([seed, index]))
            write_image(stage / "images" / f"{name}.png", sample.image)
            write_label(stage / "labels" / f"{name}.png", sample.labels)
            write_label(stage / "truth" / f"{name}_cells.png", sample.cells)
            write_label(stage / "truth" / f"{name}_nuclei.png", sample.nuclei)
            upstream = sample.spots.rename(columns={"x": "spotX", "y": "spotY"})
            upstream[["spotX", "spotY", "gene"]].to_csv(stage / "spots" / f"{name}.csv",
                                                        index=False)
            upstream.to_csv(stage / "truth" / f"{name}_spots.csv", index=False)
            logger.info("simulated %s: %d cells, %d labelled nuclei, %d transcripts", name,
                        int(sample.cells.max()), len(np.unique(sample.labels)) - 1,
                        len(sample.spots))
    return out_dir
