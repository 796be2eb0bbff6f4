"""Tests for GeneSegNet.model.tiling: tile placement, taper, blending, streaming accumulator."""

from __future__ import annotations

import math

import numpy as np
import pytest

from GeneSegNet.model.tiling import (
    TiledAccumulator,
    blend_tiles,
    make_tiles,
    taper_mask,
    tile_starts,
)


def test_tile_starts_spec_example():
    # spec §7.1: a padded 288 px axis gives starts 0 and 64 (2 tiles of 224)
    np.testing.assert_array_equal(tile_starts(288), [0, 64])


@pytest.mark.parametrize("length", [1, 50, 223, 224])
def test_tile_starts_single_tile_when_short(length):
    np.testing.assert_array_equal(tile_starts(length), [0])


@pytest.mark.parametrize("length", [225, 400, 513, 1000, 2048])
def test_tile_starts_count_and_cover(length):
    starts = tile_starts(length)
    assert len(starts) == math.ceil(1.2 * length / 224)
    assert starts[0] == 0 and starts[-1] == length - 224
    assert np.all(np.diff(starts) > 0)
    assert np.all(np.diff(starts) < 224)  # consecutive tiles overlap, so no gaps
    # evenly spaced float starts, truncated to int
    exact = np.arange(len(starts)) * (length - 224) / (len(starts) - 1)
    assert np.all((starts <= exact + 1e-9) & (starts > exact - 1))


def test_tile_starts_other_tile_and_overlap():
    # overlap 0.25 -> ceil(1.5 * 300 / 100) = 5 tiles of 100 over 300 px
    np.testing.assert_array_equal(tile_starts(300, tile=100, overlap=0.25), [0, 50, 100, 150, 200])


def test_taper_mask_profile():
    mask = taper_mask()
    assert mask.shape == (224, 224) and mask.dtype == np.float32
    np.testing.assert_allclose(mask, mask.T)
    assert mask[111, 111] == pytest.approx(1.0, abs=1e-4)
    w_centre = 1.0 / (1.0 + math.exp((0.5 - 92.0) / 7.5))
    assert mask[111, 111] == pytest.approx(w_centre**2, rel=1e-6)
    assert mask[111, 112] == pytest.approx(mask[111, 111])  # symmetric about 111.5
    row = mask[111, :112]
    assert np.all(np.diff(row) >= 0)  # rises from the edge to the centre
    assert row[0] < 0.1
    # analytic value at distance d from the centre: 1 / (1 + exp((d - 92) / 7.5))
    d = abs(0 - 111.5)
    w0 = 1.0 / (1.0 + math.exp((d - 92.0) / 7.5))
    assert mask[0, 0] == pytest.approx(w0 * w0, rel=1e-5)
    assert mask[111, 0] == pytest.approx(w0 * (1.0 / (1.0 + math.exp((0.5 - 92) / 7.5))), rel=1e-5)


def test_taper_mask_rectangular():
    def profile(n):
        t = np.arange(n, dtype=np.float64)
        return 1.0 / (1.0 + np.exp((np.abs(t - (n - 1) / 2.0) - (n / 2.0 - 20.0)) / 7.5))

    mask = taper_mask((224, 100))
    assert mask.shape == (224, 100)
    np.testing.assert_allclose(mask, np.outer(profile(224), profile(100)), rtol=1e-6)
    np.testing.assert_allclose(taper_mask(224), np.outer(profile(224), profile(224)), rtol=1e-6)


def test_make_tiles_extracts_the_right_windows(rng):
    img = rng.random((2, 288, 300)).astype(np.float32)
    tiles, starts = make_tiles(img)
    rows, cols = tile_starts(288), tile_starts(300)
    assert tiles.shape == (len(rows) * len(cols), 2, 224, 224)
    assert starts == [(int(r), int(c)) for r in rows for c in cols]
    for tile, (r, c) in zip(tiles, starts, strict=True):
        np.testing.assert_array_equal(tile, img[:, r : r + 224, c : c + 224])


def test_make_tiles_small_image_is_one_tile(rng):
    img = rng.random((3, 100, 150)).astype(np.float32)
    tiles, starts = make_tiles(img)
    assert tiles.shape == (1, 3, 100, 150) and starts == [(0, 0)]
    np.testing.assert_array_equal(tiles[0], img)


