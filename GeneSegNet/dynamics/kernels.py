"""Compiled CPU kernels (numba) for the loops that dominate mask reconstruction.

Eager torch spends most of its time here on memory traffic and per-operation dispatch:
flow following gathers and rewrites every moving pixel's state up to 200 times, and the
flow-target diffusion sweeps the whole image ~150 times. These kernels do the same
floating-point operations, in the same order, a few hundred pixels or one cell at a
time with the working set in cache:

- :func:`follow_positions` is flow following
  (:func:`GeneSegNet.dynamics.follow.follow_flows`), with exact cycle retirement;
- :func:`diffuse_cells` is the label-restricted 9-point diffusion of
  :mod:`GeneSegNet.dynamics.flow_targets`, one cell at a time inside its own bounding box;
- :func:`cell_centers` and :func:`fill_holes_and_filter` are the per-cell loops of
  flow targets and of :func:`GeneSegNet.dynamics.masks.fill_holes_and_remove_small_masks`.

The first two are bit-identical to the torch code they replace on the CPU (tests
compare them bit for bit); the torch code remains the implementation on CUDA. numba
compiles each kernel on first use and caches the machine code next to this file. The
kernels release the GIL, and :func:`run_in_threads` spreads independent chunks over
threads.

No multiply-add is fused here (numba's default, ``fastmath=False``), and every
constant is cast to the array's dtype, so float32 work stays in float32.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch


@numba.njit(cache=True, nogil=True)
def bilinear_table(field: np.ndarray) -> np.ndarray:
    """Per-pixel bilinear coefficients of a field ``[2, H, W]`` -> ``[H*W, 8]`` (dtype kept).

    Columns (2k, 2k+1) hold coefficient k for the (y, x) components: ``a = f00``,
    ``bx = f01 - f00``, ``by = f10 - f00``, ``bxy = f11 - f10 - f01 + f00``, where f01 /
    f10 / f11 are the right / lower / lower-right neighbours with the +1 index clamped to
    L - 1 (the transpose of ``follow._bilinear_table``).
    """
    height, width = field.shape[1], field.shape[2]
    table = np.empty((height * width, 8), dtype=field.dtype)
    for row in range(height):
        below = min(row + 1, height - 1)
        for col in range(width):
            right = min(col + 1, width - 1)
            flat = row * width + col
            for comp in range(2):
                f00 = field[comp, row, col]
                f01 = field[comp, row, right]
                f10 = field[comp, below, col]
                f11 = field[comp, below, right]
                table[flat, comp] = f00
                table[flat, 2 + comp] = f01 - f00
                table[flat, 4 + comp] = f10 - f00
                table[flat, 6 + comp] = f11 - f10 - f01 + f00
    return table


_LANES = 256  # pixels advanced together; their state stays in L1
_BLOCK = 8  # steps between two cycle checks


@numba.njit(cache=True, nogil=True)
def _advance(
    table: np.ndarray,
    width: int,
    row_max: np.float32,
    col_max: np.float32,
    rows: np.ndarray,
    cols: np.ndarray,
    n: int,
    steps: int,
    scratch: np.ndarray,
    flat: np.ndarray,
) -> None:
    """``steps`` Euler steps for the first ``n`` lanes of ``rows`` / ``cols``, in place.

    Each step runs in three passes over the lanes: cell index and weights, a gather of
    the 8 coefficients into ``scratch`` rows 2..9, then the update. The first and last
    passes have no indirect accesses and compile to SIMD code. ``scratch`` is float32
    ``[10, lanes]`` (rows 0, 1 hold wy, wx) and ``flat`` int64 ``[lanes]``.
    """
    zero = np.float32(0.0)
    for _ in range(steps):
        for i in range(n):
            row = np.int32(rows[i])  # positions are >= 0, so truncation is floor
            col = np.int32(cols[i])
            scratch[0, i] = rows[i] - np.float32(row)
            scratch[1, i] = cols[i] - np.float32(col)
            flat[i] = np.int64(row) * width + col
        for i in range(n):
            cell = flat[i]
            for k in range(8):
                scratch[2 + k, i] = table[cell, k]
        for i in range(n):
            wy = scratch[0, i]
            wx = scratch[1, i]
            y = rows[i] + (
                ((scratch[8, i] * wx + scratch[6, i]) * wy + scratch[4, i] * wx)
                + scratch[2, i]
            )
            x = cols[i] + (
                ((scratch[9, i] * wx + scratch[7, i]) * wy + scratch[5, i] * wx)
                + scratch[3, i]
            )
            rows[i] = min(max(y, zero), row_max)
            cols[i] = min(max(x, zero), col_max)


@numba.njit(cache=True, nogil=True)
def follow_positions(
    table: np.ndarray,
    height: int,
    width: int,
    start_rows: np.ndarray,
    start_cols: np.ndarray,
    niter: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Final (row, col) float32 positions after ``niter`` Euler steps from integer starts.

    Each step adds ``a + wx*bx + wy*(by + wx*bxy)`` (evaluated as
    ``((bxy*wx + by)*wy + bx*wx) + a``) with ``(wy, wx)`` the fractional position and the
    coefficients of the floor cell from :func:`bilinear_table`, then clamps each axis to
    [0, L - 1]. Up to ``_LANES`` pixels advance together in blocks of ``_BLOCK`` steps.
    After a block, a pixel whose position equals its position two steps earlier is on a
    cycle of period 1 or 2, so its final position is known exactly: it leaves, and the
    next pixel in the queue takes its lane. Positions must stay finite (the caller checks
    the field).
    """
    row_max = np.float32(height - 1)
    col_max = np.float32(width - 1)
    n = start_rows.shape[0]
    out_rows = np.empty(n, dtype=np.float32)
    out_cols = np.empty(n, dtype=np.float32)
    lanes = max(min(_LANES, n), 1)
    pixel = np.empty(lanes, dtype=np.int64)
    done = np.empty(lanes, dtype=np.int64)  # steps taken
    rows = np.empty(lanes, dtype=np.float32)
    cols = np.empty(lanes, dtype=np.float32)
    back1_rows = np.empty(lanes, dtype=np.float32)
    back1_cols = np.empty(lanes, dtype=np.float32)
    back2_rows = np.empty(lanes, dtype=np.float32)
    back2_cols = np.empty(lanes, dtype=np.float32)
    scratch = np.empty((10, lanes), dtype=np.float32)
    flat = np.empty(lanes, dtype=np.int64)
    queued = 0
    active = 0
    while True:
        while active < lanes and queued < n:  # fill free lanes from the queue
            pixel[active] = queued
            done[active] = 0
            rows[active] = np.float32(start_rows[queued])
            cols[active] = np.float32(start_cols[queued])
            active += 1
            queued += 1
        if active == 0:
            break
        block = _BLOCK
        for i in range(active):
            block = min(block, niter - done[i])
        if block >= 3:
            _advance(table, width, row_max, col_max, rows, cols, active, block - 2, scratch, flat)
            back2_rows[:active] = rows[:active]
            back2_cols[:active] = cols[:active]
            _advance(table, width, row_max, col_max, rows, cols, active, 1, scratch, flat)
            back1_rows[:active] = rows[:active]
            back1_cols[:active] = cols[:active]
            _advance(table, width, row_max, col_max, rows, cols, active, 1, scratch, flat)
        else:
            _advance(table, width, row_max, col_max, rows, cols, active, block, scratch, flat)
        kept = 0
        for i in range(active):
            steps = done[i] + block
            left = niter - steps
            finished = left == 0
            if (
                not finished
                and block >= 3
                and rows[i] == back2_rows[i]
                and cols[i] == back2_cols[i]
            ):
                finished = True
                if left % 2 == 1:  # an odd number of steps left: the other state
                    rows[i], cols[i] = back1_rows[i], back1_cols[i]
            if finished:
                out_rows[pixel[i]] = rows[i]
                out_cols[pixel[i]] = cols[i]
            else:
                pixel[kept] = pixel[i]
                done[kept] = steps
                rows[kept] = rows[i]
                cols[kept] = cols[i]
                kept += 1
        active = kept
    return out_rows, out_cols


