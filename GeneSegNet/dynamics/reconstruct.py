"""Masks from predicted flows: follow the flows, cluster the end points, clean up (spec 7.2).

The network predicts ``dP`` ``[2, H, W]`` (dY, dX, about 5x unit vectors) and a
cell-probability logit ``[H, W]``. :func:`compute_masks` turns them into a label image:

1. ``iscell = logit > confidence_threshold``;
2. :func:`GeneSegNet.dynamics.follow.follow_flows`: every moving pixel takes ``niter``
   Euler steps along the bilinearly interpolated field ``dP * iscell / 5``;
3. :func:`get_masks`: a histogram of the end points is clustered around its local maxima;
4. :func:`remove_bad_flow_masks`: masks whose own flows (flow targets in ``target_mode``,
   the mode the network was trained on) disagree with ``dP`` are dropped;
5. small masks are dropped and holes filled; labels are renumbered 1..K (int32).
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from scipy import ndimage

from GeneSegNet.dynamics.flow_targets import DEFAULT_FLOW_TARGET_MODE, check_mode, masks_to_flows
from GeneSegNet.dynamics.follow import follow_flows
from GeneSegNet.dynamics.masks import fill_holes_and_remove_small_masks, renumber

logger = logging.getLogger(__name__)

_GROW_ROUNDS = 5  # rounds of 3x3 growth around each histogram seed
_SEED_MIN_COUNT = 10  # a seed bin needs more than this many end points
_GROW_MIN_COUNT = 2  # grown regions keep bins with more than this many end points
_MAX_MASK_FRACTION = 0.4  # masks larger than this fraction of the image are removed


def _grow_seeds(counts: np.ndarray, seeds: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Regions of all seeds at once: ``[S, 11, 11]`` bool windows centred on the seeds.

    A bin joins a seed's region when it is reachable from the seed by at most
    ``_GROW_ROUNDS`` king moves through bins holding more than ``_GROW_MIN_COUNT`` end
    points: the same set as upstream's rounds of 3x3 shifts with duplicates kept. Bins
    outside ``counts`` count as empty.
    """
    r = _GROW_ROUNDS
    padded = np.pad(counts > _GROW_MIN_COUNT, r)
    offsets = np.arange(2 * r + 1)
    rows = seeds[0][:, None, None] + offsets[None, :, None]
    cols = seeds[1][:, None, None] + offsets[None, None, :]
    allowed = padded[rows, cols]
    region = np.zeros_like(allowed)
    region[:, r, r] = True
    size = 2 * r + 1
    for _ in range(r):
        grown = np.pad(region, ((0, 0), (1, 1), (1, 1)))
        region = np.zeros_like(region)
        for dy in range(3):
            for dx in range(3):
                region |= grown[:, dy : dy + size, dx : dx + size]
        region &= allowed
    return region


