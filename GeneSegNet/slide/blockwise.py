"""Mask reconstruction block by block over a whole slide, with no cut or duplicated cells.

:func:`GeneSegNet.dynamics.reconstruct.compute_masks` needs working memory of tens of bytes per
pixel; over a whole slide that is too much. :func:`reconstruct_blockwise` covers the
image with non-overlapping core blocks and, for each, runs ``compute_masks`` on the
core grown by a ``halo`` on every side. Of the cells found there it keeps those whose
centre (the floor of the mean row and column of its pixels, in image coordinates) lies
in the core, and writes their pixels, which may extend into the halo, into one image-wide
label image. Every cell therefore comes whole from the one block that contains its
centre: none is cut along a block line and none is written twice.

Flow following and clustering are local: a pixel's trajectory and the histogram near a
cell's sink are the same in a block as in the whole field as long as they stay away
from the halo's outer edge, which a halo of about two cell diameters ensures. Kept cells
that touch that edge are counted and reported (a sign that the halo is too small). The
result then equals whole-field ``compute_masks``, ids included (1..K in raster order of
first appearance), up to two documented differences: the removal of masks larger than
0.4·H·W uses the area of the block with its halo, and the flow-error check recomputes
flows with a diffusion length set by the largest cell of the block (not of the image).
"""

from __future__ import annotations

import logging

import fastremap
import numpy as np
from scipy import ndimage
from tqdm import tqdm

from GeneSegNet.dynamics.flow_targets import DEFAULT_FLOW_TARGET_MODE
from GeneSegNet.dynamics.reconstruct import compute_masks

logger = logging.getLogger(__name__)


