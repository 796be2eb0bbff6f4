"""Tests for GeneSegNet.dynamics.flow_targets against a literal per-cell, per-pixel reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import GeneSegNet.dynamics.flow_targets as ft
from GeneSegNet.dynamics.flow_targets import (
    FLOW_TARGET_MODES,
    FlowTargetCache,
    compute_flow_targets,
    labels_to_flow_targets,
    masks_to_flows,
)
from GeneSegNet.dynamics.masks import compact_labels, renumber

# 9-point stencil written out independently of the module: self, N, S, W, E, NW, NE, SW, SE.
NEIGHBOURS = [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1), (-1, -1), (-1, 1), (1, -1), (1, 1)]


def reference_flows(
    masks: np.ndarray, mode: str = "isolated"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spec 4.1 GPU variant, one cell and one pixel at a time (tiny masks only).

    ``mode="upstream"`` takes the gradient on raw neighbours (spec 4.1); ``"isolated"``
    reads a neighbour of another label as 0.

    Returns the float64 unit flows [2,H,W], the raw gradient norm [H,W] and the largest
    |ln(1+T)| of the four neighbours used for it [H,W] (its rounding scale).
    """
    height, width = masks.shape
    pad = [[0] * (width + 2) for _ in range(height + 2)]
    for y in range(height):
        for x in range(width):
            pad[y + 1][x + 1] = int(masks[y, x])
    cells = sorted({v for row in pad for v in row} - {0})
    flows = np.zeros((2, height, width))
    raw_norm = np.zeros((height, width))
    scale = np.zeros((height, width))
    if not cells:
        return flows, raw_norm, scale
    pixels, centers, n_iter = {}, [], 0
    for cell in cells:
        # raster order over the padded image
        pts = [(y, x) for y in range(height + 2) for x in range(width + 2) if pad[y][x] == cell]
        pixels[cell] = pts
        ymed = float(np.median([p[0] for p in pts]))
        xmed = float(np.median([p[1] for p in pts]))
        best, best_d = None, math.inf
        for y, x in pts:
            d = (y - ymed) ** 2 + (x - xmed) ** 2
            if d < best_d:  # strict: keeps the first minimum
                best, best_d = (y, x), d
        centers.append(best)
        bbox_h = max(p[0] for p in pts) - min(p[0] for p in pts) + 1
        bbox_w = max(p[1] for p in pts) - min(p[1] for p in pts) + 1
        n_iter = max(n_iter, 2 * (bbox_h + bbox_w + 2))
    field = [[0.0] * (width + 2) for _ in range(height + 2)]
    for _ in range(n_iter):
        for y, x in centers:
            field[y][x] += 1.0
        new = [row[:] for row in field]
        for cell in cells:
            for y, x in pixels[cell]:
                total = 0.0
                for dy, dx in NEIGHBOURS:
                    if pad[y + dy][x + dx] == cell:
                        total += field[y + dy][x + dx]
                new[y][x] = total / 9
        field = new
    full = np.log(1.0 + np.array(field))
    for cell in cells:
        # The log field as the gradient of this cell sees it.
        logt = full if mode == "upstream" else np.where(np.array(pad) == cell, full, 0.0)
        for y, x in pixels[cell]:
            d_y = logt[y + 1, x] - logt[y - 1, x]
            d_x = logt[y, x + 1] - logt[y, x - 1]
            norm = math.sqrt(d_y * d_y + d_x * d_x)
            flows[0, y - 1, x - 1] = d_y / (1e-20 + norm)
            flows[1, y - 1, x - 1] = d_x / (1e-20 + norm)
            raw_norm[y - 1, x - 1] = norm
            scale[y - 1, x - 1] = max(
                abs(logt[y + 1, x]), abs(logt[y - 1, x]), abs(logt[y, x + 1]), abs(logt[y, x - 1])
            )
    return flows, raw_norm, scale


def assert_matches_reference(
    masks: np.ndarray, max_undefined: int = 2, modes: tuple[str, ...] = FLOW_TARGET_MODES
) -> np.ndarray:
    """Compare masks_to_flows with the reference in each mode; return our default flows."""
    for mode in modes[::-1]:  # the default mode ("isolated") last
        ours = _assert_mode_matches_reference(masks, max_undefined, mode)
    return ours


