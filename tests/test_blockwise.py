"""Block-by-block mask reconstruction must agree with whole-field compute_masks."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
from scipy import ndimage

from GeneSegNet.dynamics.flow_targets import masks_to_flows
from GeneSegNet.dynamics.masks import renumber
from GeneSegNet.dynamics.reconstruct import compute_masks
from GeneSegNet.evaluation.metrics import match
from GeneSegNet.slide.blockwise import (
    block_grid,
    cell_centres,
    reconstruct_blockwise,
    upstream_label_opening,
)


def tissue(
    size: int, spacing: float, seed: int, reach: float = 0.62, jitter: float = 0.25
) -> np.ndarray:
    """Voronoi cells around a hexagonal grid jittered by up to ``jitter * spacing``, cut
    to ``reach * spacing`` from their centre (ids 1..K). Touching cells by default;
    with small jitter and ``reach`` of 0.35 the cells are separate digital disks, whose
    outlines have no long straight runs, so a cell cut along a line stands out."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[spacing / 2 : size : spacing * 0.866, spacing / 2 : size : spacing]
    cols = cols + (np.arange(rows.shape[0])[:, None] % 2) * spacing / 2
    centres = np.stack([rows.ravel(), cols.ravel()], axis=1)
    centres = np.round(centres + rng.uniform(-1, 1, centres.shape) * jitter * spacing)
    centres = centres[((centres >= 0) & (centres < size)).all(axis=1)].astype(int)
    seeds = np.zeros((size, size), bool)
    seeds[centres[:, 0], centres[:, 1]] = True
    distance, (near_r, near_c) = ndimage.distance_transform_edt(~seeds, return_indices=True)
    ids = np.zeros((size, size), np.int32)
    ids[centres[:, 0], centres[:, 1]] = np.arange(1, len(centres) + 1)
    masks = ids[near_r, near_c]
    masks[distance > reach * spacing] = 0
    return renumber(masks)


