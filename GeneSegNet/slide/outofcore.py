"""Out-of-core whole-slide inference: memory flat in slide size, results equal to in memory.

Three stages, each resumable through the run store (:mod:`GeneSegNet.slide.store`):

1. **Field** (network pass). The windows of :func:`GeneSegNet.slide.plan.plan_windows` run in
   the batches of the in-memory pass (``batch_size`` consecutive windows, so each batch's
   network output is the same). Each output goes to the field chunks (C x C px) it
   overlaps, each chunk a small :class:`GeneSegNet.model.tiling.TiledAccumulator` in the
   canvas dtype; windows reach a chunk in plan order, so every pixel sees the same sums
   in the same order as the image-wide canvas. A chunk is divided by its weights and
   written as soon as the last window touching it is added, then marked done. Memory:
   the chunks of about two rows of chunks (8 bytes/px in float16).
2. **Blocks** (masks). Each core block of :func:`GeneSegNet.slide.blockwise.block_grid` reads
   its region (block + halo) from the field, runs ``compute_masks`` and keeps the cells
   whose centre lies in the core (as :func:`GeneSegNet.slide.blockwise.reconstruct_blockwise`);
   the kept cells are stored per block (ids 1..n) and the block is marked done. Blocks are
   independent, so they run in any order, or in parallel (:mod:`GeneSegNet.slide.distributed`).
3. **Merge** (cheap, sequential). Blocks are pasted into the zarr label image in block
   order (a pixel claimed by two blocks keeps the first), then ids are renumbered 1..K in
   raster order of first appearance, in row strips. The label image is that of
   :func:`GeneSegNet.slide.blockwise.reconstruct_blockwise`, pixel for pixel.

Network inputs are those of the in-memory pass: image-wide percentiles from the same
strided subsample (read in row bands), or local levels computed band by band
(``image_norm="local"``), and the same transcript channels from the in-memory
:class:`GeneSegNet.slide.windows.SpotIndex` (12 bytes per spot).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from GeneSegNet.data.normalize import local_levels
from GeneSegNet.dynamics.flow_targets import DEFAULT_FLOW_TARGET_MODE
from GeneSegNet.dynamics.reconstruct import compute_masks
from GeneSegNet.model.tiling import TiledAccumulator, taper_mask
from GeneSegNet.slide.blockwise import _touching_inner_edges, block_grid, cell_centres
from GeneSegNet.slide.plan import SlideConfig, WindowPlan
from GeneSegNet.slide.store import (
    LazyImage,
    SlideStore,
    channel_percentiles_lazy,
    disk_errors,
)
from GeneSegNet.slide.windows import (
    SlideTranscripts,
    SpotIndex,
    _finalize,
    _forward_windows,
    _GlobalInputs,
)

logger = logging.getLogger(__name__)


class LazyInputs(_GlobalInputs):
    """Global-mode network inputs over a :class:`LazyImage` (same values as in memory)."""

    def __init__(self, image: LazyImage, index: SpotIndex, cfg: SlideConfig,
                 transcripts: SlideTranscripts | None = None) -> None:
        if cfg.window_local:
            raise ValueError("out-of-core inference runs in global mode only")
        self.image, self.index, self.cfg, self.transcripts = image, index, cfg, transcripts
        ev = cfg.evaluation
        n_chan = 1 if image.ndim == 2 else image.shape[2]
        self.levels = None
        if ev.normalize and ev.image_norm == "local":
            self.levels = [local_levels(image.channel(c), ev.norm_scale_px)
                           for c in range(n_chan)]
        self.image_pct = None
        if ev.normalize and self.levels is None:
            self.image_pct = channel_percentiles_lazy(image, cfg.sample_pixels)
        self.heat_pct = None
        if ev.heatmap_mode == "percentile" and ev.transcript_mode == "heatmap":
            self.heat_pct = self._heatmap_percentiles()

    def __call__(self, r0: int, c0: int) -> np.ndarray:
        window = self.cfg.window
        height, width = self.image.shape[:2]
        top, left = max(r0, 0), max(c0, 0)
        bottom, right = min(r0 + window, height), min(c0 + window, width)
        region = self.image[top:bottom, left:right]
        if region.ndim == 2:
            region = region[:, :, None]
        # the parent reads image[top:bottom, left:right] from an [H, W, C] array: give it a
        # shallow copy that holds this region (never mutate self: dask threads share it)
        view = copy.copy(self)
        view.image = _Region(region, top, left, (height, width))
        return _GlobalInputs.__call__(view, r0, c0)


class _Region:
    """An image region posing as the whole [H, W, C] image for ``_raw_window``."""

    def __init__(self, data: np.ndarray, top: int, left: int, shape: tuple[int, int]) -> None:
        self.data, self.top, self.left = data, top, left
        self.shape = (*shape, data.shape[2])

    def __getitem__(self, key) -> np.ndarray:
        rows, cols = key[0], key[1]
        return self.data[rows.start - self.top : rows.stop - self.top,
                         cols.start - self.left : cols.stop - self.left]


# ---------------------------------------------------------------- stage 1: field
@dataclass(frozen=True)
class FieldPlan:
    """Which windows touch which field chunks.

    batches : window indices per network batch (plan order).
    touches : per window, the chunks (i, j) it overlaps inside the image.
    count : [nr, nc] windows per chunk.
    """

    batches: list[list[int]]
    touches: list[list[tuple[int, int]]]
    count: np.ndarray


def field_plan(plan: WindowPlan, shape: tuple[int, int], chunk: int, batch_size: int
               ) -> FieldPlan:
    """Window batches and window-chunk overlaps of a slide of ``shape`` (H, W)."""
    height, width = shape
    grid = (-(-height // chunk), -(-width // chunk))
    count = np.zeros(grid, np.int64)
    touches = []
    for r0, c0 in plan.starts:
        r1, c1 = min(r0 + plan.window, height), min(c0 + plan.window, width)
        r0, c0 = max(r0, 0), max(c0, 0)
        cells = [(i, j) for i in range(r0 // chunk, (r1 - 1) // chunk + 1)
                 for j in range(c0 // chunk, (c1 - 1) // chunk + 1)] if r1 > r0 and c1 > c0 else []
        for i, j in cells:
            count[i, j] += 1
        touches.append(cells)
    n = len(plan.starts)
    batches = [list(range(a, min(a + batch_size, n))) for a in range(0, n, batch_size)]
    return FieldPlan(batches, touches, count)


def forward_batch(net, inputs: _GlobalInputs, plan: WindowPlan, windows: list[int],
                  device) -> np.ndarray:
    """float32 [B, 3, w, w] network outputs of the windows ``windows`` (one batch)."""
    batch = np.stack([inputs(*plan.starts[k]) for k in windows])
    return _forward_windows(net, batch, plan.net_size, device,
                            inputs.cfg.evaluation.augment)


def new_chunk(store: SlideStore, i: int, j: int, dtype: str) -> TiledAccumulator:
    r0, r1, c0, c1 = store.chunk_box(i, j)
    return TiledAccumulator(3, (r1 - r0, c1 - c0), dtype=np.dtype(dtype))


def add_to_chunk(acc: TiledAccumulator, store: SlideStore, i: int, j: int, out: np.ndarray,
                 start: tuple[int, int], weight: np.ndarray) -> None:
    """Add one window output [3, w, w] at image ``start`` to chunk (i, j)'s accumulator."""
    acc.add(out, start[0] - i * store.chunk, start[1] - j * store.chunk, weight)