def _assert_mode_matches_reference(masks: np.ndarray, max_undefined: int, mode: str):
    ours = masks_to_flows(masks, mode=mode)
    assert ours.shape == (2, *masks.shape) and ours.dtype == np.float32
    ref, raw_norm, scale = reference_flows(masks, mode)
    # Where the raw gradient is zero up to rounding of the values it is taken from, its
    # direction is undefined (a 1-ulp difference may flip it): compare elsewhere only.
    defined = raw_norm > 1e-9 * scale
    np.testing.assert_allclose(ours[:, defined], ref[:, defined], atol=1e-6, rtol=0)
    exactly_zero = (raw_norm == 0) | (masks == 0)
    np.testing.assert_array_equal(ours[:, exactly_zero], 0.0)
    ours_norm = np.hypot(ours[0], ours[1])
    assert np.all(ours_norm <= 1 + 1e-6), "flows longer than 1"
    assert (~defined & ~exactly_zero).sum() <= max_undefined, "too many ill-defined pixels"
    return ours


def disk(shape, center, radius, value=1) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    inside = (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2
    return np.where(inside, value, 0).astype(np.int32)


def voronoi_cells(shape, n_seeds, rng, max_dist) -> np.ndarray:
    seeds = rng.uniform(0, 1, (n_seeds, 2)) * np.array(shape)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    d2 = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
    labels = d2.argmin(-1).astype(np.int32) + 1
    labels[d2.min(-1) > max_dist**2] = 0
    return labels


# --- agreement with the reference -------------------------------------------------------


def test_single_disk_matches_reference():
    assert_matches_reference(disk((15, 15), (7, 7), 5))


def test_touching_cells_match_reference():
    masks = np.zeros((12, 14), np.int32)
    masks[1:11, 1:7] = 1
    masks[1:11, 7:13] = 2  # shares a long edge with cell 1
    masks[4:8, 5:9] = 3  # overlaps both: touches them on three sides
    ours = assert_matches_reference(masks)
    # Cell 1 alone has the same diffusion (same pixels, same n_iter). Isolated targets
    # (the default) are exactly those of the cell alone; upstream's differ where a
    # 4-neighbour belongs to another cell (leakage).
    alone = masks_to_flows(np.where(masks == 1, 1, 0))
    cell = masks == 1
    np.testing.assert_array_equal(ours[:, cell], alone[:, cell])
    upstream = masks_to_flows(masks, mode="upstream")
    padded = np.pad(masks, 1)
    others = [padded[2:, 1:-1], padded[:-2, 1:-1], padded[1:-1, 2:], padded[1:-1, :-2]]
    at_contact = cell & np.any([(o != 0) & (o != 1) for o in others], axis=0)
    inside = cell & ~at_contact
    np.testing.assert_array_equal(upstream[:, inside], alone[:, inside])
    assert np.abs(upstream[:, at_contact] - alone[:, at_contact]).max() > 0.1


def test_isolated_flows_are_those_of_each_cell_alone(rng):
    masks = voronoi_cells((40, 37), 10, rng, max_dist=9)
    _, _, n_iter = ft.cell_geometry(masks)
    ours = masks_to_flows(masks)
    for lab in np.unique(masks)[1:]:
        alone = np.where(masks == lab, lab, 0)
        # Give the lone cell the scene's n_iter (it depends on the largest bbox only): add
        # a far-away bar whose bbox_h + bbox_w equals that of the scene's largest cell.
        canvas = np.zeros((masks.shape[0] + n_iter, masks.shape[1] + n_iter), np.int32)
        canvas[: masks.shape[0], : masks.shape[1]] = alone
        extent = n_iter // 2 - 2  # bbox_h + bbox_w
        canvas[-1, -extent + 1 :] = lab + 1000  # a 1 x (extent - 1) bar
        assert ft.cell_geometry(canvas)[2] == n_iter
        flows = masks_to_flows(canvas)[:, : masks.shape[0], : masks.shape[1]]
        np.testing.assert_array_equal(ours[:, masks == lab], flows[:, masks == lab])


def test_random_touching_cells_match_reference(rng):
    masks = voronoi_cells((16, 18), 6, rng, max_dist=6)
    assert len(np.unique(masks)) > 4
    assert_matches_reference(masks)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noise_labels_match_reference(seed):
    """Every pixel a random id: fragmented cells, diagonal-only contacts, staircases."""
    masks = np.random.default_rng(seed).integers(0, 4, (11, 13)).astype(np.int32)
    assert_matches_reference(masks)


def test_diagonal_staircase_cell_matches_reference():
    masks = np.zeros((9, 9), np.int32)
    for i in range(8):
        masks[i, i] = 1  # connected through corners only
        masks[i + 1, i] = 2  # a second staircase hugging the first
    assert_matches_reference(masks)


def test_cells_on_image_border_match_reference():
    masks = np.zeros((10, 11), np.int32)
    masks[0:4, 0:5] = 1  # top-left corner
    masks[6:10, 3:11] = 2  # bottom edge and right edge
    masks[0:3, 8:11] = 3  # top-right corner
    assert_matches_reference(masks)


def test_non_square_images_match_reference():
    wide = np.zeros((7, 19), np.int32)
    wide[1:6, 1:9] = 1
    wide[2:7, 9:18] = 2
    assert_matches_reference(wide)
    assert_matches_reference(np.ascontiguousarray(wide.T))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32, np.int64, np.uint64])