def block_grid(shape: tuple[int, int], block_size: int) -> list[tuple[int, int, int, int]]:
    """Core blocks (r0, r1, c0, c1), half-open, row-major, tiling the image exactly."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    height, width = shape
    return [
        (r0, min(r0 + block_size, height), c0, min(c0 + block_size, width))
        for r0 in range(0, height, block_size)
        for c0 in range(0, width, block_size)
    ]


def cell_centres(masks: np.ndarray, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Centre of every id 0..K: floor of the mean (row, col) of its pixels plus ``offset``.

    Integer arithmetic throughout, so the same pixel set gives the same centre in any
    block. Returns int64 [K + 1, 2]; ids without pixels get (-1, -1).
    """
    flat = masks.ravel()
    top = int(flat.max(initial=0))
    sizes = np.bincount(flat, minlength=top + 1)
    rows, cols = np.divmod(np.arange(flat.size, dtype=np.int64), masks.shape[1])
    sum_r = np.rint(np.bincount(flat, weights=rows, minlength=top + 1)).astype(np.int64)
    sum_c = np.rint(np.bincount(flat, weights=cols, minlength=top + 1)).astype(np.int64)
    n = np.maximum(sizes, 1)
    centres = np.stack([sum_r // n + offset[0], sum_c // n + offset[1]], axis=1)
    centres[sizes == 0] = -1
    return centres


def _touching_inner_edges(
    masks: np.ndarray, region: tuple[int, int, int, int], shape: tuple[int, int]
) -> np.ndarray:
    """Ids on the edges of ``region`` that are not edges of the image."""
    r0, r1, c0, c1 = region
    edges = []
    if r0 > 0:
        edges.append(masks[0])
    if r1 < shape[0]:
        edges.append(masks[-1])
    if c0 > 0:
        edges.append(masks[:, 0])
    if c1 < shape[1]:
        edges.append(masks[:, -1])
    if not edges:
        return np.zeros(0, dtype=masks.dtype)
    return np.unique(np.concatenate(edges))


def reconstruct_blockwise(
    flows: np.ndarray,
    cellprob: np.ndarray,
    *,
    block_size: int = 2048,
    halo: int = 64,
    niter: int = 200,
    confidence_threshold: float = 0.0,
    flow_threshold: float = 0.4,
    min_size: int = 15,
    y_only_movers: bool = False,
    target_mode: str = DEFAULT_FLOW_TARGET_MODE,
    device="cpu",
    progress: bool = False,
) -> np.ndarray:
    """Label image of a whole slide from its flows and logits, one block at a time.

    Parameters
    ----------
    flows : [2, H, W] float (float16 allowed), network (dY, dX), about 5x unit vectors.
    cellprob : [H, W] float, cell-probability logits.
    block_size : core block edge in pixels.
    halo : pixels added on each side of a core block (about two cell diameters).
    niter, confidence_threshold, flow_threshold, min_size, y_only_movers, target_mode, device :
        as :func:`GeneSegNet.dynamics.reconstruct.compute_masks`.
    progress : show a progress bar over blocks.

    Returns
    -------
    ndarray [H, W] int32, cells 1..K in raster order of first appearance.
    """
    height, width = cellprob.shape
    if flows.shape != (2, height, width):
        raise ValueError(f"flows must be [2, H, W] = [2, {height}, {width}], got {flows.shape}")
    if halo < 0:
        raise ValueError(f"halo must be >= 0, got {halo}")
    labels = np.zeros((height, width), dtype=np.int32)
    next_id, conflicts, truncated = 0, 0, 0
    blocks = block_grid((height, width), block_size)
    for r0, r1, c0, c1 in tqdm(blocks, desc="blocks", unit="block", disable=not progress):
        region = (
            max(r0 - halo, 0),
            min(r1 + halo, height),
            max(c0 - halo, 0),
            min(c1 + halo, width),
        )
        rows, cols = slice(region[0], region[1]), slice(region[2], region[3])
        masks = compute_masks(
            np.asarray(flows[:, rows, cols], dtype=np.float32),
            np.asarray(cellprob[rows, cols], dtype=np.float32),
            niter=niter,
            confidence_threshold=confidence_threshold,
            flow_threshold=flow_threshold,
            min_size=min_size,
            y_only_movers=y_only_movers,
            target_mode=target_mode,
            device=device,
        )
        if not masks.any():
            continue
        centres = cell_centres(masks, (region[0], region[2]))
        keep = (
            (centres[:, 0] >= r0)
            & (centres[:, 0] < r1)
            & (centres[:, 1] >= c0)
            & (centres[:, 1] < c1)
        )
        keep[0] = False
        truncated += int(keep[_touching_inner_edges(masks, region, (height, width))].sum())
        kept = np.flatnonzero(keep)
        lut = np.zeros(len(keep), dtype=np.int32)
        lut[kept] = np.arange(next_id + 1, next_id + 1 + len(kept), dtype=np.int32)
        next_id += len(kept)
        new = lut[masks]
        target = labels[rows, cols]
        claimed = new > 0
        taken = claimed & (target != 0)
        conflicts += int(taken.sum())
        target[claimed & ~taken] = new[claimed & ~taken]
    if truncated:
        logger.warning(
            "%d cell(s) reach the outer edge of their block's %d-px halo and may be cut; "
            "use a larger halo (about two cell diameters) or larger blocks",
            truncated,
            halo,
        )
    if conflicts:
        logger.debug(
            "%d pixel(s) claimed by cells of two blocks; the first block kept them", conflicts
        )
    fastremap.renumber(labels, preserve_zero=True, in_place=True)
    logger.debug("%d cells from %d blocks", int(labels.max(initial=0)), len(blocks))
    return labels


def upstream_label_opening(labels: np.ndarray, rows_per_step: int = 512) -> np.ndarray:
    """Upstream's grey-level 5×5 opening of the label image itself, in place (spec §8).

    Erosion (min) then dilation (max) over 5×5 squares of ids, so it removes parts
    thinner than 5 px and can move contacts between cells toward the higher id
    (spec §12 item 28); kept only for comparison with upstream. Image borders are
    ignored as by OpenCV. Done in strips of rows; ids are renumbered 1..K afterwards.
    """
    height = labels.shape[0]
    reach = 4  # an opening with a 5×5 square reads pixels up to 4 away
    if rows_per_step < reach:
        raise ValueError(f"rows_per_step must be >= {reach}, got {rows_per_step}")
    above = labels[:0].copy()  # original (not yet opened) rows just above the strip
    for r0 in range(0, height, rows_per_step):
        r1 = min(r0 + rows_per_step, height)
        region = np.concatenate([above, labels[r0 : min(r1 + reach, height)]])
        opened = ndimage.grey_opening(region, size=(5, 5), mode="reflect")
        start = len(above)
        above = labels[max(r1 - reach, 0) : r1].copy()
        labels[r0:r1] = opened[start : start + r1 - r0]
    fastremap.renumber(labels, preserve_zero=True, in_place=True)
    return labels
