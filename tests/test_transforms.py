"""Tests for GeneSegNet.data.transforms: normalisation, resizing, padding."""

from __future__ import annotations

import numpy as np
import pytest

from GeneSegNet.data.transforms import (
    normalize99,
    normalize_channels,
    pad_to_multiple,
    resize_image,
)


def _sparse_heatmap(size: int = 256) -> np.ndarray:
    """uint8 heatmap with one small Gaussian spot (non-zero on well under 1 % of pixels)."""
    yy, xx = np.mgrid[:size, :size]
    spot = np.exp(-((yy - 100.0) ** 2 + (xx - 150.0) ** 2) / (2 * 2.0**2))
    spot[spot < 0.01] = 0.0
    heat = np.round(255 * spot).astype(np.uint8)
    assert 0 < np.count_nonzero(heat) < 0.01 * size * size
    return heat


def test_normalize99_linear_ramp():
    # 0..100: numpy's linear-interpolated 1st and 99th percentiles are exactly 1 and 99.
    x = np.arange(101, dtype=np.float64).reshape(1, 101)
    out = normalize99(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (x - 1.0) / 98.0, rtol=0, atol=1e-6)
    assert out[0, 1] == pytest.approx(0.0, abs=1e-7)
    assert out[0, 99] == pytest.approx(1.0, abs=1e-6)
    # no clipping: the extremes fall outside [0, 1]
    assert out.min() < 0 and out.max() > 1


def test_normalize99_matches_plain_formula_on_random_image(rng):
    x = rng.gamma(2.0, 10.0, size=(40, 30))
    values = np.sort(x.ravel())
    n = values.size

    def pct(q):  # numpy "linear" definition written out
        pos = q / 100.0 * (n - 1)
        lo = int(np.floor(pos))
        return values[lo] + (pos - lo) * (values[min(lo + 1, n - 1)] - values[lo])

    expected = (x - pct(1.0)) / (pct(99.0) - pct(1.0))
    np.testing.assert_allclose(normalize99(x), expected, rtol=1e-5, atol=1e-5)


def test_normalize99_constant_and_tiny_range_give_zeros():
    assert not normalize99(np.full((8, 9), 7.0)).any()
    nearly = np.full((10, 10), 3.0)
    nearly[0, 0] = 3.0005  # range of the percentiles <= 1e-3
    out = normalize99(nearly)
    assert out.dtype == np.float32 and not out.any()


def test_percentile_mode_zeroes_sparse_heatmap_fixed_mode_keeps_it(rng):
    heat = _sparse_heatmap()
    gray = rng.integers(0, 4000, size=heat.shape).astype(np.uint16)
    image = np.stack([gray, heat.astype(np.uint16)])  # one dtype for the stack, like a read

    upstream = normalize_channels(image, heatmap_channel=1, heatmap_mode="percentile")
    assert not upstream[1].any()  # the upstream defect (spec §12 item 24)

    fixed = normalize_channels(image, heatmap_channel=1)  # default mode is "fixed"
    np.testing.assert_allclose(fixed[1], heat / 255.0, rtol=0, atol=1e-7)
    assert fixed[1].max() == pytest.approx(1.0)
    # the image channel is percentile-normalised in both modes
    np.testing.assert_allclose(fixed[0], normalize99(gray), atol=1e-6)
    np.testing.assert_allclose(upstream[0], fixed[0], atol=0)


def test_fixed_mode_float_heatmaps():
    heat01 = np.zeros((2, 20, 20), dtype=np.float32)
    heat01[0] = np.linspace(0, 100, 400).reshape(20, 20)
    heat01[1, 5, 5] = 0.4
    out = normalize_channels(heat01, heatmap_channel=-1)
    assert out[1, 5, 5] == pytest.approx(0.4) and np.count_nonzero(out[1]) == 1
    # a float copy of an 8-bit map is brought back to [0, 1]
    as255 = heat01.copy()
    as255[1, 5, 5] = 204.0
    assert normalize_channels(as255, heatmap_channel=1)[1, 5, 5] == pytest.approx(0.8)
    bad = heat01.copy()
    bad[1, 0, 0] = 1000.0
    with pytest.raises(ValueError, match="heatmap"):
        normalize_channels(bad, heatmap_channel=1)


