"""Cells redrawn from their nuclei where transcripts are too sparse to place borders.

At ISS densities (a few transcripts per cell) a network finds cells, dim nuclei included,
but its outlines are no better than its training labels, which were nuclei grown by a
distance. The nuclear stain draws a nucleus to the pixel, and the transcripts of all
cells together say how far cells reach beyond their nuclei. So each cell is redrawn:

1. Nucleus: inside the cell, the image (smoothed by ``nucleus_smooth_um``) above the
   cell's own Otsu threshold; its largest piece, holes filled. A per-cell threshold
   follows brightness that varies across a slide and dim nuclei alike. A cell whose
   values are not bimodal (Otsu separability at most :data:`MIN_SEPARABILITY`) has no
   nucleus found.
2. Reach: the change point of the pooled transcript ring profile around all nuclei
   (:func:`GeneSegNet.growth.density.pooled_growth_um`, at most ``max_growth_um``).
3. Cells: every nucleus grown by that reach, each pixel to the nearest nucleus (as a
   nuclei expansion does). A cell in which no nucleus is found keeps its outline, and the
   grown cells stay out of it.

Every input cell keeps its id; no cell vanishes (its nucleus, or its own outline, stays).
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.segmentation import expand_labels

from GeneSegNet.errors import InputError
from GeneSegNet.growth.density import check_labels, pooled_growth_um, spot_pixels_in
from GeneSegNet.growth.params import GrowParams
from GeneSegNet.io.images import grey

logger = logging.getLogger(__name__)

MIN_NUCLEUS_PIXELS = 10  # fewer pixels in a cell: no threshold is estimated
# Otsu's separability (between-class over total variance) that a cell's pixel values must
# exceed to hold a nucleus: a unimodal Gaussian gives 2/pi = 0.64 (noise, or a neighbour's
# glow at the edge), a nucleus in its cytoplasm 0.8-0.95.
MIN_SEPARABILITY = 0.75


def _otsu_split(values: np.ndarray) -> float | None:
    """Otsu's threshold of ``values`` (1-D), or None when they are not bimodal enough
    (separability at most :data:`MIN_SEPARABILITY`)."""
    if values.size < MIN_NUCLEUS_PIXELS or values.max() <= values.min():
        return None
    threshold = threshold_otsu(values)
    high = values > threshold
    w_high = high.mean()
    if w_high in (0.0, 1.0):
        return None
    between = w_high * (1 - w_high) * (values[high].mean() - values[~high].mean()) ** 2
    return float(threshold) if between > MIN_SEPARABILITY * values.var() else None


def nuclei_within_cells(labels: np.ndarray, image: np.ndarray, smooth_px: float) -> np.ndarray:
    """(H, W) int64: in each cell of ``labels`` its nucleus (module docstring, step 1) with
    the cell's id; 0 elsewhere and in cells where none is found (flat or tiny cells).

    image : (H, W) nuclear stain on the labels' grid, brighter = more stain.
    """
    labels = check_labels(labels, "labels")
    if np.ndim(image) not in (2, 3):
        raise InputError(f"image must be (H, W) or (H, W, C), got shape {np.shape(image)}")
    img = grey(image).astype(np.float32)
    if img.shape != labels.shape:
        raise InputError(f"image {img.shape} and labels {labels.shape} differ in shape")
    if smooth_px > 0:
        img = ndimage.gaussian_filter(img, smooth_px)
    out = np.zeros_like(labels)
    for cell, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        mine = labels[box] == cell
        threshold = _otsu_split(img[box][mine])
        if threshold is None:
            continue
        bright = mine & (img[box] > threshold)
        pieces, n = ndimage.label(bright)
        if n == 0:
            continue
        sizes = np.bincount(pieces.ravel())
        sizes[0] = 0
        nucleus = ndimage.binary_fill_holes(pieces == int(np.argmax(sizes))) & mine
        out[box][nucleus] = cell
    return out


def regrow_from_nuclei(labels: np.ndarray, image: np.ndarray, rows_px: np.ndarray,
                       cols_px: np.ndarray, *, pixel_size_um: float,
                       params: GrowParams | None = None) -> np.ndarray:
    """Cells (H, W) redrawn as their nuclei grown by the pooled transcript reach.

    labels : (H, W) int cells (e.g. a network's), 0 = background.
    image : (H, W) or (H, W, C) nuclear stain on the same grid (C: channel mean).
    rows_px, cols_px : (N,) spot coordinates in px (row = y); pixel = floor.
    Returns int32 (H, W) with the input ids (module docstring).
    """
    params = params or GrowParams()
    labels = check_labels(labels, "labels")
    if pixel_size_um <= 0:
        raise InputError(f"pixel_size_um must be positive, got {pixel_size_um}")
    nuclei = nuclei_within_cells(labels, image, params.nucleus_smooth_um / pixel_size_um)
    if not nuclei.any():
        return labels.astype(np.int32)
    rows, cols, _ = spot_pixels_in(rows_px, cols_px, labels.shape)
    reach_um = pooled_growth_um(nuclei, rows, cols, pixel_size_um, params)
    grown = expand_labels(nuclei, distance=reach_um / pixel_size_um)
    found = np.bincount(nuclei.ravel(), minlength=int(labels.max()) + 1) > 0
    found[0] = True  # background stays background (grown is 0 there too)
    out = np.where(found[labels], grown, labels)
    if logger.isEnabledFor(logging.DEBUG):  # the cell count reads the whole image
        logger.debug("regrow_from_nuclei: %d of %d cells redrawn from their nuclei, reach "
                     "%.2f µm", int(found[1:].sum()),
                     int((np.bincount(labels.ravel())[1:] > 0).sum()), reach_um)
    return out.astype(np.int32)