def blend_field_serial(net, inputs: _GlobalInputs, plan: WindowPlan, store: SlideStore,
                       cfg: SlideConfig, device, progress: bool = False) -> int:
    """Stage 1 in this process (module docstring); returns the batches run."""
    from tqdm import tqdm

    fp = field_plan(plan, store.shape, store.chunk, cfg.evaluation.batch_size)
    done = store.field_done()
    remaining = np.where(done, 0, fp.count)
    for i, j in zip(*np.nonzero(~done & (fp.count == 0)), strict=True):  # no window: zeros
        store.write_field_chunk(int(i), int(j), np.zeros((3, *new_chunk(
            store, int(i), int(j), cfg.canvas_dtype).shape), cfg.canvas_dtype))
    weight = taper_mask(plan.window)
    needed = [b for b, idx in enumerate(fp.batches)
              if any(remaining[c] for k in idx for c in fp.touches[k])]
    open_chunks: dict[tuple[int, int], TiledAccumulator] = {}
    peak_open = 0
    for b in tqdm(needed, desc="window batches", unit="batch", disable=not progress):
        idx = fp.batches[b]
        outs = forward_batch(net, inputs, plan, idx, device)
        for k, out in zip(idx, outs, strict=True):
            for cell in fp.touches[k]:
                if done[cell]:
                    continue
                acc = open_chunks.get(cell)
                if acc is None:
                    acc = open_chunks[cell] = new_chunk(store, *cell, cfg.canvas_dtype)
                add_to_chunk(acc, store, *cell, out, plan.starts[k], weight)
                remaining[cell] -= 1
                if remaining[cell] == 0:
                    store.write_field_chunk(*cell, _finalize(open_chunks.pop(cell)))
        peak_open = max(peak_open, len(open_chunks))
    logger.debug("field: %d batches, at most %d open chunks", len(needed), peak_open)
    return len(needed)


