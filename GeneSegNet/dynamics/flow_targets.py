"""Label image -> flow training target (spec 4.1), one implementation on every device.

The diffusion is that of upstream's GPU variant (``masks_to_flows_gpu``), used on CPU and
CUDA alike (spec 12 item 20); upstream's CPU variant, with its log-index quirk, is not
reproduced. The gradient is leak-free by default; ``mode="upstream"`` gives upstream's
exactly. For a label image with cells 1..K:

1. pad by 1 px of zeros;
2. the center of a cell is its pixel nearest (squared Euclidean) to the point
   (median y, median x) of its pixels, first minimum in raster order;
3. ``n_iter = 2 * max_k (h_k + w_k + 2)`` with ``h_k, w_k`` the bbox extents of cell k;
   the same ``n_iter`` serves all cells;
4. a float64 field ``T = 0`` is iterated ``n_iter`` times: add 1 at every center, then
   synchronously ``T(p) = (1/9) * sum of T(q)`` over the 9-point stencil of ``p``
   restricted to pixels ``q`` carrying the label of ``p`` (the divisor stays 9);
5. ``T = ln(1 + T)``; ``dY = T(y+1, x) - T(y-1, x)``, ``dX = T(y, x+1) - T(y, x-1)``.
   The ``mode`` chooses the neighbours (see `FLOW_TARGET_MODES`):

   - ``"isolated"`` (the default): a neighbour that does not carry the pixel's label
     counts as ``T = 0``, so every cell gets exactly the flows it would have alone
     (given the shared ``n_iter``);
   - ``"upstream"``: raw neighbours, so a touching cell's ``T`` leaks into boundary
     gradients, as upstream does (spec 4.1). Flows following such targets can cross
     into a touching non-convex neighbour, which costs reconstruction accuracy;
6. ``(dY, dX) /= 1e-20 + |(dY, dX)|`` inside cells, 0 on background.

On the CPU a compiled kernel diffuses each cell inside its own bounding box; on CUDA
torch diffuses all cells at once over the bounding box of the labelled region. Both add
the same terms in the same order. The diffusion does not depend on the mode; the
gradient of step 5 is taken in torch on every device.

Targets are cached by label *content* (a blake2b hash of bytes, shape and dtype) and
mode, so an edited label is never served a stale target (spec 12 item 16).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from GeneSegNet.device import as_device
from GeneSegNet.dynamics import DEFAULT_FLOW_TARGET_MODE, FLOW_TARGET_MODES, kernels
from GeneSegNet.dynamics.masks import bounding_boxes, compact_labels, renumber
from GeneSegNet.io.atomic import atomic_path

logger = logging.getLogger(__name__)

# 9-point stencil as (dy, dx): self, N, S, W, E, NW, NE, SW, SE. The order fixes the
# floating-point summation order of the diffusion.
STENCIL: tuple[tuple[int, int], ...] = (
    (0, 0),
    (-1, 0),
    (1, 0),
    (0, -1),
    (0, 1),
    (-1, -1),
    (-1, 1),
    (1, -1),
    (1, 1),
)

# Neighbours of the gradient (step 5 of the module docstring): "isolated" ignores other
# cells (leak-free, the default), "upstream" takes raw neighbours (upstream's leak).
# (defined in the light package __init__ so that scripts' parsers need not import torch)

# Bumped whenever the target definition changes, so old on-disk caches miss.
_TARGET_VERSION = b"genesegnet-flow-targets-v2"
# Ids are stored in a float32 plane: beyond 2**24 they would no longer be exact.
_MAX_FLOAT32_ID = 2**24


def _check_labels(masks: np.ndarray) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim != 2:
        raise ValueError(f"label image must be 2-D [H,W], got shape {masks.shape}")
    if not (np.issubdtype(masks.dtype, np.integer) or masks.dtype == np.bool_):
        raise ValueError(f"label image must have an integer dtype, got {masks.dtype}")
    if np.issubdtype(masks.dtype, np.signedinteger) and masks.size and masks.min() < 0:
        raise ValueError("label image has negative ids; ids must be >= 0 (0 = background)")
    return masks


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is one of `FLOW_TARGET_MODES`, else raise ``ValueError``."""
    if mode not in FLOW_TARGET_MODES:
        raise ValueError(f"flow target mode must be one of {FLOW_TARGET_MODES}, got {mode!r}")
    return mode


