"""Local intensity normalisation, identical for training crops and whole slides.

A global 1st/99th-percentile normalisation (:func:`GeneSegNet.data.transforms.normalize99`)
fails on slides whose brightness varies slowly (a multiplicative illumination field): the
nuclei of dim regions end up near 0. Here every pixel is mapped by

    y = (x - low(r, c)) / span(r, c)

where ``low`` and ``span = high - low`` are *local* levels: the ``lower`` / ``upper``
percentiles of square blocks of ``scale_px`` pixels, bilinearly interpolated between block
centres (constant beyond the outermost centres). The result is not clipped (as
``normalize99``).

Crop / slide consistency: blocks are anchored to *absolute* slide coordinates (block
``i`` covers rows ``[i * scale_px, (i + 1) * scale_px)``), and a crop states its
``origin`` (row, col) in the slide. Blocks fully inside a crop therefore get exactly the
levels the slide gives them; only blocks cut by the crop's edge are estimated from fewer
pixels. Exact agreement: compute the grid once for the slide (:func:`local_levels`) and
apply it to any window with its origin (:func:`apply_levels`).

Floors on the span (so that background-only regions are not blown up into noise):

- ``noise_floor`` × robust noise σ of the block (σ = 1.4826 · median|horizontal pixel
  difference| / √2, so a block of pure Gaussian noise of σ gets span ≥ 20 σ by default:
  its median maps to about 2.33 / 20 ≈ 0.12);
- a block whose span is below that floor is "background only": it takes the median span
  of its foreground neighbours (3 × 3 blocks) when it has any, so a blank gap between
  nuclei maps close to 0;
- a tiny relative floor (``1e-4`` × the block's magnitude) so constant blocks never divide
  by zero.

Non-finite pixels are treated as missing: they are ignored by the level estimates and are
0 in the output. Blocks with fewer than ``min_valid`` (fraction) finite pixels take the mean
levels of their nearest valid neighbours.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

_MAD_TO_SIGMA = 1.4826 / np.sqrt(2.0)  # median |x_i - x_j| of iid Gaussians -> sigma
_REL_FLOOR = 1e-4  # span >= 1e-4 * max(|low|, |high|)
_TINY = 1e-12


@dataclass(frozen=True)
class LevelGrid:
    """Local normalisation levels on a coarse grid of blocks.

    Attributes
    ----------
    scale_px : int
        Block size in pixels.
    block0 : (int, int)
        Absolute (row, col) block index of ``low[0, 0]``; block (i, j) covers pixels
        ``[i * scale_px, (i + 1) * scale_px)`` × ``[j * scale_px, (j + 1) * scale_px)``.
    low : ndarray [nr, nc] float32
        Background level (``lower`` percentile) per block, image units.
    span : ndarray [nr, nc] float32
        ``high - low`` after the floors, image units, > 0.
    """

    scale_px: int
    block0: tuple[int, int]
    low: np.ndarray
    span: np.ndarray

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Arrays for ``np.savez`` (e.g. stored beside a slide's crops at preprocessing)."""
        return {
            "scale_px": np.array(self.scale_px),
            "block0": np.array(self.block0),
            "low": self.low,
            "span": self.span,
        }

    @classmethod
    def from_arrays(cls, arrays) -> LevelGrid:
        """Inverse of :meth:`to_arrays` (accepts an ``np.load`` result)."""
        b0 = np.asarray(arrays["block0"]).astype(int)
        return cls(
            int(arrays["scale_px"]),
            (int(b0[0]), int(b0[1])),
            np.asarray(arrays["low"], dtype=np.float32),
            np.asarray(arrays["span"], dtype=np.float32),
        )


