"""Tests for GeneSegNet.figures: outline and spot colours at known pixels, overlays, flows."""

from __future__ import annotations

import numpy as np
import pytest

from GeneSegNet.figures import (
    CYAN,
    GAP,
    GREEN,
    HEADER,
    RED,
    YELLOW,
    comparison_figure,
    flow_rgb,
    mask_overlay,
)

H, W = 40, 50


def square_masks() -> np.ndarray:
    """Cell 1 = rows 10..19 x cols 10..19; cell 2 = rows 25..34 x cols 30..44."""
    masks = np.zeros((H, W), np.int32)
    masks[10:20, 10:20] = 1
    masks[25:35, 30:45] = 2
    return masks


def square_perimeter() -> set[tuple[int, int]]:
    """Boundary pixels of the two squares of ``square_masks``, written out plainly."""
    pixels = set()
    for r0, r1, c0, c1 in ((10, 19, 10, 19), (25, 34, 30, 44)):
        for r in range(r0, r1 + 1):
            for c in range(c0, c1 + 1):
                if r in (r0, r1) or c in (c0, c1):
                    pixels.add((r, c))
    return pixels


def pixel(fig: np.ndarray, panel: int, row: int, col: int, scale: int) -> tuple[int, ...]:
    """Colour of crop pixel (row, col) in a panel (top-left of its scale x scale block)."""
    r = HEADER + row * scale
    c = panel * (W * scale + GAP) + col * scale
    return tuple(int(v) for v in fig[r, c])


def grey_image(rng) -> np.ndarray:
    return (rng.random((H, W)) * 100 + 50).astype(np.uint16)


@pytest.mark.parametrize("scale", [1, 2])
def test_prediction_outline_is_red_exactly_on_the_mask_boundary(rng, scale):
    masks = square_masks()
    fig = comparison_figure(grey_image(rng), masks, None, None, scale=scale)
    assert fig.dtype == np.uint8 and fig.ndim == 3
    assert fig.shape == (HEADER + H * scale, 3 * W * scale + 2 * GAP, 3)
    perimeter = square_perimeter()
    for r in range(H):
        for c in range(W):
            is_red = pixel(fig, 1, r, c, scale) == RED
            assert is_red == ((r, c) in perimeter), (r, c)
    # the block of an outline pixel is red throughout at scale 2
    r0, c0 = HEADER + 10 * scale, 1 * (W * scale + GAP) + 10 * scale
    block = fig[r0 : r0 + scale, c0 : c0 + scale].reshape(-1, 3)
    assert all(tuple(v) == RED for v in block)


def test_spots_are_cyan_inside_predicted_cells_and_yellow_outside(rng):
    masks = square_masks()
    spots = np.array([[14, 13], [3, 30], [40, 28], [49, 0]])  # (x, y)
    fig = comparison_figure(grey_image(rng), masks, None, spots, scale=1)
    assert pixel(fig, 1, 13, 14, 1) == CYAN  # inside cell 1
    assert pixel(fig, 1, 28, 40, 1) == CYAN  # inside cell 2
    assert pixel(fig, 1, 30, 3, 1) == YELLOW  # background
    assert pixel(fig, 1, 0, 49, 1) == YELLOW  # background, image corner
    # the image panel carries no spots or outlines: it is grey
    b, g, r = pixel(fig, 0, 13, 14, 1)
    assert b == g == r


def test_label_panel_outlines_green_and_splits_spots_by_the_labels(rng):
    pred = square_masks()
    labels = np.zeros((H, W), np.int32)
    labels[2:8, 30:38] = 5  # a label cell where nothing was predicted
    spots = np.array([[33, 4], [14, 13]])  # in the label cell / in predicted cell 1
    fig = comparison_figure(grey_image(rng), pred, labels, spots, scale=2)
    assert fig.shape[1] == 5 * W * 2 + 4 * GAP
    assert pixel(fig, 3, 2, 30, 2) == GREEN  # label corner
    assert pixel(fig, 3, 10, 10, 2) != GREEN  # predicted cell's corner: no label outline

    # spot centres sit at the middle of the pixel's block: (2y + 1, 2x + 1)
    def centre(panel, x, y):
        return tuple(int(v) for v in fig[HEADER + 2 * y + 1, panel * (2 * W + GAP) + 2 * x + 1])

    assert centre(3, 33, 4) == CYAN and centre(1, 33, 4) == YELLOW
    assert centre(3, 14, 13) == YELLOW and centre(1, 14, 13) == CYAN


def test_figure_is_deterministic_and_accepts_colour_and_float_images(rng):
    masks = square_masks()
    bgr = (rng.random((H, W, 3)) * 255).astype(np.uint8)
    flows = rng.standard_normal((2, H, W)).astype(np.float32)
    first = comparison_figure(bgr, masks, masks, np.array([[1, 1]]), flows=flows)
    second = comparison_figure(bgr, masks, masks, np.array([[1, 1]]), flows=flows)
    np.testing.assert_array_equal(first, second)
    assert first.shape == (HEADER + 2 * H, 6 * 2 * W + 5 * GAP, 3)
    floats = comparison_figure(rng.random((H, W)).astype(np.float64) * 1e-3, masks)
    assert floats.dtype == np.uint8


def test_mask_overlay_colours_cells_and_keeps_background_grey(rng):
    masks = square_masks()
    out = mask_overlay(grey_image(rng), masks)
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    bg = out[masks == 0].astype(int)
    assert np.all(bg[:, 0] == bg[:, 1]) and np.all(bg[:, 1] == bg[:, 2])
    for k in (1, 2):
        cell = out[masks == k].astype(int)
        assert np.all(cell.max(axis=1) - cell.min(axis=1) > 20)  # saturated colour
        hue = np.argmax(cell, axis=1)
        assert len(np.unique(hue)) == 1  # one hue per cell
    a, b = out[15, 15].astype(float), out[30, 40].astype(float)
    assert not np.allclose(a / a.max(), b / b.max(), atol=0.05)  # the cells differ


def test_flow_rgb_follows_the_angle_formula():
    # a unit flow pointing down (+y): angle = atan2(0, 1) + pi = pi
    dP = np.zeros((2, 4, 4), np.float32)
    dP[0, 1:3, 1:3] = 1.0
    rgb = flow_rgb(dP)
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 4, 3)
    c = [(np.cos(np.pi + k * 2 * np.pi / 3) + 1) / 2 for k in range(3)]
    expect = np.round(np.array([c[0], c[2], c[1]]) * 255).astype(int)
    np.testing.assert_array_equal(rgb[1, 1].astype(int), expect)
    np.testing.assert_array_equal(rgb[0, 0], [0, 0, 0])  # zero magnitude is black