def test_invert_applies_to_image_channels_only(rng):
    image = np.stack(
        [
            rng.random((16, 16)) * 50,
            rng.random((16, 16)) * 10,
            (rng.random((16, 16)) > 0.5) * 255.0,
        ]
    ).astype(np.uint8)
    plain = normalize_channels(image, heatmap_channel=2)
    inv = normalize_channels(image, heatmap_channel=2, invert=True)
    np.testing.assert_allclose(inv[:2], 1.0 - plain[:2], atol=1e-6)
    np.testing.assert_array_equal(inv[2], plain[2])
    no_heat = normalize_channels(image, heatmap_channel=None)
    np.testing.assert_allclose(no_heat[2], normalize99(image[2]), atol=1e-6)


def test_normalize_channels_rejects_bad_arguments():
    with pytest.raises(ValueError):
        normalize_channels(np.zeros((5, 5)), heatmap_channel=None)
    with pytest.raises(ValueError):
        normalize_channels(np.zeros((2, 5, 5)), heatmap_channel=2)
    with pytest.raises(ValueError):
        normalize_channels(np.zeros((2, 5, 5)), heatmap_channel=1, heatmap_mode="other")


@pytest.mark.parametrize("n_chan", [1, 2, 5, 7])
def test_resize_linear_keeps_a_linear_ramp(n_chan):
    # bilinear resampling (pixel-centre aligned) maps a linear ramp to a linear ramp
    h, w, out_h, out_w = 20, 30, 40, 45
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    img = np.stack([c * 10 + 2.0 * yy + 0.5 * xx for c in range(n_chan)])
    out = resize_image(img, (out_h, out_w))
    assert out.shape == (n_chan, out_h, out_w) and out.dtype == np.float32
    src_y = (np.arange(out_h) + 0.5) * h / out_h - 0.5
    src_x = (np.arange(out_w) + 0.5) * w / out_w - 0.5
    inner_y = (src_y >= 0) & (src_y <= h - 1)
    inner_x = (src_x >= 0) & (src_x <= w - 1)
    for c in range(n_chan):
        expected = c * 10 + 2.0 * src_y[:, None] + 0.5 * src_x[None, :]
        np.testing.assert_allclose(
            out[c][np.ix_(inner_y, inner_x)], expected[np.ix_(inner_y, inner_x)], atol=0.05
        )
    # 2-D input keeps its layout
    np.testing.assert_array_equal(resize_image(img[0], (out_h, out_w)), out[0])


def test_resize_nearest_integer_upsampling_and_label_dtype():
    labels = np.array([[1, 2], [3, 70000]], dtype=np.int32)
    out = resize_image(labels, (4, 6), interpolation="nearest")
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, np.repeat(np.repeat(labels, 2, axis=0), 3, axis=1))
    stack = np.stack([labels, labels * 2]).astype(np.float64)
    out3 = resize_image(stack, (4, 6), interpolation="nearest")
    assert out3.dtype == np.float32 and out3.shape == (2, 4, 6)
    np.testing.assert_array_equal(out3[1], 2 * out)
    with pytest.raises(ValueError):
        resize_image(labels, (4, 6), interpolation="cubic")


@pytest.mark.parametrize(
    ("height", "width", "exp_h", "exp_w"),
    [
        (272, 272, 288, 288),  # spec §7.1: a 256 crop resized to 272, padded to 288
        (256, 256, 272, 272),
        (250, 17, 272, 48),
        (1, 16, 32, 32),
    ],
)
def test_pad_to_multiple_shapes_and_round_trip(rng, height, width, exp_h, exp_w):
    img = rng.random((2, height, width)).astype(np.float32) + 1.0
    padded, (rows, cols) = pad_to_multiple(img)
    assert padded.shape == (2, exp_h, exp_w) and padded.dtype == img.dtype
    # before padding: 8 extra + half the missing pixels (rounded down)
    assert rows.start == 8 + ((exp_h - 16 - height) // 2)
    assert cols.start == 8 + ((exp_w - 16 - width) // 2)
    np.testing.assert_array_equal(padded[:, rows, cols], img)
    assert padded.sum() == pytest.approx(img.sum(), rel=1e-6)  # the border is zeros
    assert (exp_h - 16) % 16 == 0 and (exp_w - 16) % 16 == 0


def test_pad_to_multiple_2d_and_other_settings():
    img = np.ones((10, 33))
    padded, (rows, cols) = pad_to_multiple(img, multiple=8, extra=0)
    assert padded.shape == (16, 40)
    assert (rows.start, cols.start) == (3, 3)
    np.testing.assert_array_equal(padded[rows, cols], img)
