"""Tests for GeneSegNet.training.augment: geometry of the warp, flow rotation, random draws."""

from __future__ import annotations

import numpy as np
import pytest

from GeneSegNet.training.augment import _warp_one, random_rotate_and_resize

OUT = 224


def _forward(q_xy, src_hw, theta, scale, dxy):
    """Spec §5 map, written out: source (x, y) -> output (x, y)."""
    h, w = src_hw
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    centre_out = np.array([OUT / 2 + dxy[0], OUT / 2 + dxy[1]])
    return centre_out + scale * rot @ (np.asarray(q_xy, dtype=float) - [w / 2, h / 2])


def _inverse(p_xy, src_hw, theta, scale, dxy):
    """Output (x, y) points [2, N] -> source (x, y) points [2, N]."""
    h, w = src_hw
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    centre_out = np.array([[OUT / 2 + dxy[0]], [OUT / 2 + dxy[1]]])
    return rot.T @ (p_xy - centre_out) / scale + np.array([[w / 2], [h / 2]])


def _scene(src_hw, centre_xy, axes=(30.0, 18.0)):
    """Ellipse label with a flow field pointing at ``centre_xy`` everywhere, plus an image
    whose channels are linear in x and y."""
    h, w = src_hw
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    cx, cy = centre_xy
    inside = ((xx - cx) / axes[0]) ** 2 + ((yy - cy) / axes[1]) ** 2 <= 1.0
    labels = np.stack([inside, cy - yy, cx - xx]).astype(np.float32)  # (binary, dY, dX)
    image = np.stack([0.5 * xx + 0.25 * yy, yy - 0.1 * xx]).astype(np.float32)
    return image, labels


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize(("theta", "scale"), [(0.3, 1.0), (2.0, 0.8), (4.5, 1.3)])
def test_warped_flows_point_to_the_warped_centre(flip, theta, scale):
    src_hw = (250, 270)
    centre = (120.3, 140.7)  # (x, y), off the image centre so that a wrong flip shows
    image, labels = _scene(src_hw, centre)
    dxy = (7.0, -5.0)
    img_out, lbl_out = _warp_one(image, labels, theta, scale, flip, dxy)
    assert img_out.shape == (2, OUT, OUT) and lbl_out.shape == (3, OUT, OUT)

    # where the (possibly mirrored) centre lands in the output
    h, w = src_hw
    centre_src = (w - 1 - centre[0], centre[1]) if flip else centre
    cdst = _forward(centre_src, src_hw, theta, scale, dxy)

    py, px = np.mgrid[:OUT, :OUT].astype(np.float64)
    pts = np.stack([px.ravel(), py.ravel()])
    qx, qy = _inverse(pts, src_hw, theta, scale, dxy)
    valid = ((qx > 1) & (qx < w - 2) & (qy > 1) & (qy < h - 2)).reshape(OUT, OUT)
    assert valid.mean() > 0.3

    # flows are rotated but not rescaled: at output p they equal (c_dst - p) / scale
    exp_dy = (cdst[1] - py) / scale
    exp_dx = (cdst[0] - px) / scale
    np.testing.assert_allclose(lbl_out[1][valid], exp_dy[valid], atol=0.1)
    np.testing.assert_allclose(lbl_out[2][valid], exp_dx[valid], atol=0.1)

    # image channels are sampled bilinearly at the mirrored source point
    qx_src = (w - 1 - qx if flip else qx).reshape(OUT, OUT)
    qy_src = qy.reshape(OUT, OUT)
    np.testing.assert_allclose(img_out[0][valid], (0.5 * qx_src + 0.25 * qy_src)[valid], atol=0.05)
    np.testing.assert_allclose(img_out[1][valid], (qy_src - 0.1 * qx_src)[valid], atol=0.05)

    # the binary channel is the warped ellipse (apart from a one-pixel band at its edge)
    rho = ((qx_src - centre[0]) / 30.0) ** 2 + ((qy_src - centre[1]) / 18.0) ** 2
    clear_in = valid & (rho < 0.85)
    clear_out = valid & (rho > 1.15)
    assert clear_in.sum() > 500
    assert np.all(lbl_out[0][clear_in] == 1) and np.all(lbl_out[0][clear_out] == 0)
    assert set(np.unique(lbl_out[0])) <= {0.0, 1.0}


def test_identity_warp_and_flip_negates_dx(rng):
    image = rng.random((2, OUT, OUT)).astype(np.float32)
    labels = np.stack(
        [rng.random((OUT, OUT)) > 0.5, rng.normal(size=(OUT, OUT)), rng.normal(size=(OUT, OUT))]
    ).astype(np.float32)
    img0, lbl0 = _warp_one(image, labels, 0.0, 1.0, False, (0.0, 0.0))
    np.testing.assert_allclose(img0, image, atol=1e-6)
    np.testing.assert_allclose(lbl0, labels, atol=1e-6)
    img1, lbl1 = _warp_one(image, labels, 0.0, 1.0, True, (0.0, 0.0))
    # W = 224 and θ = 0, scale 1, no shift: the map is the identity, so the output is the
    # mirrored input with dX negated
    np.testing.assert_allclose(img1, image[:, :, ::-1], atol=1e-6)
    np.testing.assert_allclose(lbl1[:2], labels[:2, :, ::-1], atol=1e-6)
    np.testing.assert_allclose(lbl1[2], -labels[2, :, ::-1], atol=1e-6)
    assert labels[2].std() > 0.5  # the inputs were not modified in place by the flip
    np.testing.assert_array_equal(lbl0[2], labels[2])


