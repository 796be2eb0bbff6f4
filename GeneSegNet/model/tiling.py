"""Overlapping tiles over an image and tapered blending of per-tile network outputs.

Upstream semantics (spec §7.1): tiles of 224 px, about 10 % overlap, blended with a
sigmoid taper that falls off over the outer ~20 px of each tile. :class:`TiledAccumulator`
is the streaming form of the same weighted average, for whole-slide sliding windows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np

logger = logging.getLogger(__name__)


def tile_starts(length: int, tile: int = 224, overlap: float = 0.1) -> np.ndarray:
    """Start offsets of overlapping tiles along one axis.

    The tile size is ``min(tile, length)``; the count is 1 when ``length <= tile`` and
    ``ceil((1 + 2·overlap)·length/tile)`` otherwise (upstream: ``ceil(1.2·L/224)``); the
    starts are ``linspace(0, length − size, count)`` truncated to int.

    Returns
    -------
    ndarray [n] int64
        E.g. ``tile_starts(288) == [0, 64]``.
    """
    if length < 1 or tile < 1:
        raise ValueError(f"length and tile must be positive, got {length} and {tile}")
    size = min(tile, length)
    count = 1 if length <= tile else int(math.ceil((1.0 + 2.0 * overlap) * length / tile))
    return np.linspace(0, length - size, count).astype(np.int64)


def taper_mask(tile: int | tuple[int, int] = 224, sig: float = 7.5) -> np.ndarray:
    """Separable blending weight ``w(y)·w(x)`` of one tile.

    ``w(t) = 1 / (1 + exp((|t − c| − (n/2 − 20)) / sig))`` with ``c = (n − 1)/2`` the tile
    centre and ``n`` the tile length along that axis: about 1 in the middle, 0.5 at 20 px
    from the edge, small at the edge.

    Parameters
    ----------
    tile : int or (th, tw)
        Tile size in pixels (square when an int).
    sig : float
        Width of the sigmoid fall-off in pixels.

    Returns
    -------
    ndarray [th, tw] float32
    """
    th, tw = (tile, tile) if isinstance(tile, int | np.integer) else tile

    def profile(n: int) -> np.ndarray:
        t = np.arange(n, dtype=np.float64)
        return 1.0 / (1.0 + np.exp((np.abs(t - (n - 1) / 2.0) - (n / 2.0 - 20.0)) / sig))

    return np.outer(profile(int(th)), profile(int(tw))).astype(np.float32)


def make_tiles(
    img: np.ndarray, tile: int = 224, overlap: float = 0.1
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Cut an image into overlapping tiles (no augmentation).

    Parameters
    ----------
    img : ndarray [C, H, W]
    tile, overlap : see :func:`tile_starts`.

    Returns
    -------
    tiles : ndarray [n, C, th, tw], same dtype as ``img``; ``th = min(tile, H)``,
        ``tw = min(tile, W)``; row-major order over the (row, col) starts.
    starts : list of (row_start, col_start)
    """
    if img.ndim != 3:
        raise ValueError(f"expected an image of shape [C, H, W], got shape {img.shape}")
    _, height, width = img.shape
    th, tw = min(tile, height), min(tile, width)
    starts = [
        (int(r), int(c))
        for r in tile_starts(height, tile, overlap)
        for c in tile_starts(width, tile, overlap)
    ]
    tiles = np.stack([img[:, r : r + th, c : c + tw] for r, c in starts])
    return tiles, starts


class TiledAccumulator:
    """Weighted running average of overlapping windows on a fixed canvas.

    Holds ``sum [K, H, W]`` and ``weight [H, W]``; :meth:`add` adds ``output·weight`` and
    ``weight`` at a window position (parts outside the canvas are dropped), and
    :meth:`result` returns ``sum / weight`` (0 where no window contributed).

    Parameters
    ----------
    n_channels : int
        K, channels of each window output.
    shape : (H, W)
        Canvas size in pixels.
    dtype : numpy dtype
        Storage type of the canvases, float32 (default) or float16 to halve memory.
    """

    def __init__(
        self, n_channels: int, shape: tuple[int, int], dtype: np.dtype | type = np.float32
    ) -> None:
        dtype = np.dtype(dtype)
        if dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise ValueError(f"dtype must be float32 or float16, got {dtype}")
        self.shape = (int(shape[0]), int(shape[1]))
        self.sum = np.zeros((int(n_channels), *self.shape), dtype=dtype)
        self.weight = np.zeros(self.shape, dtype=dtype)

    def add(self, output: np.ndarray, row: int, col: int, weight: np.ndarray | None = None) -> None:
        """Add one window output ``[K, h, w]`` whose top-left pixel is at (row, col).

        ``weight [h, w]`` defaults to ones (plain average).
        """
        k, h, w = output.shape
        if k != self.sum.shape[0]:
            raise ValueError(f"output has {k} channels, accumulator has {self.sum.shape[0]}")
        if weight is None:
            weight = np.ones((h, w), dtype=np.float32)
        elif weight.shape != (h, w):
            raise ValueError(f"weight shape {weight.shape} does not match output {(h, w)}")
        r0, c0 = max(row, 0), max(col, 0)
        r1, c1 = min(row + h, self.shape[0]), min(col + w, self.shape[1])
        if r1 <= r0 or c1 <= c0:
            return
        win_r, win_c = slice(r0 - row, r1 - row), slice(c0 - col, c1 - col)
        wgt = np.asarray(weight[win_r, win_c], dtype=np.float32)
        out = np.asarray(output[:, win_r, win_c], dtype=np.float32)
        self.sum[:, r0:r1, c0:c1] += out * wgt
        self.weight[r0:r1, c0:c1] += wgt

    def result(self) -> np.ndarray:
        """Return the weighted average ``[K, H, W]`` float32 (0 where the weight is 0)."""
        weight = self.weight.astype(np.float32)
        covered = weight > 0
        out = np.zeros(self.sum.shape, dtype=np.float32)
        out[:, covered] = self.sum[:, covered].astype(np.float32) / weight[covered]
        return out


def blend_tiles(
    outputs: np.ndarray,
    starts: Sequence[tuple[int, int]],
    shape: tuple[int, int],
    taper: bool = True,
) -> np.ndarray:
    """Blend per-tile outputs back into one image: ``Σ tile·mask / Σ mask``.

    Parameters
    ----------
    outputs : ndarray [n, K, th, tw]
        One output per tile, in the order of ``starts``.
    starts : sequence of (row_start, col_start)
        As returned by :func:`make_tiles`.
    shape : (H, W)
        Size of the image that was tiled.
    taper : bool
        Weight with :func:`taper_mask` (upstream ``average_tiles``); else a plain mean.

    Returns
    -------
    ndarray [K, H, W] float32
    """
    outputs = np.asarray(outputs)
    if outputs.ndim != 4 or len(outputs) != len(starts):
        raise ValueError(
            f"expected outputs [n, K, th, tw] with n = {len(starts)}, got shape {outputs.shape}"
        )
    th, tw = outputs.shape[-2:]
    mask = taper_mask((th, tw)) if taper else None
    acc = TiledAccumulator(outputs.shape[1], shape)
    for out, (row, col) in zip(outputs, starts, strict=True):
        acc.add(out, row, col, mask)
    return acc.result()
