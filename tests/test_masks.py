"""Tests for GeneSegNet.dynamics.masks: renumbering, hole filling, filters, diameters, outlines."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from GeneSegNet.dynamics.masks import (
    compact_labels,
    diameters,
    fill_holes_and_remove_small_masks,
    outlines_list,
    remove_edge_masks,
    renumber,
    size_shape_filter,
)


def disk(shape, cy, cx, radius):
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return (rows - cy) ** 2 + (cols - cx) ** 2 <= radius**2


# ---------------------------------------------------------------------------
# renumber


def test_renumber_orders():
    masks = np.array([[0, 9, 9, 4], [70000, 0, 4, 0]], dtype=np.int64)
    by_id = renumber(masks)
    assert by_id.dtype == np.int32
    np.testing.assert_array_equal(by_id, [[0, 2, 2, 1], [3, 0, 1, 0]])
    np.testing.assert_array_equal(renumber(masks, order="first"), [[0, 1, 1, 2], [3, 0, 2, 0]])


def test_renumber_without_background_and_with_huge_ids():
    masks = np.array([[5, 5], [2**40, 3]], dtype=np.int64)  # no 0, sparse huge id
    np.testing.assert_array_equal(renumber(masks), [[2, 2], [3, 1]])
    np.testing.assert_array_equal(renumber(np.zeros((3, 2), np.uint16)), 0)


def test_renumber_many_cells_keeps_wide_type():
    masks = np.arange(1, 70001, dtype=np.int64).reshape(350, 200) * 3
    out = renumber(masks)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, np.arange(1, 70001).reshape(350, 200))


def test_renumber_rejects_floats_and_negatives():
    with pytest.raises(TypeError):
        renumber(np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError):
        renumber(np.array([[0, -1]]))


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.uint64])
@pytest.mark.parametrize("sparse", [False, True])
def test_compact_labels_against_unique(dtype, sparse):
    rng = np.random.default_rng(1)
    masks = rng.choice(np.array([0, 3, 9, 200], dtype=dtype), size=(7, 9))
    if sparse and dtype == np.uint64:
        masks[masks == 9] = 2**40  # ids far above the pixel count: the sorting path
    if sparse:
        masks[masks == 0] = 3  # no background at all
    ids, compact = compact_labels(masks)
    distinct = np.unique(masks)
    np.testing.assert_array_equal(ids, distinct[distinct > 0])
    assert ids.dtype == masks.dtype and compact.dtype == np.int32
    expected = np.searchsorted(distinct[distinct > 0], masks) + 1
    np.testing.assert_array_equal(compact, np.where(masks > 0, expected, 0))


def test_compact_labels_of_bool_image():
    ids, compact = compact_labels(np.array([[True, False], [False, True]]))
    assert ids.tolist() == [True]
    np.testing.assert_array_equal(compact, [[1, 0], [0, 1]])


# ---------------------------------------------------------------------------
# fill_holes_and_remove_small_masks


def test_fill_holes_fills_and_relabels():
    masks = np.zeros((40, 50), np.int32)
    ring = disk(masks.shape, 20, 15, 9) & ~disk(masks.shape, 20, 15, 3)
    masks[ring] = 7
    masks[2:5, 40:44] = 3  # 12 px: below min_size 15
    masks[25:35, 35:45] = 12  # 100 px
    out = fill_holes_and_remove_small_masks(masks, min_size=15)
    assert out.dtype == np.int32
    expected = np.zeros_like(masks)
    expected[disk(masks.shape, 20, 15, 9)] = 1  # id 7 -> 1, hole filled
    expected[25:35, 35:45] = 2  # id 12 -> 2
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(masks[2:5, 40:44], 3)  # input untouched


def test_fill_holes_min_size_zero_keeps_all():
    masks = np.zeros((10, 10), np.int32)
    masks[1, 1] = 5
    masks[5:8, 5:8] = 2
    out = fill_holes_and_remove_small_masks(masks, min_size=0)
    expected = np.zeros_like(masks)
    expected[1, 1] = 2
    expected[5:8, 5:8] = 1
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("ring_id, inner_id", [(1, 2), (2, 1)])
def test_fill_holes_swallows_enclosed_cell(ring_id, inner_id):
    # As upstream (in place, id order), a ring's filled hole takes over an enclosed cell.
    masks = np.zeros((30, 30), np.int32)
    masks[disk(masks.shape, 15, 15, 10)] = ring_id
    masks[disk(masks.shape, 15, 15, 4)] = inner_id
    out = fill_holes_and_remove_small_masks(masks, min_size=15)
    np.testing.assert_array_equal(out, disk(masks.shape, 15, 15, 10).astype(np.int32))


def scipy_fill_holes_reference(masks: np.ndarray, min_size: int) -> np.ndarray:
    """The per-cell loop written with scipy's binary_fill_holes, in place, id order."""
    out = masks.astype(np.int32, copy=True)
    new_id = 0
    for index, box in enumerate(ndimage.find_objects(out)):
        if box is None:
            continue
        cell = out[box] == index + 1
        if min_size > 0 and cell.sum() < min_size:
            out[box][cell] = 0
            continue
        new_id += 1
        out[box][ndimage.binary_fill_holes(cell)] = new_id
    return renumber(out)


def test_fill_holes_matches_scipy_reference_on_random_labels():
    rng = np.random.default_rng(3)
    n_with_holes = 0
    for _ in range(60):
        blobs = ndimage.gaussian_filter(rng.normal(size=(50, 60)), 2) > rng.uniform(-0.2, 0.2)
        masks = ndimage.median_filter(rng.integers(1, 9, size=(50, 60)), 5) * blobs
        masks[rng.random(masks.shape) < 0.05] = 0  # pinholes
        min_size = int(rng.integers(-1, 40))
        n_with_holes += any(
            (ndimage.binary_fill_holes(masks == v) != (masks == v)).any() for v in range(1, 9)
        )
        np.testing.assert_array_equal(
            fill_holes_and_remove_small_masks(masks, min_size),
            scipy_fill_holes_reference(masks, min_size),
        )
    assert n_with_holes > 30  # the cases exercise hole filling


