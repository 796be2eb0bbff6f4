"""The EDT heatmap equals the brute-force maximum of per-spot truncated Gaussians."""

from __future__ import annotations

import math

import numpy as np
import pytest

from GeneSegNet.data.heatmap import (
    TRUNCATE_EXPONENT,
    cutoff_radius,
    heatmap_to_uint8,
    render_heatmap,
)
from GeneSegNet.io.spots import spot_pixels
from GeneSegNet.mapping import lookup_cell_ids


def brute_force(rows, cols, shape, sigma=7.0, truncate=TRUNCATE_EXPONENT):
    """Upstream's recipe, literally: one full map per spot, then the maximum."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    stack = [np.zeros(shape)]
    for r, c in zip(rows, cols, strict=True):
        e = ((xx - c) ** 2 + (yy - r) ** 2) / (2.0 * sigma * sigma)
        stack.append(np.where(e > truncate, 0.0, np.exp(-e)))
    return np.max(np.stack(stack), axis=0)


@pytest.mark.parametrize("seed", range(12))
def test_matches_brute_force_on_random_spot_sets(seed):
    rng = np.random.default_rng(seed)
    height, width = (int(v) for v in rng.integers(5, 80, size=2))
    n = int(rng.integers(0, 60))
    rows = rng.integers(-35, height + 35, size=n)
    cols = rng.integers(-35, width + 35, size=n)
    if n > 3:  # duplicates
        rows[:3], cols[:3] = rows[3], cols[3]
    sigma = float(rng.choice([1.5, 3.0, 7.0, 9.0]))
    ours = render_heatmap(rows, cols, (height, width), sigma=sigma)
    assert ours.shape == (height, width) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, brute_force(rows, cols, (height, width), sigma), atol=1e-6)


def test_spots_on_every_border_and_corner_non_square():
    shape = (37, 91)
    rows = np.array([0, 0, 36, 36, 0, 18, 36])
    cols = np.array([0, 90, 0, 90, 45, 0, 45])
    np.testing.assert_allclose(render_heatmap(rows, cols, shape),
                               brute_force(rows, cols, shape), atol=1e-6)


def test_no_spots_gives_zeros():
    out = render_heatmap(np.array([], int), np.array([], int), (20, 30))
    assert out.shape == (20, 30) and not out.any()


def test_far_away_spots_contribute_nothing():
    far = math.ceil(cutoff_radius()) + 1
    out = render_heatmap(np.array([-far, 10]), np.array([5, 40 + far]), (20, 40))
    assert not out.any()


def test_peak_and_truncation_radius():
    out = render_heatmap(np.array([50]), np.array([50]), (101, 101), sigma=7.0)
    assert out[50, 50] == pytest.approx(1.0)
    # Squared distance 451 -> exponent 4.602 <= 4.6052 (kept); 452 -> 4.612 (cut).
    # (21, 10): 441 + 100 = 541 is cut; (21, 0): 441 kept; (15, 15): 450 kept.
    assert out[50 + 21, 50] == pytest.approx(math.exp(-441 / 98), rel=1e-6)
    assert out[50 + 15, 50 + 15] == pytest.approx(math.exp(-450 / 98), rel=1e-6)
    assert out[50 + 21, 50 + 10] == 0.0
    assert out[50 + 22, 50] == 0.0  # 484 / 98 = 4.94 > 4.6052


def test_duplicates_change_nothing():
    rows, cols = np.array([10, 20]), np.array([12, 30])
    once = render_heatmap(rows, cols, (40, 50))
    twice = render_heatmap(np.repeat(rows, 5), np.repeat(cols, 5), (40, 50))
    np.testing.assert_array_equal(once, twice)


def test_window_with_origin_equals_crop_of_whole_image():
    rng = np.random.default_rng(3)
    rows, cols = rng.integers(0, 120, 80), rng.integers(0, 150, 80)
    whole = render_heatmap(rows, cols, (120, 150))
    window = render_heatmap(rows, cols, (50, 60), origin=(40, 70))
    np.testing.assert_array_equal(window, whole[40:90, 70:130])


def test_float_spots_use_the_mapping_pixel_rule():
    """Heatmap and mapping share spot_pixels: (floor(y), floor(x)), outside dropped."""
    x = np.array([10.9, -0.5, np.nan, 0.0])
    y = np.array([5.99, 3.2, 1.0, 29.999])
    rows, cols, inside = spot_pixels(x, y, (30, 30))
    np.testing.assert_array_equal(inside, [True, False, False, True])
    out = render_heatmap(rows, cols, (30, 30))
    # x = -0.5 is outside the image (not column 0 as int(float()) would give)
    np.testing.assert_allclose(out, brute_force([5, 29], [10, 0], (30, 30)), atol=1e-6)
    labels = np.zeros((30, 30), np.int64)
    labels[:, 0] = 7
    ids, _, mapped_inside = lookup_cell_ids(labels, x, y)
    np.testing.assert_array_equal(mapped_inside, inside)
    np.testing.assert_array_equal(ids, [0, 0, 0, 7])


def test_uint8_quantisation_rounds_to_nearest():
    values = np.array([0.0, 0.5 / 255, 0.49 / 255, 1.0, 0.2])
    np.testing.assert_array_equal(heatmap_to_uint8(values), [0, 0, 0, 255, 51])
    assert heatmap_to_uint8(values).dtype == np.uint8
