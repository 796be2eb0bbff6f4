"""Transcript density of an image and its cell / background levels (per µm²), for the
growth of :mod:`GeneSegNet.growth.grow`: the smoothed density map, the threshold between
background and cells, whether the transcripts are dense enough to place borders between
touching cells, and the growth distance pooled over all cells where they are not.

Spots: continuous (row, col) px; a spot's pixel is ``(floor(row), floor(col))``; spots
outside the image are ignored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from GeneSegNet.errors import InputError
from GeneSegNet.growth.params import BORDER_MODES, GrowParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DensityLevels:
    """Transcript density levels of one image (per µm²) and the smoothed map."""

    sigma_um: float
    cell_per_um2: float
    background_per_um2: float
    threshold_per_um2: float
    density_per_um2: np.ndarray  # (H, W) float64


def check_labels(labels: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(labels)
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"{name} must be a 2-D integer label image, got {array.dtype} "
                         f"{array.shape}")
    if array.size and array.min() < 0:
        raise InputError(f"{name} has negative ids; 0 is background")
    return array.astype(np.int64)


def spot_pixels_in(rows_px: np.ndarray, cols_px: np.ndarray, shape: tuple[int, int]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, col) int pixels of the in-image spots and the (N,) bool in-image mask."""
    rows = np.floor(np.asarray(rows_px, dtype=np.float64))
    cols = np.floor(np.asarray(cols_px, dtype=np.float64))
    if rows.shape != cols.shape or rows.ndim != 1:
        raise InputError(f"rows_px and cols_px must be 1-D of equal length, got {rows.shape} "
                         f"and {cols.shape}")
    with np.errstate(invalid="ignore"):
        inside = (rows >= 0) & (cols >= 0) & (rows < shape[0]) & (cols < shape[1])
    return rows[inside].astype(np.int64), cols[inside].astype(np.int64), inside


def spot_counts(rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) float64 spots per pixel."""
    flat = np.bincount(rows * shape[1] + cols, minlength=shape[0] * shape[1])
    return flat.reshape(shape).astype(np.float64)


def estimate_levels(labels: np.ndarray, rows_px: np.ndarray, cols_px: np.ndarray, *,
                    pixel_size_um: float, params: GrowParams | None = None) -> DensityLevels:
    """Smoothed transcript density and its cell / background / threshold levels (per µm²)."""
    params = params or GrowParams()
    labels = check_labels(labels, "labels")
    rows, cols, _ = spot_pixels_in(rows_px, cols_px, labels.shape)
    counts = spot_counts(rows, cols, labels.shape)
    pixel_area = pixel_size_um ** 2
    in_cells = labels > 0
    if in_cells.any():
        raw_cell = counts[in_cells].sum() / (in_cells.sum() * pixel_area)
    else:
        raw_cell = counts.sum() / (counts.size * pixel_area)
    raw_cell = max(raw_cell, 1e-12)
    sigma_um = float(np.clip(np.sqrt(params.density_kernel_count / (2 * np.pi * raw_cell)),
                             params.density_sigma_min_um, params.density_sigma_max_um))
    density = ndimage.gaussian_filter(counts, sigma_um / pixel_size_um, mode="reflect")
    density /= pixel_area
    cell_level = float(np.median(density[in_cells])) if in_cells.any() else \
        float(np.quantile(density, 0.9))
    far_px = (params.max_growth_um + params.background_margin_um) / pixel_size_um
    far = ndimage.distance_transform_edt(~in_cells) > far_px if in_cells.any() else \
        np.ones(labels.shape, dtype=bool)
    pool = density[far] if far.mean() >= params.min_background_fraction else density.ravel()
    background = float(np.quantile(pool, params.background_quantile))
    background = min(background, cell_level)
    threshold = background + params.foreground_fraction * (cell_level - background)
    logger.debug("density levels /µm²: cell %.3g, background %.3g, threshold %.3g "
                 "(sigma %.2f µm)", cell_level, background, threshold, sigma_um)
    return DensityLevels(sigma_um, cell_level, background, threshold, density)


def border_by_distance(cell_per_um2: float, params: GrowParams) -> bool:
    """Whether borders between touching cells go by distance alone (``params.border_mode``;
    "auto": when a disc of radius ``max_growth_um`` at the in-cell density holds fewer
    than ``min_transcripts_per_cell`` transcripts, too few to place a border)."""
    if params.border_mode not in BORDER_MODES:
        raise InputError(f"border_mode must be one of {BORDER_MODES}, got {params.border_mode!r}")
    if params.border_mode != "auto":
        return params.border_mode == "distance"
    expected = cell_per_um2 * np.pi * params.max_growth_um ** 2
    return not expected >= params.min_transcripts_per_cell


def pooled_growth_um(labels: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                     pixel_size_um: float, params: GrowParams, step_um: float = 0.25) -> float:
    """How far cells extend beyond their labels, from the transcripts of all cells pooled.

    Transcripts are counted in rings at distance d outside the labels, in steps of
    ``step_um`` out to ``max_growth_um + background_margin_um``. Cells end where the
    density changes from the in-cell rate to the background rate: the growth distance R
    is the change point of a two-rate Poisson model (the R that maximises
    ``N1 log(N1/A1) + N2 log(N2/A2)`` with counts N and areas A inside and beyond R, the
    inner rate higher), at most ``max_growth_um``. Pooled over every cell, it is stable
    even at a few transcripts per cell. Spots: int pixel (rows, cols) inside the image.
    """
    outside = ndimage.distance_transform_edt(labels == 0) * pixel_size_um  # µm
    reach = params.max_growth_um + params.background_margin_um
    edges = np.arange(step_um, reach + step_um / 2, step_um)
    ring = np.searchsorted(edges, outside, side="left")  # k: (edges[k-1], edges[k]]
    ring[labels > 0] = edges.size  # labelled pixels: not counted
    n = np.bincount(ring[rows, cols], minlength=edges.size + 1)[:edges.size].astype(float)
    a = np.bincount(ring.ravel(), minlength=edges.size + 1)[:edges.size] * pixel_size_um ** 2
    n1, a1 = np.cumsum(n), np.cumsum(a)
    n2, a2 = n1[-1] - n1, a1[-1] - a1
    with np.errstate(divide="ignore", invalid="ignore"):
        rate1, rate2 = n1 / a1, n2 / a2
        ll = (np.where(n1 > 0, n1 * np.log(rate1), 0.0)
              + np.where(n2 > 0, n2 * np.log(rate2), 0.0))
    ok = (edges <= params.max_growth_um + 1e-9) & (a1 > 0) & (a2 > 0) & (rate1 > rate2)
    if not ok.any():
        return float(params.max_growth_um)
    return float(edges[np.flatnonzero(ok)[np.argmax(ll[ok])]])