def test_non_consecutive_ids_match_reference(dtype):
    masks = np.zeros((9, 12), dtype)
    big = 200 if dtype == np.uint8 else 70000 if dtype != np.uint16 else 60000
    masks[1:5, 1:6] = 5
    masks[4:8, 6:11] = big
    masks[6:9, 0:4] = 17
    ours = assert_matches_reference(masks)
    # Same flows as the consecutive relabelling (the target does not depend on id values).
    relabelled = np.select([masks == 5, masks == big, masks == 17], [1, 2, 3], 0)
    np.testing.assert_array_equal(ours, masks_to_flows(relabelled.astype(np.int32)))


def test_cell_with_hole_and_cell_inside_match_reference():
    masks = disk((15, 15), (7, 7), 6, value=4)
    masks[disk((15, 15), (7, 7), 2) > 0] = 0  # annulus: median point lies in the hole
    masks[7, 7] = 9  # a one-pixel cell in the hole, touching nothing
    assert_matches_reference(masks)


def test_one_pixel_cells():
    masks = np.zeros((6, 7), np.int32)
    masks[1, 1] = 1  # isolated: gradient is exactly 0
    masks[3:6, 3:6] = 2
    masks[2, 4] = 3  # touching cell 2: gets a leaked gradient in upstream mode only
    ours = assert_matches_reference(masks)
    np.testing.assert_array_equal(ours[:, 1, 1], [0.0, 0.0])
    np.testing.assert_array_equal(ours[:, 2, 4], [0.0, 0.0])
    upstream = masks_to_flows(masks, mode="upstream")
    np.testing.assert_array_equal(upstream[:, 1, 1], [0.0, 0.0])
    assert np.hypot(*upstream[:, 2, 4]) == pytest.approx(1.0, abs=1e-6)


def test_empty_mask_gives_zeros():
    for shape in [(5, 8), (0, 4), (3, 0)]:
        flows = masks_to_flows(np.zeros(shape, np.uint16))
        assert flows.shape == (2, *shape) and flows.dtype == np.float32
        assert not flows.any()


def test_bool_mask_is_one_cell():
    masks = disk((11, 9), (5, 4), 3)
    np.testing.assert_array_equal(masks_to_flows(masks > 0), masks_to_flows(masks))


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        masks_to_flows(np.zeros((2, 3, 4), np.int32))
    with pytest.raises(ValueError, match="integer"):
        masks_to_flows(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="negative"):
        masks_to_flows(-np.ones((3, 4), np.int32))


def test_sparse_cells_far_apart_match_reference():
    """Bounding-box cropping must not change the answer."""
    masks = np.zeros((40, 45), np.int32)
    masks[30:34, 38:43] = 2
    masks[2:5, 3:7] = 1
    ours = masks_to_flows(masks)
    np.testing.assert_array_equal(
        ours[:, 30:34, 38:43], masks_to_flows(masks[29:35, 37:44])[:, 1:-1, 1:-1]
    )
    assert_matches_reference(masks[:8, :10])


# --- the compiled CPU diffusion against the torch sweep (the CUDA code) --------------------


def padded_compact(masks: np.ndarray) -> np.ndarray:
    """Ids 1..K (ascending original ids) with a 1 px zero ring, as masks_to_flows builds."""
    _, compact = compact_labels(masks)
    return np.pad(compact, 1).astype(np.int64)