@pytest.mark.parametrize("taper", [True, False])
@pytest.mark.parametrize("shape", [(288, 288), (500, 260), (120, 700)])
def test_blend_constant_field(taper, shape):
    img = np.full((1, *shape), 1.0, dtype=np.float32)
    tiles, starts = make_tiles(img)
    outputs = np.concatenate([tiles * 3.5, tiles * -2.0], axis=1)  # K = 2
    out = blend_tiles(outputs, starts, shape, taper=taper)
    assert out.shape == (2, *shape) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], 3.5, rtol=1e-5)
    np.testing.assert_allclose(out[1], -2.0, rtol=1e-5)


def test_blend_reproduces_a_smooth_ramp():
    shape = (500, 460)
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    field = np.stack([0.01 * yy - 0.02 * xx, np.sin(yy / 50.0) * np.cos(xx / 70.0)])
    tiles, starts = make_tiles(field)
    out = blend_tiles(tiles, starts, shape)
    np.testing.assert_allclose(out, field, atol=1e-5)


def test_blend_weights_favour_tile_centres():
    # two overlapping tiles disagree; in the overlap the taper weights the nearer centre more
    shape = (224, 288)
    starts = [(0, 0), (0, 64)]
    outputs = np.stack([np.zeros((1, 224, 224)), np.ones((1, 224, 224))]).astype(np.float32)
    out = blend_tiles(outputs, starts, shape)[0]
    np.testing.assert_allclose(out[:, :64], 0.0, atol=1e-7)
    np.testing.assert_allclose(out[:, 224:], 1.0, atol=1e-7)
    # analytic value in the overlap: w2 / (w1 + w2) with the 1-D taper profile
    t = np.arange(224, dtype=np.float64)
    w = 1.0 / (1.0 + np.exp((np.abs(t - 111.5) - 92.0) / 7.5))
    cols = np.arange(64, 224)
    expected = w[cols - 64] / (w[cols] + w[cols - 64])
    np.testing.assert_allclose(out[100, 64:224], expected, atol=1e-5)
    assert np.all(np.diff(out[100, 64:224]) >= -1e-7)
    plain = blend_tiles(outputs, starts, shape, taper=False)[0]
    np.testing.assert_allclose(plain[:, 64:224], 0.5)


def test_tiled_accumulator_round_trip(rng):
    shape = (130, 170)
    truth = rng.random((3, *shape)).astype(np.float32)
    acc = TiledAccumulator(3, shape)
    for row in range(-20, shape[0], 40):  # windows overhang every border
        for col in range(-30, shape[1], 50):
            r0, c0 = max(row, 0), max(col, 0)
            win = np.zeros((3, 64, 64), dtype=np.float32)
            h = min(row + 64, shape[0]) - r0
            w = min(col + 64, shape[1]) - c0
            win[:, r0 - row : r0 - row + h, c0 - col : c0 - col + w] = truth[
                :, r0 : r0 + h, c0 : c0 + w
            ]
            acc.add(win, row, col, rng.random((64, 64)).astype(np.float32) + 0.1)
    np.testing.assert_allclose(acc.result(), truth, rtol=1e-5)


def test_tiled_accumulator_weighted_average_and_uncovered_zero():
    acc = TiledAccumulator(1, (4, 6))
    acc.add(np.full((1, 2, 3), 2.0), 0, 0, np.full((2, 3), 1.0))
    acc.add(np.full((1, 2, 3), 5.0), 0, 0, np.full((2, 3), 2.0))
    acc.add(np.full((1, 2, 2), 7.0), 2, 4)  # default weight 1
    acc.add(np.full((1, 2, 2), 9.0), 10, 10)  # entirely outside: ignored
    out = acc.result()
    np.testing.assert_allclose(out[0, :2, :3], (2.0 * 1 + 5.0 * 2) / 3)
    np.testing.assert_allclose(out[0, 2:, 4:], 7.0)
    assert out[0, 2:, :4].sum() == 0 and out[0, :2, 3:].sum() == 0


def test_tiled_accumulator_float16_and_errors():
    acc = TiledAccumulator(2, (8, 8), dtype=np.float16)
    assert acc.sum.dtype == np.float16 and acc.weight.dtype == np.float16
    acc.add(np.full((2, 8, 8), 0.25, dtype=np.float32), 0, 0, np.full((8, 8), 0.5))
    np.testing.assert_allclose(acc.result(), 0.25, rtol=1e-3)
    assert acc.result().dtype == np.float32
    with pytest.raises(ValueError):
        acc.add(np.zeros((3, 8, 8)), 0, 0)
    with pytest.raises(ValueError):
        acc.add(np.zeros((2, 8, 8)), 0, 0, np.ones((4, 4)))
    with pytest.raises(ValueError):
        TiledAccumulator(1, (4, 4), dtype=np.float64)
