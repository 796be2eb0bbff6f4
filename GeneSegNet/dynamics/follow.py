"""Following predicted flows: where every cell pixel ends after ``niter`` Euler steps
(spec 7.2, step 2 of :func:`GeneSegNet.dynamics.reconstruct.compute_masks`).

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

from GeneSegNet.device import as_device
from GeneSegNet.dynamics import kernels

logger = logging.getLogger(__name__)

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
