"""Spot heatmaps: the pixel-wise maximum of truncated Gaussians, computed exactly in O(H·W).

For spots at integer pixels s_i, upstream renders

    heat(p) = max_i g(|p - s_i|²),   g(d²) = exp(-d² / 2σ²) if d² / 2σ² <= 4.6052 else 0,

by stacking one full map per spot (O(N·H·W)). Since g decreases with distance, the
maximum is g(D(p)²) with D the Euclidean distance to the nearest spot, which an exact
Euclidean distance transform gives in O(H·W). Spots lie on the integer grid, so D² is an
integer: it is rounded and looked up in a float64 table, so the truncation is exact.
Duplicate spots change nothing; spots outside the window still count when they are
within the cut-off radius (≈ 3.035σ). Float spot coordinates are turned into pixels, and
spots outside the image dropped, by :func:`GeneSegNet.io.spots.spot_pixels` (the rule the
transcript mapping uses too).
"""

from __future__ import annotations

import math

import cv2
import numpy as np

DEFAULT_SIGMA = 7.0
TRUNCATE_EXPONENT = 4.6052  # ln(100): values below 0.01 are cut to 0


def cutoff_radius(sigma: float = DEFAULT_SIGMA, truncate: float = TRUNCATE_EXPONENT) -> float:
    """Largest spot-to-pixel distance (pixels) that still gives a non-zero value."""
    return math.sqrt(2.0 * truncate) * sigma


def _lookup_table(sigma: float, truncate: float) -> np.ndarray:
    """``table[k] = g(k)`` for integer squared distances k = 0..k_max, then one 0."""
    k_max = math.floor(2.0 * sigma * sigma * truncate) + 1
    k = np.arange(k_max + 1, dtype=np.float64)
    exponent = k / (2.0 * sigma * sigma)
    return np.where(exponent > truncate, 0.0, np.exp(-exponent)).astype(np.float32)


def render_heatmap(
    rows: np.ndarray,
    cols: np.ndarray,
    shape: tuple[int, int],
    sigma: float = DEFAULT_SIGMA,
    truncate: float = TRUNCATE_EXPONENT,
    origin: tuple[int, int] = (0, 0),
) -> np.ndarray:
    """Render the max-of-truncated-Gaussians heatmap of integer spots.

    Parameters
    ----------
    rows, cols : integer pixel coordinates (y, x) of the spots, in the same frame as
        ``origin`` (for example whole-image coordinates).
    shape : (H, W) of the window to render.
    sigma : Gaussian standard deviation in pixels.
    truncate : exponent above which the value is 0 (strict comparison, as upstream).
    origin : (row, col) of the window's top-left pixel in the spots' frame; spots outside
        the window but within the cut-off radius still contribute.

    Returns
    -------
    heatmap : ndarray of shape (H, W), float32, values in [0, 1].
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    height, width = int(shape[0]), int(shape[1])
    pad = math.floor(cutoff_radius(sigma, truncate)) + 1
    local_r = np.asarray(rows, dtype=np.int64) - int(origin[0]) + pad
    local_c = np.asarray(cols, dtype=np.int64) - int(origin[1]) + pad
    keep = (local_r >= 0) & (local_r < height + 2 * pad) & (local_c >= 0) & (
        local_c < width + 2 * pad)
    if not keep.any():
        return np.zeros((height, width), dtype=np.float32)
    canvas = np.ones((height + 2 * pad, width + 2 * pad), dtype=np.uint8)
    canvas[local_r[keep], local_c[keep]] = 0
    distance = cv2.distanceTransform(canvas, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    del canvas
    distance = distance[pad: pad + height, pad: pad + width]
    table = _lookup_table(sigma, truncate)
    np.minimum(distance, math.sqrt(len(table) - 1), out=distance)
    np.multiply(distance, distance, out=distance)
    squared = np.rint(distance).astype(np.int32 if len(table) > 2**15 else np.int16)
    del distance
    return table[squared]


def heatmap_to_uint8(heatmap: np.ndarray) -> np.ndarray:
    """Quantise a [0, 1] heatmap to uint8 with round-to-nearest and saturation (×255)."""
    return np.clip(np.rint(heatmap * 255.0), 0, 255).astype(np.uint8)
