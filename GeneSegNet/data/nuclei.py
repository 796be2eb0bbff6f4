"""Starting labels: vendor nuclei rasterised onto the image grid, a classical nucleus
segmentation of the DAPI image, and an optional expansion in µm.

Pixel convention: pixel (row, col) covers [row, row + 1) x [col, col + 1) px, its centre is
(col + 0.5, row + 0.5) in (x, y) px. A polygon (vertices in px, x = column, y = row) owns
the pixels whose CENTRE lies inside it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from GeneSegNet.errors import InputError

logger = logging.getLogger(__name__)

Ring = np.ndarray  # (N, 2) float vertices (x, y) in image px


def fill_ring(labels: np.ndarray, ring: Ring, value: int) -> int:
    """Set ``labels`` to ``value`` on the pixels whose centre is inside ``ring``.

    labels : (H, W) integer array, changed in place. ring : (N, 2) (x, y) px.
    Returns the number of pixels set.
    """
    from skimage.draw import polygon

    ring = np.asarray(ring, dtype=np.float64)
    if ring.ndim != 2 or ring.shape[0] < 3 or ring.shape[1] != 2:
        return 0
    # pixel (r, c) is tested at integer (r, c) by skimage: shift the polygon by -0.5 so
    # that this is the test of the centre (r + 0.5, c + 0.5) against the true polygon
    rr, cc = polygon(ring[:, 1] - 0.5, ring[:, 0] - 0.5, shape=labels.shape)
    labels[rr, cc] = value
    return len(rr)


def rasterize_polygons(cells: Iterable[tuple[Any, Sequence[Ring], Sequence[Ring]]],
                       shape: tuple[int, int]) -> tuple[np.ndarray, list[Any]]:
    """Label image of polygons given in image px.

    cells : (vendor_id, exteriors, holes) per cell; each ring (N, 2) (x, y) px. Holes are
        cleared back to 0 where this cell set them. Later cells overwrite earlier ones
        where they overlap.
    shape : (H, W) px.

    Returns (labels (H, W) uint32 with ids 1..n in input order, vendor ids: ids[k - 1] is
    the vendor id of label k). Cells with no pixel keep their id (an empty label).
    """
    labels = np.zeros(shape, dtype=np.uint32)
    ids: list[Any] = []
    for vendor_id, exteriors, holes in cells:
        value = len(ids) + 1
        ids.append(vendor_id)
        for ring in exteriors:
            fill_ring(labels, ring, value)
        if holes:
            scratch = np.zeros(shape, dtype=bool)
            for ring in holes:
                mask = np.zeros(shape, dtype=np.uint8)
                fill_ring(mask, ring, 1)
                scratch |= mask.astype(bool)
            labels[scratch & (labels == value)] = 0
    return labels, ids


def sample_level(read_rows: Any, level0_shape: tuple[int, int], level: int,
                 shape: tuple[int, int], strip: int = 4096) -> np.ndarray:
    """A level-0 label image sampled at pyramid ``level`` pixel centres.

    Pixel (r, c) of level N (scale s = 2^N) covers level-0 [r s, (r + 1) s); its centre
    (r + 0.5) s lies in level-0 pixel r s + s // 2 (s >= 2), or r (s = 1).

    read_rows : (row0, row1) -> (row1 - row0, W0) level-0 labels. shape : (H, W) of level N.
    """
    s = 2 ** int(level)
    off = s // 2 if s > 1 else 0
    out = np.zeros(shape, dtype=np.uint32)
    rows = np.arange(shape[0]) * s + off
    cols = np.arange(shape[1]) * s + off
    rows = rows[rows < level0_shape[0]]
    cols = cols[cols < level0_shape[1]]
    for i0 in range(0, len(rows), max(1, strip // s)):
        sel = rows[i0:i0 + max(1, strip // s)]
        block = read_rows(int(sel[0]), int(sel[-1]) + 1)
        out[i0:i0 + len(sel), :len(cols)] = block[sel - sel[0]][:, cols]
    return out


def expand_labels_um(labels: np.ndarray, expand_um: float, pixel_size_um: float) -> np.ndarray:
    """Grow every label by ``expand_um`` µm into background (never into another label)."""
    from skimage.segmentation import expand_labels

    if expand_um < 0:
        raise InputError(f"--expand_um must be >= 0, got {expand_um}")
    if expand_um == 0:
        return labels
    return expand_labels(labels, distance=expand_um / pixel_size_um)


def segment_nuclei(image: np.ndarray, pixel_size_um: float, diameter_um: float = 8.0,
                   threshold_scale: float = 1.0) -> np.ndarray:
    """Classical nucleus segmentation of a nuclear stain (H, W) -> uint32 labels.

    1. background flattening: subtract a grey opening larger than a nucleus (~2 diameters),
       after a light Gaussian (σ = diameter / 16);
    2. Otsu threshold (times ``threshold_scale``), holes filled, objects smaller than 15 %
       of a nucleus's area removed;
    3. split touching nuclei: watershed of the smoothed distance transform from markers
       h-maxima (h = diameter / 16) of it, restricted to the foreground.

    diameter_um : typical nucleus diameter (µm); with ``pixel_size_um`` it sets every
    scale in px.
    """
    from skimage.filters import threshold_otsu
    from skimage.morphology import h_maxima, remove_small_objects
    from skimage.segmentation import watershed

    if image.ndim == 3:
        image = image[..., 0] if image.shape[-1] <= 4 else image[0]
    diameter = max(diameter_um / pixel_size_um, 3.0)
    img = ndimage.gaussian_filter(image.astype(np.float32), max(diameter / 16, 0.5))
    size = int(2 * diameter) | 1
    small = img[::2, ::2]
    background = ndimage.grey_opening(small, size=(size // 2 | 1, size // 2 | 1))
    background = ndimage.zoom(background, 2, order=1)[: img.shape[0], : img.shape[1]]
    background = np.pad(background, ((0, img.shape[0] - background.shape[0]),
                                     (0, img.shape[1] - background.shape[1])), mode="edge")
    flat = img - background
    if not np.any(flat > 0):
        return np.zeros(image.shape, dtype=np.uint32)
    fg = flat > threshold_otsu(flat) * threshold_scale
    fg = ndimage.binary_fill_holes(fg)
    min_area = int(0.15 * np.pi * (diameter / 2) ** 2)
    fg = remove_small_objects(fg, max_size=max(min_area, 1))
    dist = ndimage.distance_transform_edt(fg)
    dist = ndimage.gaussian_filter(dist, 1.0)
    markers, _ = ndimage.label(h_maxima(dist, max(diameter / 16, 0.5)))
    labels = watershed(-dist, markers, mask=fg)
    labels = remove_small_objects(labels, max_size=max(min_area, 1))
    from skimage.segmentation import relabel_sequential

    return relabel_sequential(labels)[0].astype(np.uint32)
