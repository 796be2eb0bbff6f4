"""Outline smoothing (GeneSegNet.dynamics.smoothing) against shapes whose smoothed
outline is known: straight borders stay, thin bulges and notches go, a disc keeps its
radius to within the curvature shift sigma² / (2 R), cells that tile a region leave no
gap, and no cell is lost or split."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from GeneSegNet.dynamics.smoothing import smooth_outlines


def _disc(shape: tuple[int, int], centre: tuple[float, float], radius: float) -> np.ndarray:
    rr, cc = np.indices(shape)
    return (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= radius ** 2


@pytest.mark.parametrize("sigma", [1.0, 2.5, 4.0])
def test_straight_borders_stay_where_they_are(sigma):
    labels = np.zeros((60, 80), np.int32)
    labels[:, 20:50] = 1  # a band: two straight borders with the background
    labels[:, 50:] = 2  # and one with another cell
    np.testing.assert_array_equal(smooth_outlines(labels, sigma), labels)


def test_a_thin_bulge_and_a_notch_are_removed():
    disc = _disc((101, 101), (50, 50), 30)
    labels = disc.astype(np.int32)
    labels[49:51, 80:92] = 1  # a 2-px wide spike out of the disc
    labels[20:45, 49:51] = 0  # a 2-px wide notch into it
    out = smooth_outlines(labels, 2.0)
    assert not out[49:51, 84:92].any()
    assert (out[24:45, 49:51] == 1).all()  # filled up to near its mouth at the edge
    iou = np.logical_and(out > 0, disc).sum() / np.logical_or(out > 0, disc).sum()
    assert iou > 0.98


@pytest.mark.parametrize("radius,sigma", [(30.0, 3.0), (20.0, 2.0), (40.0, 5.0)])
def test_a_disc_keeps_its_radius_up_to_the_curvature_shift(radius, sigma):
    """The 1/2 level of a Gaussian-smoothed disc lies about sigma² / (2 R) inside its edge:
    the equivalent radius after smoothing must lie between R - 2 × that shift - 0.5 px and R
    + 0.5 px (0.5 px: pixelation)."""
    labels = _disc((141, 141), (70, 70), radius).astype(np.int32)
    r_in = np.sqrt(labels.sum() / np.pi)
    out = smooth_outlines(labels, sigma)
    r_out = np.sqrt((out == 1).sum() / np.pi)
    shift = sigma ** 2 / (2 * radius)
    assert r_in - 2 * shift - 0.5 <= r_out <= r_in + 0.5


def test_cells_that_tile_a_region_leave_no_gap_and_keep_their_ids():
    rng = np.random.default_rng(0)
    seeds = rng.uniform(0, 120, size=(25, 2))
    rr, cc = np.indices((120, 120))
    nearest = np.argmin((rr[..., None] - seeds[:, 0]) ** 2 + (cc[..., None] - seeds[:, 1]) ** 2,
                        axis=-1)
    labels = (nearest + 1).astype(np.int32)  # a Voronoi tiling, no background
    out = smooth_outlines(labels, 3.0)
    assert (out > 0).all()
    assert set(np.unique(out)) == set(np.unique(labels))
    changed = (out != labels).mean()
    assert 0 < changed < 0.1  # junction corners are rounded, the rest stays


def test_no_cell_is_lost_or_left_in_pieces():
    labels = np.zeros((80, 80), np.int32)
    labels[10:12, 10:12] = 1  # far narrower than the smoothing: kept as it was
    labels[30:50, 20:32] = 2  # a dumbbell: two lobes joined by a 1-px neck
    labels[38:39, 32:44] = 2
    labels[34:46, 44:52] = 2
    out = smooth_outlines(labels, 3.0)
    np.testing.assert_array_equal(out[10:12, 10:12], 1)
    assert (out == 1).sum() == 4
    pieces, n = ndimage.label(out == 2)
    assert n == 1
    assert pieces[40, 26] == 1  # the larger lobe is the piece kept
    assert set(np.unique(out)) == {0, 1, 2}


def test_zero_width_and_bad_input():
    labels = np.zeros((10, 10), np.int32)
    labels[2:6, 2:6] = 3
    np.testing.assert_array_equal(smooth_outlines(labels, 0.0), labels)
    assert smooth_outlines(labels, 1.0).dtype == labels.dtype
    with pytest.raises(ValueError, match="2-D integer"):
        smooth_outlines(labels.astype(float), 1.0)
    with pytest.raises(ValueError, match="2-D integer"):
        smooth_outlines(labels[None], 1.0)


def test_nothing_is_assumed_beyond_the_image_edge():
    """Outside the image every indicator is 0: a 2-px strip of background between a cell
    and the edge is a dent like any other and goes to the cell; a cell that meets the edge
    keeps its pixels there."""
    labels = np.zeros((60, 60), np.int32)
    labels[:, 2:40] = 1
    out = smooth_outlines(labels, 3.0)
    assert (out[:, :40] == 1).all()
    assert (out[:, 40:] == 0).all()
    np.testing.assert_array_equal(smooth_outlines(np.ones((20, 20), np.int32), 3.0), 1)