@numba.njit(cache=True, nogil=True)
def diffuse_cells(
    labels: np.ndarray,
    boxes: np.ndarray,
    centers: np.ndarray,
    n_iter: int,
    field: np.ndarray,
    first_id: int,
) -> None:
    """Label-restricted 9-point diffusion, one cell at a time; writes ``T`` into ``field``.

    ``labels`` is the padded label crop (``[h, w]``, zero outer ring); cell k of the
    ``K`` given has id ``first_id + k + 1``, its (row0, row1, col0, col1) bounding box
    grown by the 1 px ring in ``boxes[k]`` (``[K, 4]``) and its center (row, col) in
    ``centers[k]`` (``[K, 2]``). ``field`` is a zeroed ``[h, w]`` float array that
    receives ``T`` on the cells' pixels (each call writes only its own cells' pixels).

    Per iteration: add 1 at the center, then for each pixel p of the cell
    ``rows(p) = (T(p) + T(left)) + T(right)`` and
    ``acc(p) = (rows(p) + rows(up)) + rows(down)`` over neighbours of the same label,
    plus, in the order NW, NE, SW, SE, each same-label diagonal whose vertical neighbour
    has another label; ``T(p) = acc(p) / 9``. This is the summation order of the torch
    implementation in :mod:`GeneSegNet.dynamics.flow_targets`, so the results are bit-identical.
    Neighbours are switched on and off by 0/1 weights (exact products), which keeps the
    inner loops free of branches.
    """
    nine = field.dtype.type(9.0)
    one = field.dtype.type(1.0)
    for k in range(boxes.shape[0]):
        r0, r1, c0, c1 = boxes[k, 0], boxes[k, 1], boxes[k, 2], boxes[k, 3]
        h, w = r1 - r0, c1 - c0
        inside = labels[r0:r1, c0:c1] == first_id + k + 1
        left = np.zeros((h, w), dtype=field.dtype)
        right = np.zeros((h, w), dtype=field.dtype)
        up = np.zeros((h, w), dtype=field.dtype)
        down = np.zeros((h, w), dtype=field.dtype)
        for y in range(1, h - 1):
            for x in range(1, w - 1):
                if inside[y, x]:
                    left[y, x] = one if inside[y, x - 1] else 0
                    right[y, x] = one if inside[y, x + 1] else 0
                    up[y, x] = one if inside[y - 1, x] else 0
                    down[y, x] = one if inside[y + 1, x] else 0
        # Diagonal terms the row-then-column sums miss, grouped by diagonal (NW, NE, SW,
        # SE) so that each pixel receives them in that order.
        fixes = np.empty((4 * h * w, 4), dtype=np.int64)
        n_fix = 0
        for diagonal in range(4):
            dy = -1 if diagonal < 2 else 1
            dx = -1 if diagonal % 2 == 0 else 1
            for y in range(1, h - 1):
                for x in range(1, w - 1):
                    if inside[y, x] and inside[y + dy, x + dx] and not inside[y + dy, x]:
                        fixes[n_fix, 0] = y
                        fixes[n_fix, 1] = x
                        fixes[n_fix, 2] = y + dy
                        fixes[n_fix, 3] = x + dx
                        n_fix += 1
        temp = np.zeros((h, w), dtype=field.dtype)
        rows = np.zeros((h, w), dtype=field.dtype)
        acc = np.zeros((h, w), dtype=field.dtype)
        cy, cx = centers[k, 0] - r0, centers[k, 1] - c0
        for _ in range(n_iter):
            temp[cy, cx] += one
            for y in range(1, h - 1):
                for x in range(1, w - 1):
                    rows[y, x] = (temp[y, x] + left[y, x] * temp[y, x - 1]) + right[
                        y, x
                    ] * temp[y, x + 1]
            for y in range(1, h - 1):
                for x in range(1, w - 1):
                    acc[y, x] = (rows[y, x] + up[y, x] * rows[y - 1, x]) + down[
                        y, x
                    ] * rows[y + 1, x]
            for i in range(n_fix):
                acc[fixes[i, 0], fixes[i, 1]] += temp[fixes[i, 2], fixes[i, 3]]
            for y in range(1, h - 1):
                for x in range(1, w - 1):
                    temp[y, x] = acc[y, x] / nine
        for y in range(1, h - 1):
            for x in range(1, w - 1):
                if inside[y, x]:
                    field[r0 + y, c0 + x] = temp[y, x]