# ---------------------------------------------------------------- stage 2: blocks
@dataclass(frozen=True)
class MaskSettings:
    """Mask reconstruction settings (as :func:`reconstruct_blockwise`)."""

    block_size: int = 2048
    halo: int = 64
    niter: int = 200
    confidence_threshold: float = 0.0
    flow_threshold: float = 0.4
    min_size: int = 15
    y_only_movers: bool = False
    target_mode: str = DEFAULT_FLOW_TARGET_MODE


def block_region(block: tuple[int, int, int, int], halo: int, shape: tuple[int, int]
                 ) -> tuple[int, int, int, int]:
    r0, r1, c0, c1 = block
    return (max(r0 - halo, 0), min(r1 + halo, shape[0]), max(c0 - halo, 0),
            min(c1 + halo, shape[1]))


def block_cells(store: SlideStore, k: int, ms: MaskSettings, device="cpu") -> int:
    """Stage 2 for block k: masks of its region, kept cells stored; returns n kept."""
    blocks = block_grid(store.shape, ms.block_size)
    r0, r1, c0, c1 = blocks[k]
    region = block_region(blocks[k], ms.halo, store.shape)
    field = store.field[:, region[0] : region[1], region[2] : region[3]].astype(np.float32)
    masks = compute_masks(field[:2], field[2], niter=ms.niter,
                          confidence_threshold=ms.confidence_threshold,
                          flow_threshold=ms.flow_threshold, min_size=ms.min_size,
                          y_only_movers=ms.y_only_movers, target_mode=ms.target_mode,
                          device=device)
    del field
    cells = np.zeros(masks.shape, np.uint32)
    truncated = 0
    if masks.any():
        centres = cell_centres(masks, (region[0], region[2]))
        keep = ((centres[:, 0] >= r0) & (centres[:, 0] < r1) & (centres[:, 1] >= c0)
                & (centres[:, 1] < c1))
        keep[0] = False
        truncated = int(keep[_touching_inner_edges(masks, region, store.shape)].sum())
        kept = np.flatnonzero(keep)
        lut = np.zeros(len(keep), np.uint32)
        lut[kept] = np.arange(1, len(kept) + 1, dtype=np.uint32)
        cells = lut[masks]
    store.write_block(k, cells, truncated)
    return int(cells.max(initial=0))


def blocks_serial(store: SlideStore, ms: MaskSettings, device="cpu",
                  progress: bool = False) -> int:
    """Stage 2 in this process for every block not yet done; returns the blocks run."""
    from tqdm import tqdm

    n_blocks = len(block_grid(store.shape, ms.block_size))
    store.ensure_blocks(n_blocks)
    todo = np.flatnonzero(~store.blocks_done())
    for k in tqdm(todo, desc="blocks", unit="block", disable=not progress):
        block_cells(store, int(k), ms, device)
    return len(todo)


