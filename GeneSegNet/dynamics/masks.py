"""Label-image utilities: renumbering, hole filling, size filters, diameters, outlines.

A label image (``masks``) is an integer array ``[H, W]`` (rows = y, columns = x) where 0 is
background and each cell carries one positive id. Every function here returns ``int32``
labels (never a narrowed 8/16-bit type) and leaves its input untouched.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
from scipy import ndimage
from skimage import measure

from GeneSegNet.dynamics import kernels

logger = logging.getLogger(__name__)

# Equivalent-circle diameter from sqrt(area): d = sqrt(area) / (sqrt(pi) / 2).
_SQRT_PI_HALF = np.sqrt(np.pi) / 2.0


def _as_labels(masks: np.ndarray) -> np.ndarray:
    masks = np.asarray(masks)
    if not np.issubdtype(masks.dtype, np.integer):
        raise TypeError(f"label image must have an integer dtype, got {masks.dtype}")
    if masks.size and masks.min() < 0:
        raise ValueError("label image must not contain negative ids")
    return masks


def compact_labels(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct cell ids of a label image, and the image with them numbered 1..K.

    Parameters
    ----------
    masks : ndarray [H, W], integer or bool
        Label image with non-negative ids (label 0 need not be present); a boolean
        image is one cell with id True.

    Returns
    -------
    ids : ndarray [K]
        The distinct non-zero ids, ascending, in the dtype of ``masks``.
    labels : ndarray [H, W] int32
        ``ids[k]`` replaced by k + 1, background 0.
    """
    values = np.asarray(masks)
    values = _as_labels(values.view(np.uint8) if values.dtype == np.bool_ else values)
    flat = values.ravel()
    top = int(flat.max()) if flat.size else 0
    if top > 4 * flat.size + 1024:
        # Sparse huge ids: sort instead of a lookup table.
        distinct, inverse = np.unique(flat, return_inverse=True)
        compact = inverse.reshape(values.shape).astype(np.int32)
        if distinct[0] != 0:
            compact += 1
        ids = distinct[distinct > 0]
    else:
        ids = np.flatnonzero(np.bincount(flat, minlength=top + 1)[1:]) + 1
        lut = np.zeros(top + 1, dtype=np.int32)
        lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
        compact = lut[values]
    return ids.astype(np.asarray(masks).dtype), compact


def renumber(masks: np.ndarray, order: str = "id") -> np.ndarray:
    """Relabel the cells of a label image to 1..K, keeping 0 as background.

    Parameters
    ----------
    masks : ndarray [H, W], integer
        Label image with non-negative ids (label 0 need not be present).
    order : {"id", "first"}
        ``"id"``: new ids follow ascending old ids. ``"first"``: new ids follow the raster
        order of each cell's first pixel (what ``fastremap.renumber`` does, and therefore
        the numbering upstream's masks end up with).

    Returns
    -------
    ndarray [H, W] int32

    Examples
    --------
    >>> renumber(np.array([[0, 7, 3], [5, 0, 3]])).tolist()
    [[0, 3, 1], [2, 0, 1]]
    >>> renumber(np.array([[0, 7, 3], [5, 0, 3]]), order="first").tolist()
    [[0, 1, 2], [3, 0, 2]]
    """
    masks = _as_labels(masks)
    if order not in ("id", "first"):
        raise ValueError(f"order must be 'id' or 'first', got {order!r}")
    ids, compact = compact_labels(masks)
    if order == "id":
        return compact
    flat = compact.ravel()
    first = np.full(len(ids) + 1, flat.size, dtype=np.int64)
    np.minimum.at(first, flat, np.arange(flat.size))
    lut = np.zeros(len(ids) + 1, dtype=np.int32)
    lut[np.argsort(first[1:], kind="stable") + 1] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return lut[compact]


def bounding_boxes(labels: np.ndarray) -> np.ndarray:
    """Bounding box of each id 1..max of a label image, ``[max, 4]`` int64.

    Row k holds (row0, row1, col0, col1) of id k + 1, stops exclusive, from
    ``scipy.ndimage.find_objects``; absent ids get (0, 0, 0, 0).
    """
    boxes = [
        (0, 0, 0, 0) if box is None else (box[0].start, box[0].stop, box[1].start, box[1].stop)
        for box in ndimage.find_objects(labels)
    ]
    return np.array(boxes, dtype=np.int64).reshape(-1, 4)


def fill_holes_and_remove_small_masks(masks: np.ndarray, min_size: int = 15) -> np.ndarray:
    """Drop cells smaller than ``min_size`` pixels, fill holes in the rest, relabel 1..K.

    Cells are visited in ascending id order (``scipy.ndimage.find_objects``). A cell with
    fewer than ``min_size`` pixels is removed; otherwise ``binary_fill_holes`` is applied
    inside its bounding box and the filled pixels get the next new id, so a filled hole
    takes over whatever lay in it (as upstream, which works in place). ``min_size <= 0``
    keeps every cell. Holes are the pixels of the box not 4-connected to its border
    through non-cell pixels (``binary_fill_holes``' definition); the loop is compiled
    (:func:`GeneSegNet.dynamics.kernels.fill_holes_and_filter`).

    Parameters
    ----------
    masks : ndarray [H, W], integer
        Label image.
    min_size : int
        Minimum cell area in pixels, counted before hole filling.

    Returns
    -------
    ndarray [H, W] int32
        Labels 1..K, ordered like the surviving input ids.
    """
    out = _as_labels(masks).astype(np.int32, copy=True)
    # Compiled (kernels): new ids never exceed the old id being visited, so no
    # unvisited cell is hit.
    new_id = kernels.fill_holes_and_filter(out, bounding_boxes(out), int(min_size))
    # A cell swallowed by a later cell's hole filling leaves a gap in the numbering.
    if (np.bincount(out.ravel(), minlength=new_id + 1)[1:] == 0).any():
        out = renumber(out)
    return out


