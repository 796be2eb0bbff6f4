"""Starting labels: vendor nuclei rasterised onto the image grid, a classical nucleus
segmentation of the DAPI image, and an optional expansion in µm.

Pixel convention: pixel (row, col) covers [row, row + 1) x [col, col + 1) px, its centre is
(col + 0.5, row + 0.5) in (x, y) px. A polygon (vertices in px, x = column, y = row) owns
the pixels whose CENTRE lies inside it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from GeneSegNet.errors import InputError

logger = logging.getLogger(__name__)

Ring = np.ndarray  # (N, 2) float vertices (x, y) in image px


def ring_pixels(ring: Ring, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) (K,) int64 of the pixels of an (H, W) image whose centre is inside ``ring``.

    ring : (N, 2) (x, y) px. The test runs in a frame anchored at the ring's own corner
    (clipped to the image), so the answer depends on the ring and ``shape`` only: a tile
    of a large image gets exactly the pixels the whole image would.
    """
    from skimage.draw import polygon

    ring = np.asarray(ring, dtype=np.float64)
    empty = np.zeros(0, dtype=np.int64)
    if ring.ndim != 2 or ring.shape[0] < 3 or ring.shape[1] != 2:
        return empty, empty
    height, width = int(shape[0]), int(shape[1])
    # pixel (r, c) is tested at integer (r, c) by skimage: shift the polygon by -0.5 so
    # that this is the test of the centre (r + 0.5, c + 0.5) against the true polygon
    ry, rx = ring[:, 1] - 0.5, ring[:, 0] - 0.5
    if not (np.all(np.isfinite(ry)) and np.all(np.isfinite(rx))):
        return empty, empty
    r0 = int(min(max(np.floor(ry.min()), 0), height))
    c0 = int(min(max(np.floor(rx.min()), 0), width))
    rr, cc = polygon(ry - r0, rx - c0, shape=(height - r0, width - c0))
    return rr.astype(np.int64) + r0, cc.astype(np.int64) + c0


def fill_ring(labels: np.ndarray, ring: Ring, value: int) -> int:
    """Set ``labels`` to ``value`` on the pixels whose centre is inside ``ring``.

    labels : (H, W) integer array, changed in place. ring : (N, 2) (x, y) px.
    Returns the number of pixels set.
    """
    rr, cc = ring_pixels(ring, labels.shape)
    labels[rr, cc] = value
    return len(rr)