def get_masks(
    positions: np.ndarray,
    iscell: np.ndarray,
    rpad: int = 20,
    sort_seeds: bool = False,
) -> np.ndarray:
    """Cluster flow end points into masks with upstream's histogram rule (spec 7.2 step 3).

    Non-cell pixels are put back at their own coordinates and all positions are
    truncated to int. A histogram with unit bins over the image padded by ``rpad`` is
    built; seeds are its local maxima under a 5x5 max filter ('reflect' border) holding
    more than 10 end points. Seeds are taken in raster order (upstream never sorts them);
    ``sort_seeds=True`` takes them by descending count instead (ties in raster order).
    Each seed's region grows for 5 rounds of 3x3 steps through bins holding more than 2
    end points; a later seed overwrites an earlier one. Each pixel takes the label of
    the bin its end point falls in. Labels covering more than 0.4 * H * W pixels are
    removed, and the rest renumbered 1..K in raster order of first appearance (like
    ``fastremap.renumber``).

    Parameters
    ----------
    positions : ndarray [2, H, W] float
        Final (row, col) positions from :func:`follow_flows`, within the image.
    iscell : ndarray [H, W] bool
        Cell pixels.
    rpad : int
        Histogram padding in bins.
    sort_seeds : bool
        Process seeds by descending count (the fix upstream intended) instead of raster
        order.

    Returns
    -------
    ndarray [H, W] int32
    """
    positions = np.asarray(positions)
    iscell = np.asarray(iscell, dtype=bool)
    height, width = iscell.shape
    if positions.shape != (2, height, width):
        raise ValueError(f"positions must be [2, H, W]; got {positions.shape}")
    rows, cols = np.indices((height, width))
    bin_row = np.where(iscell, positions[0].astype(np.int64), rows) + rpad
    bin_col = np.where(iscell, positions[1].astype(np.int64), cols) + rpad
    shape = (height + 2 * rpad, width + 2 * rpad)
    flat_bin = np.ravel_multi_index((bin_row.ravel(), bin_col.ravel()), shape)
    counts = np.bincount(flat_bin, minlength=shape[0] * shape[1]).reshape(shape)
    local_max = ndimage.maximum_filter(counts, size=5, mode="reflect")
    seeds = np.nonzero((counts >= local_max) & (counts > _SEED_MIN_COUNT))
    if sort_seeds:
        order = np.argsort(-counts[seeds], kind="stable")
        seeds = (seeds[0][order], seeds[1][order])
    labels = np.zeros(shape[0] * shape[1], dtype=np.int32)
    if len(seeds[0]):
        region = _grow_seeds(counts, seeds)
        seed_index, win_row, win_col = np.nonzero(region)
        grown = np.ravel_multi_index(
            (
                seeds[0][seed_index] + win_row - _GROW_ROUNDS,
                seeds[1][seed_index] + win_col - _GROW_ROUNDS,
            ),
            shape,
        )
        # Later seeds overwrite earlier ones: keep the largest processing index per bin.
        np.maximum.at(labels, grown, (seed_index + 1).astype(np.int32))
    masks = labels[flat_bin].reshape(height, width)
    sizes = np.bincount(masks.ravel())
    too_big = np.flatnonzero(sizes > _MAX_MASK_FRACTION * height * width)
    too_big = too_big[too_big > 0]
    if len(too_big):
        masks[np.isin(masks, too_big)] = 0
    return renumber(masks, order="first")


