"""Masks from predicted flows: follow the flows, cluster the end points, clean up (spec 7.2).

The network predicts ``dP`` ``[2, H, W]`` (dY, dX, about 5x unit vectors) and a
cell-probability logit ``[H, W]``. :func:`compute_masks` turns them into a label image:

1. ``iscell = logit > confidence_threshold``;
2. :func:`follow_flows`: every moving pixel takes ``niter`` Euler steps along the
   bilinearly interpolated field ``dP * iscell / 5``;
3. :func:`get_masks`: a histogram of the end points is clustered around its local maxima;
4. :func:`remove_bad_flow_masks`: masks whose own flows (flow targets in ``target_mode``,
   the mode the network was trained on) disagree with ``dP`` are dropped;
5. small masks are dropped and holes filled; labels are renumbered 1..K (int32).

Flow following has one definition on every device (upstream's CPU-path semantics, as
explicit gathers, not ``grid_sample``) with two executions of the same floating-point
operations: a compiled kernel on the CPU (:mod:`GeneSegNet.dynamics.kernels`) and vectorised
torch on CUDA. Tests check the two bit for bit on the CPU, and torch on CPU against
CUDA, so CPU and CUDA agree.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from scipy import ndimage

from GeneSegNet.device import as_device
from GeneSegNet.dynamics import kernels
from GeneSegNet.dynamics.flow_targets import DEFAULT_FLOW_TARGET_MODE, check_mode, masks_to_flows
from GeneSegNet.dynamics.masks import fill_holes_and_remove_small_masks, renumber

logger = logging.getLogger(__name__)

_GROW_ROUNDS = 5  # rounds of 3x3 growth around each histogram seed
_SEED_MIN_COUNT = 10  # a seed bin needs more than this many end points
_GROW_MIN_COUNT = 2  # grown regions keep bins with more than this many end points
_MAX_MASK_FRACTION = 0.4  # masks larger than this fraction of the image are removed
_CYCLE_CHECK_EVERY = 16  # flow following retires 1- and 2-cycles this often (exact)
_FLOAT_INDEX_LIMIT = 2**24  # up to this many pixels, row * W + col is exact in float32
_CPU_CHUNK = 16384  # moving pixels per CPU work unit


def _bilinear_table(field: torch.Tensor) -> torch.Tensor:
    """Per-pixel bilinear coefficients of a field ``[2, H, W]`` -> ``[8, H*W]``.

    Rows (2k, 2k+1) hold coefficient k for the (y, x) components: ``a = f00``,
    ``bx = f01 - f00``, ``by = f10 - f00``, ``bxy = f11 - f10 - f01 + f00``, where f01 /
    f10 / f11 are the right / lower / lower-right neighbours with the +1 index clamped to
    L - 1. The value interpolated at (y + wy, x + wx) is then
    ``a + wx*bx + wy*(by + wx*bxy)``.
    """
    f00 = field
    f01 = torch.cat([field[:, :, 1:], field[:, :, -1:]], dim=2)
    f10 = torch.cat([field[:, 1:], field[:, -1:]], dim=1)
    f11 = torch.cat([f10[:, :, 1:], f10[:, :, -1:]], dim=2)
    coefficients = torch.stack([f00, f01 - f00, f10 - f00, f11 - f10 - f01 + f00])
    return coefficients.reshape(8, -1).contiguous()


def _own_coordinates(height: int, width: int) -> np.ndarray:
    rows, cols = np.meshgrid(
        np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij"
    )
    return np.stack([rows, cols])


def _euler_steps(
    position: torch.Tensor, table: torch.Tensor, shape: tuple[int, int], steps: int
) -> None:
    """``steps`` Euler steps for positions ``[2, n]`` (rows, cols), updated in place.

    Every temporary is preallocated and contiguous, and each operation is a plain
    elementwise op or a gather (no fused multiply-add), so CPU and CUDA round identically.
    """
    n = position.shape[1]
    device = position.device
    small = shape[0] * shape[1] <= _FLOAT_INDEX_LIMIT
    floor = torch.empty((2, n), dtype=torch.float32, device=device)
    weight = torch.empty((2, n), dtype=torch.float32, device=device)
    flat = torch.empty(n, dtype=torch.float32, device=device) if small else None
    column = None if small else torch.empty(n, dtype=torch.int64, device=device)
    index = torch.empty(n, dtype=torch.int32 if small else torch.int64, device=device)
    coef = torch.empty((8, n), dtype=torch.float32, device=device)
    step = torch.empty((2, n), dtype=torch.float32, device=device)
    term = torch.empty((2, n), dtype=torch.float32, device=device)
    a, bx, by, bxy = coef.view(4, 2, n).unbind(0)
    wy, wx = weight[0:1], weight[1:2]
    for _ in range(steps):
        torch.floor(position, out=floor)
        torch.sub(position, floor, out=weight)
        if small:
            torch.mul(floor[0], shape[1], out=flat)
            flat.add_(floor[1])
            index.copy_(flat)
        else:
            index.copy_(floor[0])
            column.copy_(floor[1])
            index.mul_(shape[1]).add_(column)
        torch.index_select(table, 1, index, out=coef)
        torch.mul(bxy, wx, out=step)  # a + wx*bx + wy*(by + wx*bxy), per component
        step.add_(by)
        step.mul_(wy)
        torch.mul(bx, wx, out=term)
        step.add_(term)
        step.add_(a)
        position.add_(step)
        position[0].clamp_(0.0, shape[0] - 1)
        position[1].clamp_(0.0, shape[1] - 1)


def _follow_chunk(
    start: torch.Tensor, table: torch.Tensor, shape: tuple[int, int], niter: int
) -> torch.Tensor:
    """Final positions ``[2, n]`` after ``niter`` steps from ``start`` ``[2, n]``.

    The step map is deterministic, so a position that equals its value two steps earlier
    is on a cycle of period 1 or 2 and its final value is known exactly. Such positions
    (most of them, once they reach a cell's sink) are retired every
    ``_CYCLE_CHECK_EVERY`` steps, which changes the work but not the result.
    """
    result = start.clone()
    position = start.clone()
    active = torch.arange(start.shape[1], device=start.device)
    done_steps = 0
    while done_steps < niter and active.numel():
        block = min(_CYCLE_CHECK_EVERY, niter - done_steps)
        if block < 3:  # too few steps left to be worth a check
            _euler_steps(position, table, shape, block)
            break
        _euler_steps(position, table, shape, block - 2)
        before_two = position.clone()
        _euler_steps(position, table, shape, 1)
        before_one = position.clone()
        _euler_steps(position, table, shape, 1)
        done_steps += block
        if done_steps >= niter:
            break
        cycling = (position == before_two).all(dim=0)
        # On a 2-cycle the final value is the current one after an even number of
        # further steps, the previous one otherwise.
        final = before_one if (niter - done_steps) % 2 else position
        result[:, active[cycling]] = final[:, cycling]
        moving = ~cycling
        active = active[moving]
        position = position[:, moving].contiguous()
    result[:, active] = position
    return result


def follow_flows(
    dP: torch.Tensor | np.ndarray,
    iscell: torch.Tensor | np.ndarray,
    niter: int = 200,
    device: torch.device | str | None = "cpu",
    chunk_size: int | None = None,
    y_only_movers: bool = False,
) -> np.ndarray:
    """Move every cell pixel ``niter`` steps along the flow field.

    The field is ``dP * iscell / 5``. Moving pixels are those with ``|field_y| > 1e-3``
    or ``|field_x| > 1e-3``. Upstream tests only the Y component, so a pixel whose flow is
    exactly horizontal (the centre row of a symmetric cell) never moves and is usually
    left unlabelled; ``y_only_movers=True`` reproduces that. With fewer than 5 moving
    pixels nothing moves.
    Each step adds the field interpolated bilinearly at the current position (floor
    indices, the +1 neighbour clamped to L - 1: upstream's CPU path) and clamps the
    position to [0, L - 1] per axis. Pixels move independently, in float32, with the same
    elementwise operations on CPU and CUDA.

    Parameters
    ----------
    dP : ndarray or Tensor [2, H, W] float
        Predicted flows (dY, dX), about 5x unit vectors.
    iscell : ndarray or Tensor [H, W] bool
        Pixels that belong to cells.
    niter : int
        Number of Euler steps.
    device : torch.device or str
        Where to compute.
    chunk_size : int or None
        Pixels per work unit (raster-order chunks). None: 16384 on CPU, where chunks are
        spread over ``torch.get_num_threads()`` threads; all at once on CUDA. Does not
        change the result.
    y_only_movers : bool
        Test only the Y component when choosing the moving pixels (upstream's quirk);
        False (default) tests both.

    Returns
    -------
    ndarray [2, H, W] float32
        Final (row, col) position of each pixel; pixels that do not move keep their own
        coordinates.
    """
    device = as_device(device)
    dP = torch.as_tensor(dP, dtype=torch.float32, device=device)
    iscell = torch.as_tensor(iscell, device=device).to(torch.bool)
    if dP.ndim != 3 or dP.shape[0] != 2 or tuple(iscell.shape) != tuple(dP.shape[1:]):
        raise ValueError(
            f"dP must be [2, H, W] and iscell [H, W]; got {tuple(dP.shape)}, {tuple(iscell.shape)}"
        )
    height, width = dP.shape[1:]
    # A device tensor divisor: CUDA would turn division by a Python scalar into a
    # multiplication by its (inexact) reciprocal, unlike the CPU.
    field = dP * iscell / torch.full((), 5.0, device=device)
    if not bool(torch.isfinite(field).all()):
        raise ValueError("flows dP contain NaN or infinite values")
    moving = field[0].abs() > 1e-3
    if not y_only_movers:
        moving |= field[1].abs() > 1e-3
    movers = torch.nonzero(moving)
    final = torch.as_tensor(_own_coordinates(height, width), device=device)
    if movers.shape[0] < 5:
        logger.debug("fewer than 5 moving pixels; nothing to follow")
        return final.cpu().numpy()
    if device.type == "cpu":
        final = final.numpy()
        rows, cols = movers[:, 0].numpy(), movers[:, 1].numpy()
        _follow_cpu(field.numpy(), rows, cols, niter, final, chunk_size or _CPU_CHUNK)
        return final
    _follow_torch(field, movers, niter, final, chunk_size or movers.shape[0])
    return final.cpu().numpy()


def _follow_cpu(
    field: np.ndarray,
    rows: np.ndarray,
    cols: np.ndarray,
    niter: int,
    final: np.ndarray,
    chunk_size: int,
) -> None:
    """Compiled flow following (:mod:`GeneSegNet.dynamics.kernels`); writes into ``final``."""
    table = kernels.bilinear_table(np.ascontiguousarray(field))
    height, width = field.shape[1:]

    def work(start: int, stop: int) -> None:
        end_rows, end_cols = kernels.follow_positions(
            table, height, width, rows[start:stop], cols[start:stop], niter
        )
        final[0, rows[start:stop], cols[start:stop]] = end_rows
        final[1, rows[start:stop], cols[start:stop]] = end_cols

    kernels.run_in_threads(work, len(rows), chunk_size)


def _follow_torch(
    field: torch.Tensor, movers: torch.Tensor, niter: int, final: torch.Tensor, chunk_size: int
) -> None:
    """Vectorised torch flow following (the CUDA path); writes into ``final`` [2, H, W]."""
    table = _bilinear_table(field)
    shape = (field.shape[1], field.shape[2])
    for start in range(0, movers.shape[0], chunk_size):
        chunk = movers[start : start + chunk_size]
        start_position = chunk.T.to(torch.float32).contiguous()  # [2, n] (rows, cols)
        final[:, chunk[:, 0], chunk[:, 1]] = _follow_chunk(start_position, table, shape, niter)


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