def diffusion_scenes() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    staircase = np.zeros((12, 12), np.int32)
    for i in range(10):
        staircase[i, i : i + 2] = 1
        staircase[i + 1, i] = 2
    ring = disk((21, 21), (10, 10), 8, value=3)
    ring[disk((21, 21), (10, 10), 3) > 0] = 0
    ring[9:12, 9:12] = 8  # a cell inside the hole
    return [
        voronoi_cells((40, 37), 12, rng, max_dist=9),
        rng.integers(0, 5, (17, 19)).astype(np.int32),  # fragments, diagonal contacts
        staircase,
        ring,
    ]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cpu_diffusion_equals_torch_sweep_bit_for_bit(dtype):
    for masks in diffusion_scenes():
        lab = padded_compact(masks)
        _, centers, n_iter = ft.cell_geometry(masks)
        flat = (centers[:, 0] + 1) * lab.shape[1] + centers[:, 1] + 1
        ours = ft._diffuse_cpu(lab, flat, n_iter, dtype)
        sweep = ft._diffuse_torch(torch.from_numpy(lab), torch.from_numpy(flat), n_iter, dtype)
        assert ours.dtype == sweep.numpy().dtype
        assert (ours > 0).sum() > 2 * len(centers)  # the diffusion spread: not trivial
        np.testing.assert_array_equal(ours, sweep.numpy())


@pytest.mark.parametrize("mode", FLOW_TARGET_MODES)
def test_masks_to_flows_cpu_kernel_equals_torch_path_bit_for_bit(mode, monkeypatch):
    """The whole target (diffusion and gradient) through the CUDA code path, run on CPU."""
    scenes = diffusion_scenes()
    kernel = [masks_to_flows(masks, mode=mode) for masks in scenes]
    monkeypatch.setattr(ft, "_diffuse_cpu", lambda lab, centers, n_iter, dtype: (
        ft._diffuse_torch(torch.from_numpy(lab), torch.from_numpy(centers), n_iter, dtype)
        .numpy()
    ))
    moving = 0
    for masks, ours in zip(scenes, kernel, strict=True):
        sweep = masks_to_flows(masks, mode=mode)
        np.testing.assert_array_equal(ours, sweep)
        moving += (np.hypot(*sweep) > 0.99).sum() - 0.5 * (masks > 0).sum()
    assert moving > 0  # most cell pixels carry unit vectors: not trivial


def test_modes_differ_only_next_to_other_cells(rng):
    masks = voronoi_cells((40, 37), 12, rng, max_dist=9)
    isolated = masks_to_flows(masks, mode="isolated")
    upstream = masks_to_flows(masks, mode="upstream")
    padded = np.pad(masks, 1)
    others = [padded[2:, 1:-1], padded[:-2, 1:-1], padded[1:-1, 2:], padded[1:-1, :-2]]
    at_contact = (masks > 0) & np.any([(o != 0) & (o != masks) for o in others], axis=0)
    assert at_contact.sum() > 20
    np.testing.assert_array_equal(isolated[:, ~at_contact], upstream[:, ~at_contact])
    assert np.abs(isolated[:, at_contact] - upstream[:, at_contact]).max() > 0.5


def test_rejects_unknown_mode():
    masks = disk((9, 9), (4, 4), 3)
    for call in (
        lambda: masks_to_flows(masks, mode="gpu"),
        lambda: labels_to_flow_targets(masks, mode="Isolated"),
        lambda: FlowTargetCache(mode="leaky"),
        lambda: compute_flow_targets([masks], mode="none"),
    ):
        with pytest.raises(ValueError, match="isolated"):
            call()


def test_flows_same_on_two_threads(rng):
    masks = voronoi_cells((60, 70), 40, rng, max_dist=8)  # 40 cells: several work units
    one = masks_to_flows(masks)
    torch.set_num_threads(2)  # the conftest fixture restores one thread
    np.testing.assert_array_equal(masks_to_flows(masks), one)