def _geometry(compact: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Boxes ``[K,4]`` (row0, row1, col0, col1), centers ``[K,2]`` and ``n_iter`` of a
    label image with ids 1..K (see `cell_geometry`)."""
    boxes = bounding_boxes(compact)
    if boxes.shape[0] == 0:
        return boxes, np.zeros((0, 2), np.int64), 0
    centers = kernels.cell_centers(compact, boxes)
    extents = (boxes[:, 1] - boxes[:, 0]) + (boxes[:, 3] - boxes[:, 2])
    return boxes, centers, int(2 * (extents + 2).max())


def cell_geometry(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Centers and diffusion length of every cell.

    Parameters
    ----------
    masks : integer array [H,W], 0 = background, any non-negative ids.

    Returns
    -------
    ids : [K] the distinct non-zero ids, ascending (dtype of ``masks``).
    centers : int64 [K,2] (y, x) of each cell's center pixel: the cell pixel nearest to
        (median y, median x) of its pixels, first in raster order on ties (spec 4.1).
    n_iter : int, ``2 * max_k (h_k + w_k + 2)``; 0 when there are no cells.
    """
    masks = _check_labels(masks)
    ids, compact = compact_labels(masks)
    _, centers, n_iter = _geometry(compact)
    return ids, centers, n_iter


def _same_label(near: torch.Tensor, center: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0/1 weights: ``near`` carries the (non-zero) label of ``center``."""
    return ((near == center) & (center > 0)).to(dtype)


def _diagonal_fixes(lab: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Diagonal pairs that the row-then-column pass of `_diffuse` misses.

    The separable pass reaches a diagonal neighbour q = p + (dy, dx) only through the
    vertical neighbour p + (dy, 0), so it misses q when q has the label of p but
    p + (dy, 0) does not. Returns, per diagonal, flat indices of such p (into the
    [h-2,w-2] interior) and of q (into the padded [h,w] crop); each p appears once per list.
    """
    h, w = lab.shape
    inner = lab[1:-1, 1:-1]
    fixes = []
    for dy, dx in STENCIL[5:]:
        diag = lab[1 + dy : h - 1 + dy, 1 + dx : w - 1 + dx]
        vert = lab[1 + dy : h - 1 + dy, 1:-1]
        py, px = torch.nonzero((diag == inner) & (inner > 0) & (vert != inner), as_tuple=True)
        if py.numel():
            fixes.append((py * (w - 2) + px, (py + 1 + dy) * w + (px + 1 + dx)))
    return fixes


def _diffuse(lab: torch.Tensor, centers: torch.Tensor, n_iter: int,
             dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Run the label-restricted 9-point diffusion; return ``ln(1 + T)`` [h,w] in ``dtype``.

    ``lab`` is the padded label crop (int64 [h,w], ids 1..K, zero outer ring);
    ``centers`` the flat indices of the centers into it. On the CPU a compiled kernel
    diffuses one cell at a time (:func:`GeneSegNet.dynamics.kernels.diffuse_cells`); elsewhere
    torch sweeps the whole crop (:func:`_diffuse_torch`). Both add the same terms in the
    same order, so they agree bit for bit.
    """
    if lab.device.type == "cpu":
        field = torch.from_numpy(_diffuse_cpu(lab.numpy(), centers.numpy(), n_iter, dtype))
    else:
        field = _diffuse_torch(lab, centers, n_iter, dtype)
    if dtype == torch.float64:
        return torch.log(1.0 + field)  # upstream's rounding: symmetric values stay equal
    return torch.log1p(field)  # in float32, 1 + T would lose the small T near cell edges


_CELLS_PER_TASK = 64  # cells per work unit of the CPU diffusion


def _diffuse_cpu(lab: np.ndarray, centers: np.ndarray, n_iter: int,
                 dtype: torch.dtype) -> np.ndarray:
    """``T`` [h,w] of the diffusion, per cell inside its bounding box, on CPU threads."""
    boxes = bounding_boxes(lab) + np.array([-1, 1, -1, 1])  # grown by the ring
    centers_2d = np.stack(np.divmod(centers, lab.shape[1]), axis=1).astype(np.int64)
    field = torch.zeros(lab.shape, dtype=dtype).numpy()

    def work(start: int, stop: int) -> None:
        # Ids are 1..K: cell start + i of this slice has id start + i + 1.
        kernels.diffuse_cells(
            lab, boxes[start:stop], centers_2d[start:stop], n_iter, field, start
        )

    kernels.run_in_threads(work, len(boxes), _CELLS_PER_TASK)
    return field


def _diffuse_torch(lab: torch.Tensor, centers: torch.Tensor, n_iter: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """``T`` [h,w] of the diffusion, swept over the whole crop with torch ops.

    The 9-point sum over same-label neighbours is done as a masked row pass then a
    masked column pass (the same terms, each added once), plus the few diagonal terms
    that pass cannot reach (`_diagonal_fixes`). All terms are non-negative, so there is
    no cancellation.
    """
    h, w = lab.shape
    mid, inner = lab[:, 1:-1], lab[1:-1, 1:-1]
    left_w = _same_label(lab[:, :-2], mid, dtype)
    right_w = _same_label(lab[:, 2:], mid, dtype)
    up_w = _same_label(lab[:-2, 1:-1], inner, dtype)
    down_w = _same_label(lab[2:, 1:-1], inner, dtype)
    fixes = _diagonal_fixes(lab)
    field = torch.zeros((h, w), dtype=dtype, device=lab.device)
    flat = field.view(-1)
    rows = torch.empty((h, w - 2), dtype=dtype, device=lab.device)
    acc = torch.empty((h - 2, w - 2), dtype=dtype, device=lab.device)
    acc_flat = acc.view(-1)
    for _ in range(n_iter):
        flat[centers] += 1.0
        # T is 0 on background and the ring, so self terms need no weight.
        torch.addcmul(field[:, 1:-1], field[:, :-2], left_w, out=rows)
        rows.addcmul_(field[:, 2:], right_w)
        torch.addcmul(rows[1:-1], rows[:-2], up_w, out=acc)
        acc.addcmul_(rows[2:], down_w)
        for p_idx, q_idx in fixes:
            acc_flat.index_add_(0, p_idx, flat[q_idx])
        torch.div(acc, 9.0, out=field[1:-1, 1:-1])
    return field


def _gradient(logt: torch.Tensor, lab: torch.Tensor,
              mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences (dY, dX) [h-2,w-2] of ``logt`` [h,w] on the crop's interior.

    In ``"isolated"`` mode a neighbour whose label differs from the pixel's counts as 0.
    """
    below, above = logt[2:, 1:-1], logt[:-2, 1:-1]
    right, left = logt[1:-1, 2:], logt[1:-1, :-2]
    if mode == "isolated":
        inner = lab[1:-1, 1:-1]
        below = torch.where(lab[2:, 1:-1] == inner, below, 0.0)
        above = torch.where(lab[:-2, 1:-1] == inner, above, 0.0)
        right = torch.where(lab[1:-1, 2:] == inner, right, 0.0)
        left = torch.where(lab[1:-1, :-2] == inner, left, 0.0)
    return below - above, right - left


def masks_to_flows(masks: np.ndarray, device: torch.device | str | None = "cpu",
                   dtype: torch.dtype = torch.float64,
                   mode: str = DEFAULT_FLOW_TARGET_MODE) -> np.ndarray:
    """Unit flow field of a label image (spec 4.1, GPU-variant diffusion).

    Parameters
    ----------
    masks : integer array [H,W]; 0 = background, cells are any non-negative ids
        (need not be consecutive).
    device : torch device for the diffusion.
    dtype : precision of the diffusion: float64 (upstream's, the default, used for
        training targets) or float32 (about 1.7x faster on the CPU; ample for the flow-error
        quality check of reconstruction).
    mode : one of `FLOW_TARGET_MODES`: ``"isolated"`` (leak-free gradients, the default)
        or ``"upstream"`` (a touching cell's field leaks into boundary gradients).

    Returns
    -------
    float32 [2,H,W] (dY, dX): unit vectors inside cells (0 where the gradient vanishes),
    0 on background.
    """
    masks = _check_labels(masks)
    check_mode(mode)
    height, width = masks.shape
    flows = np.zeros((2, height, width), np.float32)
    ids, compact = compact_labels(masks)
    if ids.size == 0:
        return flows
    boxes, centers, n_iter = _geometry(compact)
    y0, y1 = boxes[:, 0].min(), boxes[:, 1].max()
    x0, x1 = boxes[:, 2].min(), boxes[:, 3].max()
    # Ids 1..K in a padded crop of the labelled bounding box.
    crop = np.zeros((y1 - y0 + 2, x1 - x0 + 2), np.int64)
    crop[1:-1, 1:-1] = compact[y0:y1, x0:x1]
    dev = as_device(device)
    lab = torch.from_numpy(crop).to(dev)
    flat_centers = (centers[:, 0] - y0 + 1) * crop.shape[1] + (centers[:, 1] - x0 + 1)
    logt = _diffuse(lab, torch.from_numpy(flat_centers).to(dev), n_iter, dtype)
    d_y, d_x = _gradient(logt, lab, mode)
    in_cell = lab[1:-1, 1:-1] > 0
    d_y = torch.where(in_cell, d_y, 0.0)
    d_x = torch.where(in_cell, d_x, 0.0)
    norm = torch.sqrt(d_y * d_y + d_x * d_x) + 1e-20
    out = torch.stack([d_y / norm, d_x / norm]).to(torch.float32).cpu().numpy()
    flows[:, y0:y1, x0:x1] = out
    return flows


def labels_to_flow_targets(
    labels: np.ndarray,
    device: torch.device | str | None = "cpu",
    mode: str = DEFAULT_FLOW_TARGET_MODE,
) -> np.ndarray:
    """Training target of one label image (spec 4.1 step 3); ``mode`` as `masks_to_flows`.

    Returns float32 [4,H,W]: (ids renumbered 1..K in raster order of first appearance,
    binary ``labels > 0``, dY, dX). Raises ``ValueError`` if K >= 2**24 (ids would not be
    exact in float32).
    """
    renumbered = renumber(labels, order="first")
    n_cells = int(renumbered.max()) if renumbered.size else 0
    if n_cells >= _MAX_FLOAT32_ID:
        raise ValueError(f"{n_cells} cells: ids cannot be stored exactly in a float32 target")
    target = np.empty((4, *renumbered.shape), np.float32)
    target[0] = renumbered
    target[1] = renumbered > 0
    target[2:] = masks_to_flows(renumbered, device=device, mode=mode)
    return target


def label_key(labels: np.ndarray, mode: str = DEFAULT_FLOW_TARGET_MODE) -> str:
    """Content key of a label image's target: blake2b of the target version, ``mode`` and
    the label's bytes, shape and dtype (hex, 32 chars)."""
    labels = np.ascontiguousarray(labels)
    digest = hashlib.blake2b(digest_size=16)
    digest.update(_TARGET_VERSION)
    digest.update(check_mode(mode).encode() + b"\0")
    digest.update(repr((labels.shape, labels.dtype.str)).encode())
    digest.update(labels.view(np.uint8).ravel() if labels.size else b"")
    return digest.hexdigest()


class FlowTargetCache:
    """Flow targets keyed by label content; computed on a miss.

    Parameters
    ----------
    cache_dir : folder for ``<key>.npy`` files (written atomically), or None to keep
        targets in memory only.
    device : default torch device for computing targets on a miss.
    mode : default flow target mode (one of `FLOW_TARGET_MODES`); part of the key.

    ``hits`` and ``misses`` count lookups. Returned arrays are copies, so callers may
    modify them freely.
    """

    def __init__(
        self,
        cache_dir: Path | str | None = None,
        device: torch.device | str | None = "cpu",
        mode: str = DEFAULT_FLOW_TARGET_MODE,
    ) -> None:
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.device = device
        self.mode = check_mode(mode)
        self._memory: dict[str, np.ndarray] = {}
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / f"{key}.npy"

    def _load(self, key: str, shape: tuple[int, ...]) -> np.ndarray | None:
        if self.cache_dir is None:
            return self._memory.get(key)
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            target = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            logger.warning("unreadable flow cache %s (%s); recomputing", path, err)
            return None
        if target.shape != (4, *shape) or target.dtype != np.float32:
            logger.warning("flow cache %s has the wrong shape or dtype; recomputing", path)
            return None
        return target

    def _store(self, key: str, target: np.ndarray) -> None:
        if self.cache_dir is None:
            self._memory[key] = target
            return
        with atomic_path(self._path(key)) as tmp:
            np.save(tmp, target, allow_pickle=False)

    def get(
        self,
        labels: np.ndarray,
        device: torch.device | str | None = None,
        mode: str | None = None,
    ) -> np.ndarray:
        """Float32 [4,H,W] target of ``labels`` (see `labels_to_flow_targets`).

        ``device`` overrides the cache's default device for a miss, ``mode`` its default
        mode (targets of different modes are kept apart).
        """
        labels = _check_labels(labels)
        mode = self.mode if mode is None else check_mode(mode)
        key = label_key(labels, mode)
        target = self._load(key, labels.shape)
        if target is not None:
            self.hits += 1
            return target.copy()
        self.misses += 1
        target = labels_to_flow_targets(
            labels, device=self.device if device is None else device, mode=mode
        )
        self._store(key, target)
        return target.copy()


def compute_flow_targets(
    labels: list[np.ndarray],
    device: torch.device | str | None = "cpu",
    cache: FlowTargetCache | None = None,
    progress: bool = False,
    mode: str | None = None,
) -> list[np.ndarray]:
    """Flow targets (float32 [4,H,W] each) of a list of label images, through ``cache``.

    ``mode`` (one of `FLOW_TARGET_MODES`) defaults to the cache's mode, or to
    `DEFAULT_FLOW_TARGET_MODE` without a cache.
    """
    if mode is None:
        mode = DEFAULT_FLOW_TARGET_MODE if cache is None else cache.mode
    check_mode(mode)
    targets = []
    for lab in tqdm(labels, desc="flow targets", disable=not progress):
        if cache is None:
            targets.append(labels_to_flow_targets(lab, device=device, mode=mode))
        else:
            targets.append(cache.get(lab, device=device, mode=mode))
    return targets