def test_quarter_turn_rotates_vectors():
    # θ = π/2 sends e_x to e_y: a uniform flow (dY, dX) = (0, 1) becomes (1, 0)
    labels = np.zeros((3, OUT, OUT), dtype=np.float32)
    labels[2] = 1.0
    _, lbl = _warp_one(np.zeros((1, OUT, OUT)), labels, np.pi / 2, 1.0, False, (0, 0))
    inner = (slice(5, -5), slice(5, -5))
    np.testing.assert_allclose(lbl[1][inner], 1.0, atol=1e-6)
    np.testing.assert_allclose(lbl[2][inner], 0.0, atol=1e-6)


def _disk_sample(size=256, radius=15.0):
    yy, xx = np.mgrid[:size, :size]
    disk = ((xx - size / 2) ** 2 + (yy - size / 2) ** 2 <= radius**2).astype(np.float32)
    labels = np.stack([disk, np.zeros_like(disk), np.zeros_like(disk)])
    return disk[None], labels


@pytest.mark.parametrize(("rescale", "expected_scale"), [(None, 1.0), ([2.0], 0.5)])
def test_scale_range_zero_keeps_cell_size(rescale, expected_scale):
    image, labels = _disk_sample()
    area = np.pi * 15.0**2 * expected_scale**2
    for seed in range(5):
        imgs, lbls, scales = random_rotate_and_resize(
            [image], [labels], rescale=rescale, scale_range=0.0, rng=seed
        )
        assert scales[0] == pytest.approx(expected_scale)
        assert lbls[0, 0].sum() == pytest.approx(area, rel=0.06)
        assert imgs[0, 0].sum() == pytest.approx(area, rel=0.06)
        assert set(np.unique(lbls[0, 0])) <= {0.0, 1.0}


def test_scales_follow_the_range(rng):
    image, labels = _disk_sample(64)
    images = [image] * 200
    _, _, scales = random_rotate_and_resize(images, None, rng=rng)
    assert scales.min() >= 0.75 and scales.max() <= 1.25
    assert scales.min() < 0.8 and scales.max() > 1.2
    _, _, halved = random_rotate_and_resize(images, None, rescale=np.full(200, 2.0), rng=rng)
    assert halved.min() >= 0.375 and halved.max() <= 0.625


def test_draw_order_matches_spec(rng):
    # spec §5: per image flip, θ, scale, then the two offsets, in that order
    images = [rng.random((2, 300, 260)).astype(np.float32), rng.random((2, 180, 400))]
    labels = [
        np.stack(
            [
                rng.random(im.shape[1:]) > 0.5,
                rng.normal(size=im.shape[1:]),
                rng.normal(size=im.shape[1:]),
            ]
        ).astype(np.float32)
        for im in images
    ]
    rescale = np.array([0.9, 1.4])
    imgs, lbls, scales = random_rotate_and_resize(
        images, labels, rescale=rescale, rng=np.random.default_rng(99)
    )
    draws = np.random.default_rng(99)
    for i, (im, lb) in enumerate(zip(images, labels, strict=True)):
        flip = draws.random() > 0.5
        theta = draws.random() * 2 * np.pi
        scale = (0.75 + 0.5 * draws.random()) / rescale[i]
        h, w = im.shape[1:]
        dxy = (draws.random(2) - 0.5) * np.maximum(0, [w * scale - OUT, h * scale - OUT])
        exp_img, exp_lbl = _warp_one(im, lb, theta, scale, flip, dxy)
        np.testing.assert_array_equal(imgs[i], exp_img)
        np.testing.assert_array_equal(lbls[i], exp_lbl)
        assert scales[i] == pytest.approx(scale)


def test_same_seed_same_batch_and_no_flip_option(rng):
    images = [rng.random((3, 240, 250)).astype(np.float32) for _ in range(3)]
    labels = [
        np.stack(
            [rng.random((240, 250)) > 0.5, rng.normal(size=(240, 250)), rng.normal(size=(240, 250))]
        ).astype(np.float32)
        for _ in range(3)
    ]
    a = random_rotate_and_resize(images, labels, rng=7)
    b = random_rotate_and_resize(images, labels, rng=np.random.default_rng(7))
    c = random_rotate_and_resize(images, labels, rng=8)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (3, 3, OUT, OUT) and a[0].dtype == np.float32
    assert a[1].shape == (3, 3, OUT, OUT) and a[1].dtype == np.float32

    # do_flip=False consumes the same draws and never mirrors
    draws = np.random.default_rng(7)
    imgs, _, _ = random_rotate_and_resize(images, None, do_flip=False, rng=7)
    for i, im in enumerate(images):
        draws.random()  # flip draw, ignored
        theta = draws.random() * 2 * np.pi
        scale = 0.75 + 0.5 * draws.random()
        dxy = (draws.random(2) - 0.5) * np.maximum(0, [250 * scale - OUT, 240 * scale - OUT])
        np.testing.assert_array_equal(imgs[i], _warp_one(im, None, theta, scale, False, dxy)[0])


def test_output_size_and_errors(rng):
    image = rng.random((1, 50, 60)).astype(np.float32)
    imgs, lbls, _ = random_rotate_and_resize([image], None, xy=(32, 48), rng=rng)
    assert imgs.shape == (1, 1, 32, 48) and lbls is None
    with pytest.raises(ValueError):
        random_rotate_and_resize([image], [np.zeros((3, 50, 60))] * 2, rng=rng)
    with pytest.raises(ValueError):
        _warp_one(image, np.zeros((2, 50, 60)), 0.0, 1.0, False, (0, 0))
