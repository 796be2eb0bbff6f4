"""Starting labels of large images without the whole label image in memory.

Both sources write ``labels/<sample>.tif`` as a tiled BigTIFF, one strip of tiles at a
time, through a temporary name:

* vendor nuclei (polygons, :class:`GeneSegNet.data.nuclei.PolygonSet`): each strip of
  rows draws only the cells whose rows meet it (plus a halo of ``expand`` px for the
  expansion). A cell keeps its id (its input order) in every strip, and the pixel-centre
  test of a ring does not depend on the strip, so the result equals the in-memory one.
* classical segmentation (:func:`GeneSegNet.data.nuclei.segment_nuclei`), three passes:
  (1) the flattened image tile by tile with a halo (:meth:`NucleusScales.flat_halo`) into
  a float32 scratch file beside the output, (2) its histogram -> the Otsu threshold of
  the whole image, (3) each tile segmented inside a window of ``halo`` px more; an object
  gets the id of its first pixel (raster order, image coordinates), numbered 1, 2, ... in
  the order met, so an object cut by a tile edge keeps one id. A foreground component
  that stays ``EDGE_MARGIN`` px clear of the window's edge is segmented exactly as in the
  whole image; larger ones (more than ``halo`` px across) are counted and logged.

Memory: one strip of ``strip_rows`` x W labels plus one window.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from tqdm import tqdm

from GeneSegNet.data.nuclei import (
    NucleusScales,
    PolygonSet,
    expand_labels_um,
    flat_histogram,
    flatten_background,
    otsu_from_histogram,
    segment_flat,
)
from GeneSegNet.errors import InputError
from GeneSegNet.io.images import write_tiled_tiff

logger = logging.getLogger(__name__)

LABEL_TILE = 512  # px, tile edge of the written label TIFF
TILED_MIN_PIXELS = 1 << 26  # images with more pixels take the tiled path by default
EDGE_MARGIN = 16  # px: a component this close to a window edge may be cut by it

StripRenderer = Callable[[int, int], np.ndarray]  # (row0, row1) -> (row1 - row0, W) labels


def use_tiles(shape: tuple[int, int], tiled: bool | None) -> bool:
    """Whether an (H, W) image takes the tiled path (``tiled`` None: above
    TILED_MIN_PIXELS pixels)."""
    return bool(tiled) if tiled is not None else int(shape[0]) * int(shape[1]) > TILED_MIN_PIXELS


def strip_tiles(render: StripRenderer, shape: tuple[int, int], dtype: Any,
                strip_rows: int, tile: int = LABEL_TILE, desc: str = "labels"
                ) -> Iterator[np.ndarray]:
    """Row-major ``tile`` x ``tile`` tiles (edge tiles zero-padded) of an (H, W) label
    image rendered ``strip_rows`` rows (a multiple of ``tile``) at a time."""
    if strip_rows % tile:
        raise ValueError(f"strip_rows {strip_rows} is not a multiple of the tile {tile}")
    height, width = int(shape[0]), int(shape[1])
    padded_w = -(-width // tile) * tile
    for r0 in tqdm(range(0, height, strip_rows), desc=desc, unit="strip", leave=False):
        r1 = min(r0 + strip_rows, height)
        strip = np.zeros((-(-(r1 - r0) // tile) * tile, padded_w), dtype=dtype)
        strip[: r1 - r0, :width] = render(r0, r1)
        for t0 in range(0, strip.shape[0], tile):
            for c0 in range(0, padded_w, tile):
                yield strip[t0:t0 + tile, c0:c0 + tile]


def write_label_strips(path: Path, render: StripRenderer, shape: tuple[int, int],
                       dtype: Any, strip_rows: int, pixel_size_um: float | None = None,
                       desc: str = "labels") -> Path:
    """Write the labels that ``render`` gives strip by strip as a tiled BigTIFF
    (temporary name, then renamed)."""
    tiles = strip_tiles(render, shape, dtype, strip_rows, LABEL_TILE, desc)
    return write_tiled_tiff(path, tiles, shape, np.dtype(dtype), LABEL_TILE,
                            pixel_size_um=pixel_size_um)


def label_dtype(top: int) -> np.dtype:
    """Narrowest unsigned type for ids up to ``top`` (as :func:`write_label` chooses)."""
    return np.dtype(np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.uint32)


# ---------------------------------------------------------------- vendor polygons
def polygon_renderer(polys: PolygonSet, shape: tuple[int, int], expand_um: float = 0.0,
                     pixel_size_um: float = 1.0) -> StripRenderer:
    """Strip renderer of ``polys`` on an (H, W) grid, each label grown by ``expand_um``
    µm into background (the strip is drawn with a halo of the growth in rows)."""
    first, last = polys.row_range()
    halo = math.ceil(expand_um / pixel_size_um) + 2 if expand_um > 0 else 0
    height = int(shape[0])

    def render(r0: int, r1: int) -> np.ndarray:
        a, b = max(r0 - halo, 0), min(r1 + halo, height)
        cells = np.flatnonzero((last >= a) & (first < b))
        labels = polys.render(shape, (a, b), cells)
        if expand_um > 0:
            labels = expand_in_blocks(labels, expand_um, pixel_size_um, halo)
        return labels[r0 - a: r1 - a]

    return render


def expand_in_blocks(labels: np.ndarray, expand_um: float, pixel_size_um: float,
                     halo: int, block: int = 4096) -> np.ndarray:
    """:func:`expand_labels_um` of an (h, W) strip, ``block`` columns at a time with
    ``halo`` columns of context (the distance transform's memory: one block)."""
    width = labels.shape[1]
    if width <= block:
        return expand_labels_um(labels, expand_um, pixel_size_um)
    out = np.empty_like(labels)
    for c0 in range(0, width, block):
        c1 = min(c0 + block, width)
        a, b = max(c0 - halo, 0), min(c1 + halo, width)
        grown = expand_labels_um(labels[:, a:b], expand_um, pixel_size_um)
        out[:, c0:c1] = grown[:, c0 - a: c1 - a]
    return out


def write_polygon_labels(path: Path, polys: PolygonSet, shape: tuple[int, int],
                         expand_um: float = 0.0, pixel_size_um: float = 1.0,
                         strip_rows: int = 2 * LABEL_TILE) -> Path:
    """Rasterise ``polys`` (labels 1..n in input order) strip by strip into ``path``."""
    render = polygon_renderer(polys, shape, expand_um, pixel_size_um)
    logger.info("%s: %d cells drawn strip by strip (%d rows)", path, len(polys), strip_rows)
    return write_label_strips(path, render, shape, label_dtype(len(polys)), strip_rows,
                              pixel_size_um, desc="nuclei")


# ---------------------------------------------------------------- segmentation
WindowReader = Callable[[int, int, int, int], np.ndarray]  # (r0, r1, c0, c1) -> (h, w)


def tiff_window_reader(path: Path) -> tuple[WindowReader, tuple[int, int], Callable[[], None]]:
    """(window reader, (H, W), close) of a TIFF's first series (first plane of any other
    axis), read lazily tile by tile; InputError naming the file if it cannot be read."""
    import zarr

    try:
        tif = tifffile.TiffFile(path)
        series = tif.series[0]
        store = zarr.open(series.aszarr(), mode="r")
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot read the image ({exc})", path) from exc
    axes = series.axes
    if "Y" not in axes or "X" not in axes:
        tif.close()
        raise InputError(f"image axes {axes!r} have no Y and X", path)
    shape = (series.shape[axes.index("Y")], series.shape[axes.index("X")])

    def read(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        index = tuple(slice(r0, r1) if a == "Y" else slice(c0, c1) if a == "X" else 0
                      for a in axes)
        return np.asarray(store[index])

    return read, shape, tif.close


def _tiles(shape: tuple[int, int], size: int) -> Iterator[tuple[int, int, int, int]]:
    for r0 in range(0, shape[0], size):
        for c0 in range(0, shape[1], size):
            yield r0, min(r0 + size, shape[0]), c0, min(c0 + size, shape[1])


class RawFloatFile:
    """An (H, W) float32 scratch array in a raw file, read and written by blocks with
    plain file I/O (no memory map: its pages would count as this process's memory)."""

    def __init__(self, path: Path, shape: tuple[int, int]) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.fh = open(path, "w+b")  # noqa: SIM115 - closed by close()
        self.fh.truncate(self.shape[0] * self.shape[1] * 4)

    def __setitem__(self, key: tuple[slice, slice], block: np.ndarray) -> None:
        rows, cols = key
        block = np.ascontiguousarray(block, dtype=np.float32)
        for i, r in enumerate(range(rows.start, rows.stop)):
            self.fh.seek((r * self.shape[1] + cols.start) * 4)
            self.fh.write(block[i].tobytes())

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rows, cols = key
        r0, r1 = rows.start or 0, min(rows.stop, self.shape[0])
        c0, c1 = cols.start or 0, min(cols.stop, self.shape[1])
        out = np.empty((r1 - r0, c1 - c0), dtype=np.float32)
        if c0 == 0 and c1 == self.shape[1]:
            self.fh.seek(r0 * self.shape[1] * 4)
            self.fh.readinto(memoryview(out).cast("B"))
            return out
        for i, r in enumerate(range(r0, r1)):
            self.fh.seek((r * self.shape[1] + c0) * 4)
            self.fh.readinto(memoryview(out[i]).cast("B"))
        return out

    def close(self) -> None:
        self.fh.close()


def _flatten_to_file(read: WindowReader, shape: tuple[int, int], scales: NucleusScales,
                     flat: RawFloatFile, tile: int) -> tuple[float, float]:
    """Pass 1: the flattened image into ``flat`` tile by tile; returns (min, max)."""
    halo = scales.flat_halo()
    low, high = math.inf, -math.inf
    for r0, r1, c0, c1 in tqdm(list(_tiles(shape, tile)), desc="flatten", leave=False):
        a, b = max(r0 - halo, 0), min(r1 + halo, shape[0])
        c, d = max(c0 - halo, 0), min(c1 + halo, shape[1])
        window = flatten_background(read(a, b, c, d), scales)
        core = window[r0 - a: r1 - a, c0 - c: c1 - c]
        flat[r0:r1, c0:c1] = core
        low, high = min(low, float(core.min())), max(high, float(core.max()))
    return low, high


def _edge_components(fg: np.ndarray, window: tuple[int, int, int, int],
                     shape: tuple[int, int]) -> np.ndarray:
    """(h, w) bool: foreground components within EDGE_MARGIN px of a window edge that is
    not an edge of the image (their segmentation may differ from the whole image's)."""
    from scipy import ndimage

    a, b, c, d = window
    frame = np.zeros(fg.shape, dtype=bool)
    m = EDGE_MARGIN
    if a > 0:
        frame[:m] = True
    if b < shape[0]:
        frame[-m:] = True
    if c > 0:
        frame[:, :m] = True
    if d < shape[1]:
        frame[:, -m:] = True
    comps, _ = ndimage.label(fg)
    cut = np.unique(comps[frame & fg])
    return np.isin(comps, cut[cut > 0])


def segment_tiled(image_path: Path, out_path: Path, pixel_size_um: float,
                  diameter_um: float = 8.0, expand_um: float = 0.0, tile: int = 2048,
                  halo: int | None = None) -> int:
    """Segment the nuclei of ``image_path`` tile by tile into the label TIFF ``out_path``
    (see the module doc); returns the number of labels.

    tile : core tile side (px, a multiple of LABEL_TILE). halo : px of context around a
    tile (default 6 nucleus diameters, at least 64; more than the widest nucleus cluster
    keeps every cluster whole)."""
    if tile % LABEL_TILE:
        raise ValueError(f"tile {tile} is not a multiple of {LABEL_TILE}")
    scales = NucleusScales.of(pixel_size_um, diameter_um)
    grow = math.ceil(expand_um / pixel_size_um) if expand_um > 0 else 0
    halo = max(int(6 * scales.diameter), 64) if halo is None else int(halo)
    halo = max(halo, grow + EDGE_MARGIN + 2)
    read, shape, close = tiff_window_reader(image_path)
    try:
        with tempfile.TemporaryDirectory(prefix=".flat_", dir=out_path.parent) as scratch:
            flat = RawFloatFile(Path(scratch) / "flat.f32", shape)
            low, high = _flatten_to_file(read, shape, scales, flat, tile)
            if not high > 0:
                logger.info("%s: nothing above the background; empty labels", image_path)
                threshold = math.inf
            else:
                counts = np.zeros(256, np.int64)
                for r0 in range(0, shape[0], tile):
                    counts += flat_histogram(flat[r0:r0 + tile, 0:shape[1]], low, high)
                threshold = otsu_from_histogram(counts, low, high)
            state = _SegmentState(flat, shape, threshold, scales, halo, tile, expand_um,
                                  pixel_size_um)
            try:
                write_label_strips(out_path, state.render, shape, np.uint32, tile,
                                   pixel_size_um, desc="segment")
            finally:
                flat.close()
    finally:
        close()
    if state.cut_objects:
        logger.warning("%s: %d objects (counted per tile) belong to foreground regions "
                       "wider than the tile halo (%d px); they may be split at tile edges",
                       out_path,
                       state.cut_objects, halo)
    logger.info("%s: %d nuclei segmented tile by tile (%d px tiles, %d px halo)",
                out_path, len(state.ids), tile, halo)
    return len(state.ids)


class _SegmentState:
    """Pass 3 of :func:`segment_tiled`: renders strips of ``tile`` rows."""

    def __init__(self, flat: RawFloatFile, shape: tuple[int, int], threshold: float,
                 scales: NucleusScales, halo: int, tile: int, expand_um: float,
                 pixel_size_um: float) -> None:
        self.flat, self.shape, self.threshold = flat, shape, threshold
        self.scales, self.halo, self.tile = scales, halo, tile
        self.expand_um, self.pixel_size_um = expand_um, pixel_size_um
        self.ids: dict[int, int] = {}  # first pixel (r * W + c) -> label id
        self.cut_objects = 0

    def render(self, r0: int, r1: int) -> np.ndarray:
        out = np.zeros((r1 - r0, self.shape[1]), dtype=np.uint32)
        for c0 in range(0, self.shape[1], self.tile):
            c1 = min(c0 + self.tile, self.shape[1])
            out[:, c0:c1] = self._tile(r0, r1, c0, c1)
        return out

    def _tile(self, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        height, width = self.shape
        a, b = max(r0 - self.halo, 0), min(r1 + self.halo, height)
        c, d = max(c0 - self.halo, 0), min(c1 + self.halo, width)
        if not math.isfinite(self.threshold):
            return np.zeros((r1 - r0, c1 - c0), dtype=np.uint32)
        flat = self.flat[a:b, c:d]
        labels, fg = segment_flat(flat, self.threshold, self.scales, return_foreground=True,
                                  origin=(a, c), image_width=width)
        core = (slice(r0 - a, r1 - a), slice(c0 - c, c1 - c))
        grown = labels
        if self.expand_um > 0:
            grown = expand_labels_um(labels, self.expand_um, self.pixel_size_um)
        out = self._global_ids(labels, grown[core], a, c)
        cut = _edge_components(fg, (a, b, c, d), self.shape)[core] & (labels[core] > 0)
        if cut.any():
            self.cut_objects += len(np.unique(labels[core][cut]))
        return out

    def _global_ids(self, labels: np.ndarray, core: np.ndarray, a: int, c: int
                    ) -> np.ndarray:
        """``core`` (window labels of the tile's pixels) -> image-wide ids, keyed by each
        object's first pixel in the window ``labels`` whose corner is (a, c)."""
        present = np.unique(core)
        present = present[present > 0]
        lut = np.zeros(int(labels.max(initial=0)) + 1, dtype=np.uint32)
        if len(present) == 0:
            return lut[core]
        values, first = np.unique(labels.ravel(), return_index=True)
        first = first[np.searchsorted(values, present)]
        w = labels.shape[1]
        keys = (a + first // w) * self.shape[1] + (c + first % w)
        for value, key in zip(present.tolist(), keys.tolist(), strict=True):
            got = self.ids.get(key)
            if got is None:
                got = self.ids[key] = len(self.ids) + 1
            lut[value] = got
        return lut[core]


def write_vendor_labels(bundle: Any, path: Path, expand_um: float = 0.0,
                        tiled: bool | None = None) -> list[Any]:
    """Write ``bundle``'s nuclei on its image grid into the label TIFF ``path``, grown by
    ``expand_um`` µm; returns the vendor ids (label k = ids[k - 1]).

    Large images (:func:`use_tiles`) with polygon nuclei are drawn strip by strip; other
    nuclei (label masks) are built in memory (4 bytes/px)."""
    from GeneSegNet.io.images import write_label

    shape = tuple(int(v) for v in bundle.image_shape)
    if use_tiles(shape, tiled) and bundle.polygons is not None:
        polys = bundle.polygons()
        write_polygon_labels(path, polys, shape, expand_um, bundle.pixel_size_um)
        return list(polys.ids)
    if use_tiles(shape, tiled):
        logger.warning("%s: the %s nuclei are label masks, not polygons: building the "
                       "%d x %d label image in memory (%.1f GB)", path, bundle.platform,
                       shape[1], shape[0], 4 * shape[0] * shape[1] / 1e9)
    labels, ids = bundle.nuclei(shape)
    labels = expand_labels_um(labels, expand_um, bundle.pixel_size_um)
    write_label(path, labels)
    return list(ids)