def _block_stats(
    padded: np.ndarray, nc: int, lower: float, upper: float, min_count: int, stride: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Levels of one row of blocks.

    ``padded`` [s, nc * s] float32 holds the pixels of the block row, NaN where missing
    (outside the image or non-finite). Returns low, high, sigma, each [nc] float64
    (NaN where a block has fewer than ``min_count`` finite pixels). The noise sigma uses
    every 4th row of the block (rows at fixed offsets from the block's edge).
    """
    s = padded.shape[0]
    blocks = padded.reshape(s, nc, s).transpose(1, 0, 2)[:, ::stride, ::stride]  # [nc, a, b]
    flat = blocks.reshape(nc, -1)
    finite = np.isfinite(flat)
    count = finite.sum(axis=1)
    low = np.full(nc, np.nan)
    high = np.full(nc, np.nan)
    sigma = np.full(nc, np.nan)
    diffs = np.abs(np.diff(blocks[:, ::4], axis=2)).reshape(nc, -1)
    full = count == flat.shape[1]
    if full.any():
        low[full], high[full] = np.percentile(flat[full], [lower, upper], axis=1)
        sigma[full] = np.median(diffs[full], axis=1) * _MAD_TO_SIGMA
    for j in np.flatnonzero(~full & (count >= min_count)):
        vals = flat[j][finite[j]]
        low[j], high[j] = np.percentile(vals, [lower, upper])
        d = diffs[j][np.isfinite(diffs[j])]
        sigma[j] = np.median(d) * _MAD_TO_SIGMA if d.size else 0.0
    return low, high, sigma


def _neighbour_fill(values: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Fill unknown cells of [nr, nc] by repeatedly averaging known 8-neighbours."""
    values = np.where(known, values, 0.0)
    known = known.copy()
    while not known.all():
        pv = np.pad(values * known, 1)
        pk = np.pad(known.astype(float), 1)
        nr, nc = values.shape
        tot = sum(pv[a : a + nr, b : b + nc] for a in range(3) for b in range(3))
        cnt = sum(pk[a : a + nr, b : b + nc] for a in range(3) for b in range(3))
        new = (~known) & (cnt > 0)
        values[new] = tot[new] / cnt[new]
        known = known | new
    return values


def _fill_background_spans(span: np.ndarray, floor: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Background-only blocks (span < floor) take the median span of foreground 3×3
    neighbours, or the floor when they have none. Arrays [nr, nc]."""
    fg = valid & (span >= floor)
    out = np.maximum(span, floor)
    nr, nc = span.shape
    pad_span = np.pad(np.where(fg, span, np.nan), 1, constant_values=np.nan)
    neigh = np.stack([pad_span[a : a + nr, b : b + nc] for a in range(3) for b in range(3)])
    has = np.isfinite(neigh).any(axis=0)
    fill = np.full(span.shape, np.nan)
    if has.any():
        fill[has] = np.nanmedian(neigh[:, has], axis=0)
    take = valid & ~fg & has
    out[take] = np.maximum(fill[take], floor[take])
    return out


def local_levels(
    image: np.ndarray,
    scale_px: int,
    *,
    origin: tuple[int, int] = (0, 0),
    lower: float = 1.0,
    upper: float = 99.0,
    noise_floor: float = 20.0,
    min_valid: float = 0.25,
    stride: int = 1,
) -> LevelGrid:
    """Local low / span levels of one channel on blocks of ``scale_px`` pixels.

    Parameters
    ----------
    image : ndarray [H, W]
        One channel, any real dtype; non-finite pixels are ignored.
    scale_px : int
        Block size in pixels; use several cell diameters (e.g. 4 × diameter).
    origin : (int, int)
        Absolute (row, col) of ``image[0, 0]`` in the slide (0, 0 for a whole slide).
    lower, upper : float
        Percentiles (0..100) giving the low and high levels of a block.
    noise_floor : float
        The span of a block is at least ``noise_floor`` × its robust noise σ.
    min_valid : float
        Blocks with fewer finite pixels than this fraction of the block are estimated from
        their neighbours (blocks cut by the image edge or by missing pixels).
    stride : int
        Estimate on every ``stride``-th row and column of each block (speed on huge
        slides; sampling is anchored to the blocks, hence to absolute coordinates).

    Returns
    -------
    LevelGrid covering every block that the image touches.
    """
    # A lazy channel (``lazy_rows``, e.g. GeneSegNet.slide.store.LazyChannel) is read one
    # band of blocks at a time below.
    img = image if getattr(image, "lazy_rows", False) else np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"expected one channel [H, W], got shape {img.shape}")
    s = int(scale_px)
    if s < 2:
        raise ValueError(f"scale_px must be >= 2, got {scale_px}")
    if stride < 1 or not 0.0 <= lower < upper <= 100.0:
        raise ValueError(f"bad stride {stride} or percentiles ({lower}, {upper})")
    height, width = img.shape
    r0, c0 = int(origin[0]), int(origin[1])
    i0, j0 = r0 // s, c0 // s
    nr = -(-(r0 + height) // s) - i0
    nc = -(-(c0 + width) // s) - j0
    per_block = len(range(0, s, stride)) ** 2
    min_count = max(int(np.ceil(min_valid * per_block)), 4)
    low = np.full((nr, nc), np.nan)
    high = np.full((nr, nc), np.nan)
    sigma = np.full((nr, nc), np.nan)
    col_off = c0 - j0 * s
    padded = np.empty((s, nc * s), dtype=np.float32)
    for i in range(nr):
        top = (i0 + i) * s - r0  # first image row of the block (may be < 0)
        rows = slice(max(top, 0), min(top + s, height))
        padded.fill(np.nan)
        padded[rows.start - top : rows.stop - top, col_off : col_off + width] = img[rows]
        low[i], high[i], sigma[i] = _block_stats(padded, nc, lower, upper, min_count, stride)
    valid = np.isfinite(low)
    if not valid.any():
        whole = np.asarray(img[0:height])
        finite = whole[np.isfinite(whole)].astype(np.float64)
        if finite.size == 0:
            logger.warning("no finite pixel: levels default to low 0, span 1")
            return LevelGrid(s, (i0, j0), np.zeros((nr, nc), np.float32),
                             np.ones((nr, nc), np.float32))
        lo, hi = np.percentile(finite, [lower, upper])
        logger.debug("too few finite pixels per block: one level for the whole image")
        low[:], high[:], sigma[:] = lo, hi, 0.0
        valid[:] = True
    span = high - low
    floor = np.maximum(noise_floor * sigma, _REL_FLOOR * np.maximum(np.abs(low), np.abs(high)))
    floor = np.maximum(floor, _TINY)
    span = _fill_background_spans(np.where(valid, span, 0.0), np.where(valid, floor, 0.0), valid)
    if not valid.all():
        low = _neighbour_fill(low, valid)
        span = _neighbour_fill(span, valid)
    logger.debug("local levels: %d x %d blocks of %d px, %d estimated from neighbours",
                 nr, nc, s, int((~valid).sum()))
    return LevelGrid(s, (i0, j0), low.astype(np.float32), span.astype(np.float32))


def _interp_matrix(n_px: int, start: int, s: int, b0: int, n_nodes: int) -> np.ndarray:
    """Bilinear weights [n_px, n_nodes] from block centres to pixel centres
    ``start .. start + n_px - 1`` (absolute), constant beyond the outer centres."""
    u = (np.arange(n_px, dtype=np.float64) + start + 0.5) / s - 0.5 - b0
    u = np.clip(u, 0.0, n_nodes - 1)
    k = np.minimum(np.floor(u).astype(int), max(n_nodes - 2, 0))
    frac = u - k
    w = np.zeros((n_px, n_nodes), dtype=np.float64)
    rows = np.arange(n_px)
    w[rows, k] = 1.0 - frac
    if n_nodes > 1:
        w[rows, k + 1] += frac
    return w


def level_maps(
    shape: tuple[int, int], grid: LevelGrid, origin: tuple[int, int] = (0, 0)
) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel (low, span) maps [H, W] float32 of a window at ``origin`` (absolute
    row, col; may lie partly outside the grid, where the levels are held constant)."""
    height, width = shape
    s = grid.scale_px
    wr = _interp_matrix(height, int(origin[0]), s, grid.block0[0], grid.low.shape[0])
    wc = _interp_matrix(width, int(origin[1]), s, grid.block0[1], grid.low.shape[1])
    wr, wc = wr.astype(np.float32), wc.astype(np.float32)
    low = wr @ (grid.low.astype(np.float32) @ wc.T)
    span = wr @ (grid.span.astype(np.float32) @ wc.T)
    return low, span


def apply_levels(
    window: np.ndarray, grid: LevelGrid, origin: tuple[int, int] = (0, 0)
) -> np.ndarray:
    """Normalise a window [H, W] whose pixel (0, 0) sits at absolute ``origin`` (row, col).

    Returns float32 [H, W]: ``(x - low) / span`` with bilinearly interpolated levels;
    0 at non-finite pixels.
    """
    x = np.asarray(window, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected one channel [H, W], got shape {x.shape}")
    low, span = level_maps(x.shape, grid, origin)
    out = np.subtract(x, low, out=low)
    out /= span
    bad = ~np.isfinite(out)
    if bad.any():
        out[bad] = 0.0
    return out


def normalize_local(
    image: np.ndarray,
    *,
    scale_px: int,
    origin: tuple[int, int] = (0, 0),
    **level_kwargs,
) -> np.ndarray:
    """Local normalisation of one channel [H, W] -> float32 [H, W].

    Same as ``apply_levels(image, local_levels(image, scale_px, origin=origin, ...),
    origin)``; ``level_kwargs`` go to :func:`local_levels`. Pass a crop's ``origin`` in
    its slide so that blocks line up with the slide's.
    """
    grid = local_levels(image, scale_px, origin=origin, **level_kwargs)
    return apply_levels(image, grid, origin)