# ---------------------------------------------------------------- stage 3: merge
def merge_blocks(store: SlideStore, ms: MaskSettings, strip: int | None = None) -> int:
    """Stage 3: paste the blocks in order, renumber in raster order; returns K cells."""
    blocks = block_grid(store.shape, ms.block_size)
    labels = store.fresh_labels()
    next_id, truncated, conflicts = 0, 0, 0
    for k, block in enumerate(blocks):
        cells, n, trunc = store.read_block(k)
        truncated += trunc
        if not n:
            continue
        a0, a1, b0, b1 = block_region(block, ms.halo, store.shape)
        new = cells.astype(np.int32)
        claimed = new > 0
        new[claimed] += next_id
        next_id += n
        target = labels[a0:a1, b0:b1]
        taken = claimed & (target != 0)
        conflicts += int(taken.sum())
        put = claimed & ~taken
        target[put] = new[put]
        labels[a0:a1, b0:b1] = target
    if truncated:
        logger.warning("%d cell(s) reach the outer edge of their block's %d-px halo and may "
                       "be cut; use a larger halo (about two cell diameters) or larger blocks",
                       truncated, ms.halo)
    if conflicts:
        logger.debug("%d pixel(s) claimed by cells of two blocks; the first block kept them",
                     conflicts)
    n_cells = renumber_raster(labels, next_id, strip or store.chunk)
    store.finish(n_cells)
    return n_cells


def renumber_raster(labels, max_id: int, strip: int = 1024, sub: int = 64) -> int:
    """Renumber ids of a zarr [H, W] int32 array 1..K in raster order of first appearance
    (0 stays 0), in strips of ``strip`` rows (memory: one strip). Returns K."""
    height = labels.shape[0]
    mapping = np.zeros(max_id + 1, np.int32)
    n = 0
    for r0 in range(0, height, strip):
        part = labels[r0 : min(r0 + strip, height)]
        for s0 in range(0, len(part), sub):
            flat = part[s0 : s0 + sub].ravel()
            ids, first = np.unique(flat, return_index=True)
            ids = ids[np.argsort(first, kind="stable")]
            new = ids[(ids != 0) & (mapping[ids] == 0)]
            mapping[new] = np.arange(n + 1, n + 1 + len(new), dtype=np.int32)
            n += len(new)
    for r0 in range(0, height, strip):
        r1 = min(r0 + strip, height)
        labels[r0:r1] = mapping[labels[r0:r1]]
    return n


def label_tiles(labels, tile: int):
    """Row-major ``tile`` x ``tile`` tiles of a zarr label array, edge tiles zero-padded."""
    height, width = labels.shape
    for r0 in range(0, height, tile):
        band = labels[r0 : min(r0 + tile, height)]
        for c0 in range(0, width, tile):
            out = np.zeros((tile, tile), labels.dtype)
            part = band[:, c0 : c0 + tile]
            out[: part.shape[0], : part.shape[1]] = part
            yield out


def segment_slide_out_of_core(
    net, image: LazyImage, index: SpotIndex, store: SlideStore, plan: WindowPlan,
    cfg: SlideConfig, ms: MaskSettings, *, device, progress: bool = False,
    transcripts: SlideTranscripts | None = None,
    executor: Callable[..., None] | None = None,
) -> int:
    """Run stages 1-3 (skipping what the store marks done); returns the number of cells.

    ``executor``: None runs stages 1 and 2 in this process; otherwise a callable
    ``executor(net, inputs, plan, store, cfg, ms, device)`` that runs them (e.g.
    :meth:`GeneSegNet.slide.distributed.DaskExecutor.run`).
    """
    if store.labels_done:
        logger.info("%s: label image already complete", store.path)
        return int(store.group.attrs.get("n_cells", 0))
    inputs = LazyInputs(image, index, cfg, transcripts)
    was_training = net.training
    net.eval()
    try:
        with disk_errors(store.path):
            if executor is None:
                blend_field_serial(net, inputs, plan, store, cfg, device, progress)
                blocks_serial(store, ms, device, progress)
            else:
                executor(net, inputs, plan, store, cfg, ms, device)
    finally:
        net.train(was_training)
    with disk_errors(store.path):
        return merge_blocks(store, ms)


def auto_out_of_core(shape: tuple[int, int], limit_pixels: float) -> bool:
    """True when a slide of ``shape`` exceeds ``limit_pixels`` (the --out_of_core auto rule)."""
    return shape[0] * shape[1] > limit_pixels


def store_path(save_dir: Path, name: str) -> Path:
    """The run store of sample ``name``: ``<save_dir>/label_<name>.zarr``."""
    return Path(save_dir) / f"label_{name}.zarr"


def default_chunk(window: int) -> int:
    """Chunk edge: 1024 px, at least one window (rounded up to 256)."""
    return max(1024, int(math.ceil(window / 256)) * 256)