# ---------------------------------------------------------------------------
# diameters


@pytest.mark.parametrize("radius", [6, 15, 30])
def test_diameter_of_disk(radius):
    masks = disk((100, 100), 50, 50, radius).astype(np.int32)
    median, per_cell = diameters(masks)
    assert median == pytest.approx(2 * radius, rel=0.03)
    np.testing.assert_allclose(per_cell, [median])


def test_diameters_median_over_cells_and_edge_cases():
    masks = np.zeros((100, 100), np.int32)
    for k, radius in enumerate([5, 10, 20]):
        masks[disk(masks.shape, 20 + 30 * k, 50, radius)] = 3 * k + 2
    median, per_cell = diameters(masks)
    assert per_cell.shape == (3,)
    assert median == pytest.approx(20, rel=0.03)
    empty_median, empty_cells = diameters(np.zeros((5, 5), np.int32))
    assert empty_median == 0.0 and empty_cells.shape == (0,)
    full, _ = diameters(np.ones((10, 10), np.int32))  # no background pixel at all
    assert full == pytest.approx(2 * np.sqrt(100 / np.pi))


# ---------------------------------------------------------------------------
# size_shape_filter (upstream's misnamed remove_edge_masks)


def test_size_shape_filter_on_tall_image():
    height, width = 400, 100  # 0.1*H = 40, 0.1*W = 10
    masks = np.zeros((height, width), np.int32)
    masks[20:220, 10:22] = 1  # tall thin: 200 x 12 (>= 10 wide): kept (upstream: dropped)
    masks[250:350, 40:48] = 2  # 100 x 8: narrower than 0.1*W: dropped
    masks[300:330, 60:90] = 3  # 30 x 30: shorter than 0.1*H: dropped
    masks[50:100, 50:55] = 4  # 50 x 5, area 250: dropped (narrow and < 300)
    masks[120:170, 40:90] = 5  # 50 x 50: kept
    out = size_shape_filter(masks)
    expected = np.zeros_like(masks)
    expected[20:220, 10:22] = 1
    expected[120:170, 40:90] = 2
    np.testing.assert_array_equal(out, expected)


def test_size_shape_filter_area_bbox_and_split():
    masks = np.zeros((100, 100), np.int32)
    masks[10:30, 10:24] = 1  # area 280 < 300: dropped
    masks[40:60, 10:30] = 2  # piece 1 of cell 2 (400 px)
    masks[40:60, 60:80] = 2  # piece 2 of cell 2: becomes its own cell
    out = size_shape_filter(masks)
    expected = np.zeros_like(masks)
    expected[40:60, 10:30] = 1
    expected[40:60, 60:80] = 2
    np.testing.assert_array_equal(out, expected)
    big = np.ones((100, 100), np.int32)  # bbox covers 100% > 90% of the image
    assert not size_shape_filter(big).any()


def test_size_shape_filter_keeps_touching_cells_apart():
    masks = np.zeros((100, 100), np.int32)
    masks[20:60, 20:40] = 4
    masks[20:60, 40:60] = 9
    out = size_shape_filter(masks)
    np.testing.assert_array_equal(np.unique(out), [0, 1, 2])
    np.testing.assert_array_equal(out[masks == 4], 1)
    np.testing.assert_array_equal(out[masks == 9], 2)


# ---------------------------------------------------------------------------
# remove_edge_masks (the real thing)


def test_remove_edge_masks():
    masks = np.zeros((30, 40), np.int32)
    masks[0:5, 10:15] = 1  # touches the top edge
    masks[10:15, 35:40] = 2  # touches the right edge
    masks[10:20, 10:20] = 3  # interior
    masks[27:29, 20:25] = 4  # one pixel away from the bottom edge
    out = remove_edge_masks(masks)
    expected = np.zeros_like(masks)
    expected[10:20, 10:20] = 1
    expected[27:29, 20:25] = 2
    np.testing.assert_array_equal(out, expected)
    wide = remove_edge_masks(masks, border=2)
    expected[27:29, 20:25] = 0
    np.testing.assert_array_equal(wide, expected)


# ---------------------------------------------------------------------------
# outlines_list


def test_outlines_of_squares():
    masks = np.zeros((20, 30), np.int32)
    masks[3:8, 4:10] = 5  # rows 3..7, cols 4..9
    masks[10:18, 20:25] = 2
    outlines = outlines_list(masks)
    assert len(outlines) == 2

    def perimeter(r0, r1, c0, c1):  # inclusive bounds, as (x, y)
        return {(x, y) for y in range(r0, r1 + 1) for x in range(c0, c1 + 1)} - {
            (x, y) for y in range(r0 + 1, r1) for x in range(c0 + 1, c1)
        }

    first, second = outlines  # ascending id: 2 then 5
    assert first.dtype == np.int32 and first.shape[1] == 2
    assert {tuple(p) for p in first} == perimeter(10, 17, 20, 24)
    assert len(first) == len(perimeter(10, 17, 20, 24))
    assert {tuple(p) for p in second} == perimeter(3, 7, 4, 9)


def test_outlines_take_largest_piece():
    masks = np.zeros((20, 20), np.int32)
    masks[2:4, 2:4] = 1
    masks[8:16, 8:16] = 1
    (outline,) = outlines_list(masks)
    assert outline[:, 0].min() == 8 and outline[:, 1].max() == 15