def network_like(masks: np.ndarray, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Flows 5x the ideal unit flows and logits +-5, plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    flows = 5.0 * masks_to_flows(masks) + noise * rng.normal(size=(2, *masks.shape))
    logits = np.where(masks > 0, 5.0, -5.0) + 2.0 * noise * rng.normal(size=masks.shape)
    return flows.astype(np.float32), logits.astype(np.float32)


def masks_cut_along(labels: np.ndarray, row_lines, col_lines, ratio: float = 0.6) -> set[int]:
    """Ids whose outline runs along one of the lines.

    A line at row L separates rows L-1 and L. A mask is cut there when its bounding box
    starts at row L (or ends at row L-1) and its width in that edge row is at least 4 px
    and ``ratio`` times its widest row; a round cell merely touching the line is narrow
    at its extreme row. Columns likewise.
    """
    cut = set()
    for index, box in enumerate(ndimage.find_objects(labels)):
        if box is None:
            continue
        cell = labels[box] == index + 1
        for axis, lines in ((0, row_lines), (1, col_lines)):
            widths = cell.sum(axis=1 - axis)
            lo, hi = box[axis].start, box[axis].stop
            for line in lines:
                for edge, at in ((lo, 0), (hi, -1)):
                    if edge == line and widths[at] >= 4 and widths[at] >= ratio * widths.max():
                        cut.add(index + 1)
    return cut


def inner_lines(length: int, step: int) -> list[int]:
    return list(range(step, length, step))


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_equals_whole_field_compute_masks_without_flow_check(noise):
    masks = tissue(256, 18.0, seed=1)
    flows, logits = network_like(masks, noise, seed=2)
    whole = compute_masks(flows, logits, flow_threshold=0.0)
    blocks = reconstruct_blockwise(flows, logits, block_size=64, halo=40, flow_threshold=0.0)
    assert whole.max() > 100
    np.testing.assert_array_equal(blocks, whole)  # ids included (raster order)


def test_agrees_with_whole_field_with_flow_check():
    masks = tissue(256, 18.0, seed=3)
    flows, logits = network_like(masks, 1.0, seed=4)
    whole = compute_masks(flows, logits)
    blocks = reconstruct_blockwise(flows, logits, block_size=80, halo=40)
    assert whole.max() > 100
    assert match(whole, blocks, thresholds=(0.5,)).ap[0.5] >= 0.98
    assert match(masks, blocks, thresholds=(0.5,)).ap[0.5] >= 0.9


def test_no_mask_is_cut_along_block_lines():
    masks = tissue(256, 18.0, seed=5, reach=0.35, jitter=0.1)
    flows, logits = network_like(masks, 0.5, seed=6)
    lines = inner_lines(256, 64)
    blocks = reconstruct_blockwise(flows, logits, block_size=64, halo=40)
    whole = compute_masks(flows, logits)
    naive = reconstruct_blockwise(flows, logits, block_size=64, halo=0)  # no context
    assert masks_cut_along(blocks, lines, lines) == set()
    assert masks_cut_along(whole, lines, lines) == set()  # the count does not flag real cells
    assert len(masks_cut_along(naive, lines, lines)) >= 5  # ...but does flag cut cells


def test_cell_on_a_block_corner_is_one_whole_mask():
    yy, xx = np.mgrid[:128, :128]
    disk = ((yy - 63.5) ** 2 + (xx - 64.3) ** 2 <= 14**2).astype(np.int32)
    flows, logits = network_like(disk, 0.0, seed=0)
    out = reconstruct_blockwise(flows, logits, block_size=64, halo=32)
    assert out.max() == 1
    np.testing.assert_array_equal(out, compute_masks(flows, logits))
    assert match(disk, out, thresholds=(0.9,)).tp[0.9] == 1


def test_float16_canvases_give_the_same_masks():
    masks = tissue(192, 18.0, seed=7)
    flows, logits = network_like(masks, 0.5, seed=8)
    full = reconstruct_blockwise(flows, logits, block_size=96, halo=40)
    half = reconstruct_blockwise(
        flows.astype(np.float16), logits.astype(np.float16), block_size=96, halo=40
    )
    assert match(full, half, thresholds=(0.5,)).ap[0.5] >= 0.98


def test_small_halo_is_reported(caplog):
    masks = tissue(128, 24.0, seed=9)
    flows, logits = network_like(masks, 0.0, seed=0)
    with caplog.at_level(logging.WARNING, logger="GeneSegNet.slide.blockwise"):
        reconstruct_blockwise(flows, logits, block_size=32, halo=2)
    assert "halo" in caplog.text


def test_no_cells_gives_zeros():
    flows = np.zeros((2, 50, 70), np.float32)
    out = reconstruct_blockwise(flows, np.full((50, 70), -3.0, np.float32), block_size=16)
    assert out.dtype == np.int32 and out.shape == (50, 70) and not out.any()


def test_block_grid_tiles_the_image_once():
    cover = np.zeros((70, 45), int)
    for r0, r1, c0, c1 in block_grid((70, 45), 32):
        cover[r0:r1, c0:c1] += 1
    assert (cover == 1).all()
    assert block_grid((70, 45), 32)[:2] == [(0, 32, 0, 32), (0, 32, 32, 45)]


def test_cell_centres_floor_of_mean_in_image_coordinates():
    labels = np.array([[1, 1, 0], [1, 0, 2], [0, 0, 2]])
    # id 1: rows (0, 0, 1) -> mean 1/3, cols (0, 1, 0) -> 1/3; id 2: rows 1.5, cols 2.
    centres = cell_centres(labels, offset=(10, 20))
    np.testing.assert_array_equal(centres[1:], [[10, 20], [11, 22]])
    np.testing.assert_array_equal(cell_centres(np.array([[0, 2]]))[1], [-1, -1])  # no id 1


def test_upstream_opening_equals_opencv_grey_opening():
    rng = np.random.default_rng(0)
    labels = np.kron(rng.integers(0, 9, size=(9, 7)), np.ones((6, 5), int)).astype(np.int32)
    labels[20:23, 5:30] = 11  # a 3-px bar: removed by the opening
    expected = cv2.morphologyEx(
        labels.astype(np.float32), cv2.MORPH_OPEN, np.ones((5, 5), np.uint8)
    )
    out = upstream_label_opening(labels.copy(), rows_per_step=7)
    np.testing.assert_array_equal(out, renumber(expected.astype(np.int32), order="first"))
