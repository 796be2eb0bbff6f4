"""Outline smoothing of a label image: each pixel goes to the cell (or the background)
whose Gaussian-smoothed indicator is largest there.

Borders drawn along transcript densities follow single spots: a cell bulges toward a
spot just outside it and dents where none fell inside. Smoothing every cell's indicator
(1 on the cell, 0 elsewhere) and the background's with the same Gaussian, then giving
each pixel to the largest, removes bulges and dents narrower than about the Gaussian's
width and keeps broader shape: a straight border stays where it is, and the area a cell
covers is kept on average (background competes like any cell, so where two cells meet
no gap opens). Beyond the image edge nothing is known: every indicator is 0 there
(a normalised convolution, whose common normaliser does not change which is largest), so
cells and background meet the edge as they are.

Guarantees: every input cell keeps its id and at least one connected piece (its largest
after smoothing; a cell that smoothing would erase keeps its input pixels), and no new
id appears. Fragments cut off a cell go to the background.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

TRUNCATE = 4.0  # Gaussian support in widths (scipy's default)


def _padded(box: tuple[slice, slice], pad: int, shape: tuple[int, int]) -> tuple[slice, slice]:
    return (slice(max(box[0].start - pad, 0), min(box[0].stop + pad, shape[0])),
            slice(max(box[1].start - pad, 0), min(box[1].stop + pad, shape[1])))


def smooth_outlines(labels: np.ndarray, sigma_px: float) -> np.ndarray:
    """Labels (H, W) int with outlines smoothed at width ``sigma_px`` (pixels).

    Returns an array of the input's dtype; ``sigma_px <= 0`` returns a copy. Cost: one
    Gaussian filter of the image (background) plus one per cell over its bounding box
    padded by ``4 * sigma_px``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 2-D integer image, got {labels.dtype} "
                         f"{labels.shape}")
    if sigma_px <= 0 or not labels.any():
        return labels.copy()
    shape = labels.shape
    pad = int(np.ceil(TRUNCATE * sigma_px)) + 1
    best = ndimage.gaussian_filter((labels == 0).astype(np.float32), sigma_px,
                                   truncate=TRUNCATE, mode="constant")
    out = np.zeros_like(labels)
    boxes = ndimage.find_objects(labels)
    for cell, box in enumerate(boxes, start=1):
        if box is None:
            continue
        win = _padded(box, pad, shape)
        level = ndimage.gaussian_filter((labels[win] == cell).astype(np.float32), sigma_px,
                                        truncate=TRUNCATE, mode="constant")
        here, taken = best[win], out[win]
        wins = level > here
        here[wins] = level[wins]
        taken[wins] = cell
    restored = 0
    for cell, box in enumerate(boxes, start=1):
        if box is None:
            continue
        win = _padded(box, pad, shape)
        mine = out[win] == cell
        pieces, n = ndimage.label(mine)
        if n == 0:  # erased: keep the input pixels
            restored += 1
            out[win][labels[win] == cell] = cell
        elif n > 1:  # fragments go to the background
            sizes = np.bincount(pieces.ravel())
            sizes[0] = 0
            out[win][mine & (pieces != int(np.argmax(sizes)))] = 0
    if restored:
        logger.debug("smooth_outlines: %d cell(s) narrower than the smoothing kept as they were",
                     restored)
    return out