@numba.njit(cache=True, nogil=True)
def _middle_value(counts: np.ndarray, offset: int, rank: int) -> int:
    """The ``rank``-th smallest (0-based) value of a histogram of ``offset + i``."""
    seen = 0
    for i in range(counts.shape[0]):
        seen += counts[i]
        if seen > rank:
            return offset + i
    return offset + counts.shape[0] - 1


@numba.njit(cache=True, nogil=True)
def cell_centers(labels: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Center pixel (row, col) of each cell ``[K, 2]`` int64 (spec 4.1).

    ``labels`` holds ids 1..K; ``boxes[k]`` is the (row0, row1, col0, col1) bounding box
    of id k + 1. The center is the cell pixel nearest (squared Euclidean, float64) to
    (median row, median col) of the cell's pixels, the median of an even count being the
    mean of the middle pair; ties go to the first pixel in raster order.
    """
    n_cells = boxes.shape[0]
    centers = np.zeros((n_cells, 2), dtype=np.int64)
    for k in range(n_cells):
        r0, r1, c0, c1 = boxes[k, 0], boxes[k, 1], boxes[k, 2], boxes[k, 3]
        row_counts = np.zeros(r1 - r0, dtype=np.int64)
        col_counts = np.zeros(c1 - c0, dtype=np.int64)
        n = 0
        for y in range(r0, r1):
            for x in range(c0, c1):
                if labels[y, x] == k + 1:
                    row_counts[y - r0] += 1
                    col_counts[x - c0] += 1
                    n += 1
        if n == 0:
            continue
        row_mid = (
            np.float64(_middle_value(row_counts, r0, (n - 1) // 2))
            + np.float64(_middle_value(row_counts, r0, n // 2))
        ) / 2.0
        col_mid = (
            np.float64(_middle_value(col_counts, c0, (n - 1) // 2))
            + np.float64(_middle_value(col_counts, c0, n // 2))
        ) / 2.0
        best = np.inf
        for y in range(r0, r1):
            for x in range(c0, c1):
                if labels[y, x] == k + 1:
                    dy = np.float64(y) - row_mid
                    dx = np.float64(x) - col_mid
                    distance = dy * dy + dx * dx
                    if distance < best:
                        best = distance
                        centers[k, 0] = y
                        centers[k, 1] = x
    return centers


@numba.njit(cache=True, nogil=True)
def fill_holes_and_filter(labels: np.ndarray, boxes: np.ndarray, min_size: int) -> int:
    """Visit ids 1..K in order: drop small cells, fill the others' holes, give new ids.

    ``labels`` (int32 ``[H, W]``) is modified in place; ``boxes[k]`` is the (row0, row1,
    col0, col1) bounding box of id k + 1 in the input (row0 == row1 when absent). A cell
    with fewer than ``min_size`` pixels (counted when visited; ``min_size <= 0`` keeps
    all) is set to 0. Otherwise it and its holes, i.e. the pixels of its bounding box
    not 4-connected to the box border through pixels of other ids, get the next new id,
    overwriting whatever lay in the holes. Returns the number of new ids handed out.
    """
    new_id = 0
    for k in range(boxes.shape[0]):
        r0, r1, c0, c1 = boxes[k, 0], boxes[k, 1], boxes[k, 2], boxes[k, 3]
        if r1 <= r0:
            continue
        label = k + 1
        count = 0
        for y in range(r0, r1):
            for x in range(c0, c1):
                if labels[y, x] == label:
                    count += 1
        if min_size > 0 and count < min_size:
            for y in range(r0, r1):
                for x in range(c0, c1):
                    if labels[y, x] == label:
                        labels[y, x] = 0
            continue
        new_id += 1
        h, w = r1 - r0, c1 - c0
        outside = np.zeros((h, w), dtype=np.bool_)
        stack = np.empty(h * w, dtype=np.int64)
        top = 0
        for y in range(h):
            for x in range(w):
                on_border = y == 0 or x == 0 or y == h - 1 or x == w - 1
                if on_border and labels[r0 + y, c0 + x] != label:
                    outside[y, x] = True
                    stack[top] = y * w + x
                    top += 1
        while top > 0:
            top -= 1
            y, x = divmod(stack[top], w)
            for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                ny, nx = y + dy, x + dx
                if 0 <= ny < h and 0 <= nx < w and not outside[ny, nx]:
                    if labels[r0 + ny, c0 + nx] != label:
                        outside[ny, nx] = True
                        stack[top] = ny * w + nx
                        top += 1
        for y in range(h):
            for x in range(w):
                if not outside[y, x]:
                    labels[r0 + y, c0 + x] = new_id
    return new_id

def run_in_threads(work: Callable[[int, int], None], n_items: int, chunk: int) -> None:
    """Call ``work(start, stop)`` on ``[0, n_items)`` in chunks of ``chunk`` items.

    The kernels above release the GIL, so chunks run in parallel on
    ``torch.get_num_threads()`` threads (the thread count a user or benchmark has set for
    torch applies here too). ``work`` must write disjoint outputs per chunk.
    """
    bounds = [(start, min(start + chunk, n_items)) for start in range(0, n_items, chunk)]
    threads = min(torch.get_num_threads(), len(bounds))
    if threads <= 1:
        for start, stop in bounds:
            work(start, stop)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for future in [pool.submit(work, start, stop) for start, stop in bounds]:
            future.result()
