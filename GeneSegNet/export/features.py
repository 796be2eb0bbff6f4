"""Per-cell measurements from a label image and the DAPI image, vectorised over cells.

All functions take a label image (H, W) with ids 1..max (0 = background) and return
arrays indexed by the ``ids`` passed (K,), so cells of any numbering line up. Positions
follow the pixel-edge convention: pixel (r, c) covers [c, c+1) × [r, r+1), so its centre
is (x, y) = (c + 0.5, r + 0.5) px.

Chromatin features (:func:`chromatin_features`, :data:`CHROMATIN_FEATURES`), per object
(nucleus if a nucleus label image is given, else the cell):

- shape: ``area_px`` (pixels), ``eccentricity`` (of the ellipse with the same second
  moments, as skimage's regionprops), ``solidity`` (area / area of the convex hull of
  the object's pixel-edge polygon);
- intensity: ``intensity_mean``, ``intensity_std`` (population), ``intensity_integrated``
  (sum), ``intensity_q10/q25/q50/q75/q90`` (linear interpolation, as numpy);
- texture: ``glcm_contrast`` and ``glcm_homogeneity`` (grey-level co-occurrence at
  distance 1, angles 0 and 90°, symmetric, normalised, averaged over the two angles, as
  ``skimage.feature.graycoprops``; pairs of pixels both in the object; the image is
  quantised to 256 levels: uint8 as is, otherwise linearly from its min..max), and
  ``local_std_mean`` (mean over the object of the 3×3 local standard deviation).
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from GeneSegNet.io.images import grey

logger = logging.getLogger(__name__)

QUANTILES = (0.10, 0.25, 0.50, 0.75, 0.90)
CHROMATIN_FEATURES = (
    "area_px", "eccentricity", "solidity",
    "intensity_mean", "intensity_std", "intensity_integrated",
    *(f"intensity_q{int(round(q * 100)):02d}" for q in QUANTILES),
    "glcm_contrast", "glcm_homogeneity", "local_std_mean",
)


def _lut(ids: np.ndarray, top: int) -> np.ndarray:
    """Row of each label value 0..top in the output (-1 where not asked for)."""
    lut = np.full(top + 1, -1, dtype=np.int64)
    ids = ids[(ids >= 0) & (ids <= top)]
    lut[ids] = np.arange(len(ids))
    return lut


def _sums(flat_labels: np.ndarray, weights: np.ndarray | None, top: int) -> np.ndarray:
    return np.bincount(flat_labels, weights=weights, minlength=top + 1)


def basic_measurements(labels: np.ndarray, ids: np.ndarray, image: np.ndarray | None = None
                       ) -> dict[str, np.ndarray]:
    """``area_px``, ``centroid_x_px``, ``centroid_y_px`` (pixel centres, see module doc) and,
    with an image, ``mean_intensity``; each (K,) float64 for ``ids``; NaN for absent ids."""
    ids = np.asarray(ids, dtype=np.int64)
    flat = labels.ravel()
    top = int(flat.max(initial=0))
    area = _sums(flat, None, top).astype(np.float64)
    rows, cols = np.divmod(np.arange(flat.size, dtype=np.int64), labels.shape[1])
    sum_r = _sums(flat, rows.astype(np.float64), top)
    sum_c = _sums(flat, cols.astype(np.float64), top)
    del rows, cols
    out_rows = _lut(ids, top)
    present = (ids <= top) & (ids >= 0)
    take = np.where(present, np.clip(ids, 0, top), 0)
    n = np.where(present, area[take], 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        result = {
            "area_px": n,
            "centroid_x_px": np.where(n > 0, sum_c[take] / n + 0.5, np.nan),
            "centroid_y_px": np.where(n > 0, sum_r[take] / n + 0.5, np.nan),
        }
        if image is not None:
            values = grey(image).ravel().astype(np.float64)
            result["mean_intensity"] = np.where(n > 0, _sums(flat, values, top)[take] / n,
                                                np.nan)
    del out_rows
    return result


def _quantised(image: np.ndarray) -> np.ndarray:
    """uint8 copy of ``image``: uint8 unchanged, else linearly from min..max to 0..255."""
    if image.dtype == np.uint8:
        return image
    values = image.astype(np.float64)
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    if high <= low:
        return np.zeros(image.shape, dtype=np.uint8)
    return np.clip(np.rint((values - low) / (high - low) * 255.0), 0, 255).astype(np.uint8)


def _quantiles(flat: np.ndarray, values: np.ndarray, rows: np.ndarray, n_out: int,
               counts: np.ndarray) -> np.ndarray:
    """(n_out, len(QUANTILES)) per-row quantiles of ``values`` grouped by ``rows``."""
    if values.dtype.kind in "ui" and values.size and int(values.max()) < 2**16 and \
            values.min() >= 0:
        key = rows.astype(np.int64) << 16 | values.astype(np.int64)
        key.sort()
        ordered = (key & 0xFFFF).astype(np.float64)
    else:
        order = np.lexsort((values, rows))
        ordered = values[order].astype(np.float64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = np.full((n_out, len(QUANTILES)), np.nan)
    has = counts > 0
    for j, q in enumerate(QUANTILES):
        pos = starts[has] + q * (counts[has] - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, starts[has] + counts[has] - 1)
        frac = pos - lo
        out[has, j] = ordered[lo] + (ordered[hi] - ordered[lo]) * frac
    return out


def chromatin_features(objects: np.ndarray, image: np.ndarray, ids: np.ndarray,
                       polygons: np.ndarray | None = None) -> np.ndarray:
    """(K, len(CHROMATIN_FEATURES)) float32 features of ``objects`` (H, W) over ``image``
    for ``ids`` (K,); rows of ids without pixels are NaN.

    ``polygons`` (K,) shapely polygons of the same objects (pixel units) are used for the
    convex hull when given; otherwise they are traced (:func:`.polygons.cell_polygons`).
    """
    import shapely

    from GeneSegNet.export.polygons import cell_polygons

    ids = np.asarray(ids, dtype=np.int64)
    img = grey(image)
    if img.shape != objects.shape:
        raise ValueError(f"image {img.shape} and labels {objects.shape} differ in size")
    top = int(objects.max(initial=0))
    lut = _lut(ids, top)
    flat = objects.ravel()
    row_of = lut[flat]
    inside = row_of >= 0
    rows = row_of[inside]
    k = len(ids)
    out = np.full((k, len(CHROMATIN_FEATURES)), np.nan, dtype=np.float64)
    counts = np.bincount(rows, minlength=k).astype(np.int64)
    has = counts > 0
    col = {name: i for i, name in enumerate(CHROMATIN_FEATURES)}
    out[:, col["area_px"]] = counts
    # shape: second central moments -> eccentricity
    r_all, c_all = np.divmod(np.flatnonzero(inside), objects.shape[1])
    n = np.maximum(counts, 1).astype(np.float64)
    mr = np.bincount(rows, weights=r_all, minlength=k) / n
    mc = np.bincount(rows, weights=c_all, minlength=k) / n
    dr, dc = r_all - mr[rows], c_all - mc[rows]
    a = np.bincount(rows, weights=dr * dr, minlength=k) / n
    b = np.bincount(rows, weights=dc * dc, minlength=k) / n
    c = np.bincount(rows, weights=dr * dc, minlength=k) / n
    del r_all, c_all, dr, dc
    root = np.sqrt(((a - b) / 2.0) ** 2 + c * c)
    l1, l2 = (a + b) / 2.0 + root, (a + b) / 2.0 - root
    with np.errstate(invalid="ignore", divide="ignore"):
        out[:, col["eccentricity"]] = np.where(l1 > 0, np.sqrt(np.clip(1 - l2 / l1, 0, 1)), 0.0)
    if polygons is None:
        poly_ids, polygons = cell_polygons(objects, simplify=0.0)
        poly_rows = lut[np.clip(poly_ids, 0, top)]
    else:
        poly_rows = np.arange(k)
    hull_area = np.full(k, np.nan)
    if len(polygons):
        hull_area[poly_rows] = shapely.area(shapely.convex_hull(polygons))
    with np.errstate(invalid="ignore", divide="ignore"):
        out[:, col["solidity"]] = np.minimum(counts / hull_area, 1.0)
    # intensity
    values = img.ravel()[inside]
    v64 = values.astype(np.float64)
    total = np.bincount(rows, weights=v64, minlength=k)
    mean = total / n
    out[:, col["intensity_mean"]] = mean
    out[:, col["intensity_integrated"]] = total
    sq = np.bincount(rows, weights=(v64 - mean[rows]) ** 2, minlength=k)
    out[:, col["intensity_std"]] = np.sqrt(sq / n)
    del v64
    q0 = col[f"intensity_q{int(round(QUANTILES[0] * 100)):02d}"]
    out[:, q0:q0 + len(QUANTILES)] = _quantiles(flat, values, rows, k, counts)
    del values
    # texture: GLCM at distance 1 (0° and 90°) within the object
    levels = _quantised(img).astype(np.int16)
    contrast = np.zeros(k)
    homogeneity = np.zeros(k)
    for axis in (1, 0):
        first = [slice(None), slice(None)]
        second = [slice(None), slice(None)]
        first[axis], second[axis] = slice(None, -1), slice(1, None)
        own = row_of.reshape(objects.shape)
        same = (own[tuple(first)] == own[tuple(second)]) & (own[tuple(first)] >= 0)
        pair_rows = own[tuple(first)][same]
        diff = (levels[tuple(first)][same] - levels[tuple(second)][same]).astype(np.float64)
        n_pairs = np.bincount(pair_rows, minlength=k).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            contrast += np.bincount(pair_rows, weights=diff * diff, minlength=k) / n_pairs
            homogeneity += np.bincount(pair_rows, weights=1.0 / (1.0 + diff * diff),
                                       minlength=k) / n_pairs
        del same, pair_rows, diff
    out[:, col["glcm_contrast"]] = contrast / 2.0
    out[:, col["glcm_homogeneity"]] = homogeneity / 2.0
    f = img.astype(np.float32)
    local_mean = ndimage.uniform_filter(f, size=3, mode="reflect")
    local_sq = ndimage.uniform_filter(f * f, size=3, mode="reflect")
    local_std = np.sqrt(np.maximum(local_sq - local_mean * local_mean, 0.0)).ravel()
    del f, local_mean, local_sq
    out[:, col["local_std_mean"]] = np.bincount(rows, weights=local_std[inside],
                                                minlength=k) / n
    out[~has] = np.nan
    return out.astype(np.float32)