def _to_numpy(array: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def flow_errors(
    masks: np.ndarray,
    dP: torch.Tensor | np.ndarray,
    device: torch.device | str | None = "cpu",
    target_mode: str = DEFAULT_FLOW_TARGET_MODE,
) -> np.ndarray:
    """Mean squared disagreement between each mask's own flows and the predicted flows.

    ``err_k = sum over c in (y, x) of mean over pixels of k of (flow_c - dP_c / 5)^2``,
    where ``flow`` are the unit flows recomputed from ``masks``
    (:func:`GeneSegNet.dynamics.flow_targets.masks_to_flows` in ``target_mode``) and
    ``dP`` is not masked.

    Parameters
    ----------
    masks : ndarray [H, W], integer
        Label image.
    dP : ndarray or Tensor [2, H, W] float
        Predicted flows (dY, dX), about 5x unit vectors.
    device : torch.device or str
        Device for the flow recomputation.
    target_mode : str
        Flow target mode of the recomputed flows (one of
        :data:`GeneSegNet.dynamics.flow_targets.FLOW_TARGET_MODES`); should be the mode
        the network was trained on.

    Returns
    -------
    ndarray [masks.max()] float64
        Entry k-1 belongs to id k; ids without pixels get 0.
    """
    masks = np.asarray(masks)
    check_mode(target_mode)
    dP = _to_numpy(dP).astype(np.float32, copy=False)
    if dP.shape != (2, *masks.shape):
        raise ValueError(f"dP must be [2, H, W] = [2, *masks.shape]; got {dP.shape}")
    top = int(masks.max()) if masks.size else 0
    if top == 0:
        return np.zeros(0, dtype=np.float64)
    own = masks_to_flows(masks, device=device, dtype=torch.float32, mode=target_mode)
    squared = ((own - dP / 5.0) ** 2).sum(axis=0).ravel()
    flat = masks.ravel()
    sums = np.bincount(flat, weights=squared, minlength=top + 1)[1:]
    sizes = np.bincount(flat, minlength=top + 1)[1:]
    return sums / np.maximum(sizes, 1)


def remove_bad_flow_masks(
    masks: np.ndarray,
    dP: torch.Tensor | np.ndarray,
    threshold: float = 0.4,
    device: torch.device | str | None = "cpu",
    target_mode: str = DEFAULT_FLOW_TARGET_MODE,
) -> np.ndarray:
    """Remove masks whose :func:`flow_errors` exceed ``threshold`` (ids are not renumbered).

    Parameters
    ----------
    masks : ndarray [H, W], integer
        Label image.
    dP : ndarray or Tensor [2, H, W] float
        Predicted flows (dY, dX).
    threshold : float
        Maximum allowed flow error.
    device : torch.device or str
        Device for the flow recomputation.
    target_mode : str
        See :func:`flow_errors`.

    Returns
    -------
    ndarray [H, W] int32
    """
    masks = np.asarray(masks).astype(np.int32, copy=True)
    errors = flow_errors(masks, dP, device=device, target_mode=target_mode)
    bad = np.flatnonzero(errors > threshold) + 1
    if len(bad):
        logger.debug("removing %d masks with flow error > %g", len(bad), threshold)
        masks[np.isin(masks, bad)] = 0
    return masks


def compute_masks(
    dP: torch.Tensor | np.ndarray,
    cellprob_logits: torch.Tensor | np.ndarray,
    *,
    niter: int = 200,
    confidence_threshold: float = 0.0,
    flow_threshold: float = 0.4,
    min_size: int = 15,
    device: torch.device | str | None = "cpu",
    sort_seeds: bool = False,
    y_only_movers: bool = False,
    target_mode: str = DEFAULT_FLOW_TARGET_MODE,
) -> np.ndarray:
    """Label image from predicted flows and cell-probability logits (spec 7.2 steps 1-7).

    Parameters
    ----------
    dP : ndarray or Tensor [2, H, W] float
        Predicted flows (dY, dX), about 5x unit vectors.
    cellprob_logits : ndarray or Tensor [H, W] float
        Cell-probability logits.
    niter : int
        Flow-following steps (upstream: 200, not scaled with the resize factor).
    confidence_threshold : float
        Logit threshold for cell pixels (0.0 means p > 0.5).
    flow_threshold : float
        Maximum flow error of a kept mask; 0 or less skips the check.
    min_size : int
        Minimum mask area in pixels (upstream forwards 15); 0 or less keeps all.
    device : torch.device or str
        Device for flow following and the flow check.
    sort_seeds : bool
        See :func:`get_masks`.
    y_only_movers : bool
        See :func:`follow_flows`. With upstream's rule (True), pixels with exactly
        horizontal flow stay unlabelled; on ideal flows of upstream-mode targets this
        cuts cells enough for the flow check to reject some correct cells (3-14 % on
        the test scenes; none with isolated targets).
    target_mode : str
        Flow target mode of the flow check (see :func:`flow_errors`): the mode the network
        was trained on, ``"isolated"`` (the default) or ``"upstream"``.

    Returns
    -------
    ndarray [H, W] int32
        Labels 1..K in raster order of first appearance; all zeros without cells.
    """
    check_mode(target_mode)
    logits = _to_numpy(cellprob_logits)
    if logits.ndim != 2 or tuple(dP.shape) != (2, *logits.shape):
        raise ValueError(
            f"dP must be [2, H, W] and cellprob_logits [H, W]; got {tuple(dP.shape)}, "
            f"{logits.shape}"
        )
    iscell = logits > confidence_threshold
    if not iscell.any():
        return np.zeros(logits.shape, dtype=np.int32)
    positions = follow_flows(dP, iscell, niter=niter, device=device, y_only_movers=y_only_movers)
    masks = get_masks(positions, iscell, sort_seeds=sort_seeds)
    if flow_threshold > 0 and masks.max() > 0:
        masks = remove_bad_flow_masks(
            masks, dP, threshold=flow_threshold, device=device, target_mode=target_mode
        )
    masks = fill_holes_and_remove_small_masks(masks, min_size=min_size)
    return renumber(masks, order="first")