def literal_geometry(masks: np.ndarray):
    """Per cell: numpy medians, first nearest pixel in raster order, bbox extents."""
    ids = [v for v in np.unique(masks) if v != 0]
    centers, n_iter = [], 0
    for value in ids:
        ys, xs = np.nonzero(masks == value)  # raster order
        dist = (ys - np.median(ys)) ** 2 + (xs - np.median(xs)) ** 2
        first = int(np.argmin(dist))  # argmin returns the first minimum
        centers.append((ys[first], xs[first]))
        n_iter = max(n_iter, 2 * (np.ptp(ys) + 1 + np.ptp(xs) + 1 + 2))
    return np.array(ids), np.array(centers, np.int64).reshape(-1, 2), n_iter


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.uint64, np.bool_])
def test_cell_geometry_matches_literal_computation(dtype, rng):
    if dtype == np.bool_:
        masks = disk((20, 23), (9, 10), 7) > 0
        masks[9, 10:13] = False  # notch at the median point
    else:
        masks = voronoi_cells((30, 33), 9, rng, max_dist=7).astype(dtype)
        masks[masks == 4] = 0  # a missing id
        masks[2:4, 2:5] = 200 if dtype == np.uint8 else 2**40 if dtype == np.uint64 else 9000
    ids, centers, n_iter = ft.cell_geometry(masks)
    want_ids, want_centers, want_n_iter = literal_geometry(masks)
    np.testing.assert_array_equal(ids, want_ids)
    assert ids.dtype == masks.dtype
    np.testing.assert_array_equal(centers, want_centers)
    assert n_iter == want_n_iter


# --- analytic properties ------------------------------------------------------------------


def test_disk_flows_point_to_centre_with_unit_norm():
    center, radius = (14, 17), 10
    masks = disk((29, 35), center, radius)
    flows = masks_to_flows(masks)
    ys, xs = np.nonzero(masks)
    off_centre = (ys != center[0]) | (xs != center[1])
    ys, xs = ys[off_centre], xs[off_centre]
    to_centre = np.stack([center[0] - ys, center[1] - xs])
    dots = (flows[:, ys, xs] * to_centre).sum(0)
    assert np.mean(dots > 0) > 0.95
    np.testing.assert_allclose(np.hypot(flows[0, ys, xs], flows[1, ys, xs]), 1.0, atol=1e-5)
    assert not flows[:, masks == 0].any()


# --- targets and renumbering ----------------------------------------------------------------


def test_renumber_by_first_appearance():
    labels = np.zeros((4, 5), np.uint16)
    labels[0, 3] = 7  # first in raster order
    labels[1, 0:2] = 3
    labels[2, 4] = 1000
    labels[3, 0] = 7
    out = renumber(labels, order="first")
    expected = np.zeros((4, 5), np.int64)
    expected[0, 3] = expected[3, 0] = 1
    expected[1, 0:2] = 2
    expected[2, 4] = 3
    np.testing.assert_array_equal(out, expected)
    assert np.issubdtype(out.dtype, np.integer) and out.dtype.itemsize >= 4
    assert labels[2, 4] == 1000  # input untouched


def test_labels_to_flow_targets_planes():
    labels = np.zeros((12, 13), np.uint16)
    labels[1:6, 1:7] = 1000
    labels[6:11, 2:9] = 7
    labels[2:5, 8:12] = 3
    target = labels_to_flow_targets(labels)
    assert target.shape == (4, 12, 13) and target.dtype == np.float32
    np.testing.assert_array_equal(target[0], renumber(labels, order="first"))
    assert set(np.unique(target[0])) == {0, 1, 2, 3}
    np.testing.assert_array_equal(target[1], (labels > 0).astype(np.float32))
    np.testing.assert_array_equal(target[2:], masks_to_flows(labels))


def test_many_ids_are_not_truncated():
    labels = np.arange(1, 301, dtype=np.int32).reshape(15, 20)  # 300 one-pixel cells
    target = labels_to_flow_targets(labels)
    assert target[0].max() == 300
    np.testing.assert_array_equal(target[0], labels)


# --- devices ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("mode", FLOW_TARGET_MODES)
def test_cuda_matches_cpu(rng, mode):
    masks = voronoi_cells((64, 80), 12, rng, max_dist=14)
    cpu = masks_to_flows(masks, device="cpu", mode=mode)
    gpu = masks_to_flows(masks, device=torch.device("cuda"), mode=mode)
    differ = np.abs(gpu - cpu).max(0) > 1e-6
    # Only pixels with an (ill-defined) near-zero raw gradient may differ: at most one
    # per cell, and even there both results are unit vectors or zero.
    assert differ.sum() <= len(np.unique(masks)) - 1
    for flows in (cpu, gpu):
        norms = np.hypot(flows[0, differ], flows[1, differ])
        assert np.all((norms < 1e-6) | (np.abs(norms - 1) < 1e-6))