@dataclass
class PolygonSet:
    """Cells as polygons in image px, flat (no Python object per vertex or ring).

    xs, ys : (V,) float64 vertices (x = column, y = row, px).
    ring_start : (R + 1,) int64; ring k is vertices ring_start[k]:ring_start[k + 1].
    ring_hole : (R,) bool, the ring is a hole of its cell.
    cell_start : (n + 1,) int64; cell i owns rings cell_start[i]:cell_start[i + 1].
    ids : n vendor ids; label i + 1 is cell i.
    """

    xs: np.ndarray
    ys: np.ndarray
    ring_start: np.ndarray
    ring_hole: np.ndarray
    cell_start: np.ndarray
    ids: list[Any]

    @classmethod
    def from_cells(cls, cells: Iterable[tuple[Any, Sequence[Ring], Sequence[Ring]]]
                   ) -> PolygonSet:
        """From (vendor_id, exteriors, holes) per cell, each ring (N, 2) (x, y) px."""
        xs: list[np.ndarray] = []
        ys: list[np.ndarray] = []
        starts, holes, cell_start, ids = [0], [], [0], []
        for vendor_id, exteriors, hole_rings in cells:
            ids.append(vendor_id)
            for is_hole, rings in ((False, exteriors), (True, hole_rings or [])):
                for ring in rings:
                    ring = np.asarray(ring, dtype=np.float64).reshape(-1, 2)
                    xs.append(ring[:, 0])
                    ys.append(ring[:, 1])
                    starts.append(starts[-1] + len(ring))
                    holes.append(is_hole)
            cell_start.append(len(holes))
        return cls(_concat(xs), _concat(ys), np.asarray(starts, np.int64),
                   np.asarray(holes, bool), np.asarray(cell_start, np.int64), ids)

    def __len__(self) -> int:
        return len(self.ids)

    def row_range(self) -> tuple[np.ndarray, np.ndarray]:
        """(first, last) (n,) int64: rows a cell's pixels can lie in (a safe superset;
        a cell without vertices gets first > last)."""
        n = len(self)
        first = np.full(n, np.iinfo(np.int64).max // 2, np.int64)
        last = np.full(n, np.iinfo(np.int64).min // 2, np.int64)
        if len(self.ys):
            ring_cell = np.repeat(np.arange(n), np.diff(self.cell_start))
            vert_ring = np.repeat(np.arange(len(self.ring_hole)), np.diff(self.ring_start))
            ys = np.nan_to_num(self.ys, nan=0.0, posinf=1e15, neginf=-1e15)
            vert_cell = ring_cell[vert_ring]
            np.minimum.at(first, vert_cell, np.floor(ys).astype(np.int64) - 1)
            np.maximum.at(last, vert_cell, np.ceil(ys).astype(np.int64) + 1)
        return first, last

    def render(self, shape: tuple[int, int], rows: tuple[int, int],
               cells: np.ndarray | None = None, dtype: Any = np.uint32) -> np.ndarray:
        """Labels (rows[1] - rows[0], W) of image rows ``rows`` of an (H, W) image.

        Label i + 1 = cell i; later cells overwrite earlier ones; a cell's holes are
        cleared back to 0 where this cell set them. ``cells``: indices (ascending) of the
        cells to draw (default all)."""
        r0, r1 = int(rows[0]), int(rows[1])
        out = np.zeros((r1 - r0, int(shape[1])), dtype=dtype)
        todo = np.arange(len(self)) if cells is None else cells
        for i in todo:
            value = int(i) + 1
            for k in range(self.cell_start[i], self.cell_start[i + 1]):
                if self.ring_hole[k]:
                    continue
                rr, cc = self._ring_rows(k, shape, r0, r1)
                out[rr, cc] = value
            for k in range(self.cell_start[i], self.cell_start[i + 1]):
                if not self.ring_hole[k]:
                    continue
                rr, cc = self._ring_rows(k, shape, r0, r1)
                mine = out[rr, cc] == value
                out[rr[mine], cc[mine]] = 0
        return out

    def _ring_rows(self, k: int, shape: tuple[int, int], r0: int, r1: int
                   ) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.ring_start[k], self.ring_start[k + 1]
        rr, cc = ring_pixels(np.column_stack([self.xs[a:b], self.ys[a:b]]), shape)
        keep = (rr >= r0) & (rr < r1)
        return rr[keep] - r0, cc[keep]


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, np.float64)


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
    polys = PolygonSet.from_cells(cells)
    return polys.render(shape, (0, int(shape[0]))), polys.ids


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


@dataclass(frozen=True)
class NucleusScales:
    """Every scale of the classical segmentation, in px, from a nucleus diameter.

    diameter : nucleus diameter (px, >= 3). sigma : pre-smoothing σ. opening : odd side of
    the grey opening on the half-resolution image. min_area : smallest kept object (px).
    max_hole : largest hole filled (px, one nucleus's area). h : h-maxima height.
    """

    diameter: float
    sigma: float
    opening: int
    min_area: int
    max_hole: int
    h: float

    @classmethod
    def of(cls, pixel_size_um: float, diameter_um: float) -> NucleusScales:
        d = max(diameter_um / pixel_size_um, 3.0)
        return cls(diameter=d, sigma=max(d / 16, 0.5), opening=(int(2 * d) | 1) // 2 | 1,
                   min_area=max(int(0.15 * np.pi * (d / 2) ** 2), 1),
                   max_hole=max(int(np.pi * (d / 2) ** 2), 1), h=max(d / 16, 0.5))

    def flat_halo(self) -> int:
        """Rows/cols (even) around a window that :func:`flatten_background` needs so that
        the window's inner pixels get the whole image's values exactly."""
        gauss = int(4.0 * self.sigma + 0.5)
        return 2 * ((gauss + 4 * (self.opening // 2) + 4) // 2 + 1)


def _upsample2(small: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Half-resolution (h, w) -> (H, W): pixel 2i takes small[i], pixel 2i + 1 the mean of
    small[i] and small[i + 1] (the last one small[i]); per axis. Translation-invariant for
    even offsets, unlike a zoom whose scale depends on the image size."""
    def rows(a: np.ndarray) -> np.ndarray:
        up = np.empty((2 * a.shape[0],) + a.shape[1:], dtype=a.dtype)
        up[0::2] = a
        up[1:-1:2] = (a[:-1] + a[1:]) * a.dtype.type(0.5)
        up[-1] = a[-1]
        return up

    return rows(rows(small).T).T[: shape[0], : shape[1]]


def flatten_background(image: np.ndarray, scales: NucleusScales) -> np.ndarray:
    """(H, W) float32: the image, lightly smoothed, minus a grey opening larger than a
    nucleus (taken at half resolution, pixels (2i, 2j), and upsampled linearly)."""
    img = ndimage.gaussian_filter(image.astype(np.float32), scales.sigma)
    if img.size == 0:
        return img
    small = img[::2, ::2]
    background = ndimage.grey_opening(small, size=(scales.opening, scales.opening))
    return img - _upsample2(background, img.shape)


def flat_histogram(flat: np.ndarray, low: float, high: float, bins: int = 256
                   ) -> np.ndarray:
    """(bins,) int64 counts of ``flat`` in ``bins`` equal bins over [low, high]; summed
    over tiles it equals the histogram of the whole image."""
    return np.histogram(flat, bins=bins, range=(low, high))[0].astype(np.int64)


def otsu_from_histogram(counts: np.ndarray, low: float, high: float) -> float:
    """Otsu threshold from :func:`flat_histogram` counts over [low, high]."""
    from skimage.filters import threshold_otsu

    if high <= low:
        return float(low)
    edges = np.histogram_bin_edges([low, high], bins=len(counts), range=(low, high))
    return float(threshold_otsu(hist=(counts, (edges[:-1] + edges[1:]) / 2)))


WATERSHED_TIE = 1e-12  # per raster index: orders equal heights by image position


def segment_flat(flat: np.ndarray, threshold: float, scales: NucleusScales,
                 return_foreground: bool = False, origin: tuple[int, int] = (0, 0),
                 image_width: int | None = None) -> Any:
    """Nuclei of a flattened window: (H, W) int32 labels (ids 1..n in no set order), and
    with ``return_foreground`` also the (H, W) bool foreground they were cut from. Each
    foreground component's labels depend on that component only, so a component that
    stays clear of the window's edge is segmented as in the whole image.

    Foreground = flat > threshold, holes up to one nucleus's area filled, objects below
    ``min_area`` removed; touching nuclei split by a watershed of the smoothed distance
    transform (zero outside the foreground) from its h-maxima (8-connected markers).
    Equal heights flood in the order of their image position (``origin`` = (row, col) of
    the window in an image ``image_width`` px wide), not of the window's heap.
    """
    from skimage.morphology import h_maxima, remove_small_holes, remove_small_objects
    from skimage.segmentation import watershed

    fg = flat > threshold
    fg = remove_small_holes(fg, max_size=scales.max_hole)
    fg = remove_small_objects(fg, max_size=scales.min_area)
    if not fg.any():
        empty = np.zeros(flat.shape, dtype=np.int32)
        return (empty, fg) if return_foreground else empty
    dist = ndimage.distance_transform_edt(fg)
    dist = ndimage.gaussian_filter(dist, 1.0)
    dist[~fg] = 0.0
    markers, _ = ndimage.label(h_maxima(dist, scales.h), structure=np.ones((3, 3), bool))
    width = flat.shape[1] if image_width is None else int(image_width)
    rows = np.arange(origin[0], origin[0] + flat.shape[0], dtype=np.float64)[:, None]
    cols = np.arange(origin[1], origin[1] + flat.shape[1], dtype=np.float64)[None, :]
    surface = (rows * width + cols) * WATERSHED_TIE - dist
    labels = watershed(surface, markers, mask=fg)
    labels = remove_small_objects(labels, max_size=scales.min_area).astype(np.int32)
    return (labels, fg) if return_foreground else labels


def segment_nuclei(image: np.ndarray, pixel_size_um: float, diameter_um: float = 8.0,
                   threshold_scale: float = 1.0) -> np.ndarray:
    """Classical nucleus segmentation of a nuclear stain (H, W) -> uint32 labels.

    1. background flattening (:func:`flatten_background`): subtract a grey opening larger
       than a nucleus (~2 diameters), after a light Gaussian (σ = diameter / 16);
    2. Otsu threshold (times ``threshold_scale``) of the flattened image's 256-bin
       histogram, holes up to a nucleus's area filled, objects smaller than 15 % of a
       nucleus's area removed;
    3. split touching nuclei: watershed of the smoothed distance transform from markers
       h-maxima (h = diameter / 16) of it, restricted to the foreground.

    diameter_um : typical nucleus diameter (µm); with ``pixel_size_um`` it sets every
    scale in px. Large images: GeneSegNet.vendors.tiled_labels segments tile by tile with
    the same result.
    """
    from skimage.segmentation import relabel_sequential

    if image.ndim == 3:
        image = image[..., 0] if image.shape[-1] <= 4 else image[0]
    scales = NucleusScales.of(pixel_size_um, diameter_um)
    flat = flatten_background(image, scales)
    if flat.size == 0 or not np.any(flat > 0):
        return np.zeros(image.shape, dtype=np.uint32)
    low, high = float(flat.min()), float(flat.max())
    threshold = otsu_from_histogram(flat_histogram(flat, low, high), low, high)
    labels = segment_flat(flat, threshold * threshold_scale, scales)
    return relabel_sequential(labels)[0].astype(np.uint32)