def diameters(masks: np.ndarray) -> tuple[float, np.ndarray]:
    """Equivalent-circle diameters of the cells of a label image.

    Each cell's diameter is ``sqrt(area) / (sqrt(pi) / 2)`` (a disk of radius r gives
    2r). Unlike upstream, label 0 need not be present and an empty image gives 0.0.

    Parameters
    ----------
    masks : ndarray [H, W], integer
        Label image.

    Returns
    -------
    median : float
        Median over cells of the per-cell diameters, in pixels (0.0 without cells).
    per_cell : ndarray [K] float64
        Per-cell diameters in ascending id order (only ids that are present).
    """
    masks = _as_labels(masks)
    counts = np.bincount(masks.ravel())[1:]
    counts = counts[counts > 0]
    if counts.size == 0:
        return 0.0, np.zeros(0, dtype=np.float64)
    per_cell = np.sqrt(counts) / _SQRT_PI_HALF
    return float(np.median(per_cell)), per_cell


def size_shape_filter(
    masks: np.ndarray,
    min_area: int = 300,
    max_bbox_fraction: float = 0.9,
    min_bbox_fraction: float = 0.1,
) -> np.ndarray:
    """Upstream's misnamed ``remove_edge_masks``: a size and shape filter (spec 7.3).

    The label image is split into 8-connected components of equal id (so the pieces of a
    disconnected cell become separate cells). A component is dropped if its bounding box
    covers more than ``max_bbox_fraction * H * W`` pixels, if its area is below
    ``min_area``, if its bounding-box height is below ``min_bbox_fraction * H``, or if its
    bounding-box width is below ``min_bbox_fraction * W``. Upstream compares the width with
    ``0.1 * H`` as well (an H-for-both-axes bug, fixed here; identical on square images).
    Survivors are relabelled 1..K in ascending component order.

    Parameters
    ----------
    masks : ndarray [H, W], integer
        Label image.
    min_area : int
        Minimum component area in pixels.
    max_bbox_fraction, min_bbox_fraction : float
        Fractions of the image area and of the image height/width.

    Returns
    -------
    ndarray [H, W] int32
    """
    masks = _as_labels(masks)
    height, width = masks.shape
    components = measure.label(masks, background=0, connectivity=2).astype(np.int32)
    areas = np.bincount(components.ravel())
    keep = np.zeros(len(areas), dtype=bool)
    for index, box in enumerate(ndimage.find_objects(components)):
        if box is None:
            continue
        box_h = box[0].stop - box[0].start
        box_w = box[1].stop - box[1].start
        keep[index + 1] = not (
            box_h * box_w > max_bbox_fraction * height * width
            or areas[index + 1] < min_area
            or box_h < min_bbox_fraction * height
            or box_w < min_bbox_fraction * width
        )
    return renumber(np.where(keep[components], components, 0))


def remove_edge_masks(masks: np.ndarray, border: int = 1) -> np.ndarray:
    """Remove cells that touch the image edge, then relabel 1..K in ascending id order.

    This is what the name means in Cellpose: a cell is removed when any of its pixels
    lies within ``border`` pixels of the image boundary.

    Parameters
    ----------
    masks : ndarray [H, W], integer
        Label image.
    border : int
        Width in pixels of the edge band (>= 1).

    Returns
    -------
    ndarray [H, W] int32
    """
    masks = _as_labels(masks)
    if border < 1:
        raise ValueError(f"border must be >= 1, got {border}")
    band = np.ones(masks.shape, dtype=bool)
    band[tuple(slice(border, -border) for _ in range(masks.ndim))] = False
    touching = np.unique(masks[band])
    touching = touching[touching > 0]
    return renumber(np.where(np.isin(masks, touching), 0, masks))


def outlines_list(masks: np.ndarray) -> list[np.ndarray]:
    """Outline of each cell as a list of (x, y) pixel coordinates.

    For each present id in ascending order, the largest external contour (by enclosed
    area, then by number of points) found by ``cv2.findContours`` with
    ``CHAIN_APPROX_NONE``. Used for ImageJ outline text files.

    Parameters
    ----------
    masks : ndarray [H, W], integer
        Label image.

    Returns
    -------
    list of ndarray [P, 2] int32
        One array per present cell, columns (x, y).
    """
    masks = _as_labels(masks)
    outlines = []
    for index, box in enumerate(ndimage.find_objects(masks)):
        if box is None:
            continue
        cell = np.ascontiguousarray(masks[box] == index + 1, dtype=np.uint8)
        contours, _ = cv2.findContours(cell, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        best = max(contours, key=lambda c: (cv2.contourArea(c), len(c)))
        offset = np.array([box[1].start, box[0].start], dtype=np.int32)
        outlines.append(best.reshape(-1, 2).astype(np.int32) + offset)
    return outlines
