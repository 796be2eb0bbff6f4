"""Training augmentation: random flip, rotation, scaling and crop to a fixed size.

Semantics follow spec §5 (upstream ``random_rotate_and_resize``), with every draw taken
from an explicit ``numpy.random.Generator`` instead of numpy's global RNG.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import cv2
import numpy as np

logger = logging.getLogger(__name__)


def _affine_matrix(
    src_hw: tuple[int, int],
    out_hw: tuple[int, int],
    theta: float,
    scale: float,
    dxy: np.ndarray,
) -> np.ndarray:
    """2×3 OpenCV matrix mapping source (x, y) to output (x, y).

    The source centre ``(W/2, H/2)`` goes to ``(w_out/2, h_out/2) + dxy`` and the unit
    vectors e_x, e_y go to ``scale·(cos θ, sin θ)`` and ``scale·(−sin θ, cos θ)``.
    """
    cos, sin = np.cos(theta), np.sin(theta)
    linear = scale * np.array([[cos, -sin], [sin, cos]])
    src_centre = np.array([src_hw[1] / 2.0, src_hw[0] / 2.0])
    out_centre = np.array([out_hw[1] / 2.0, out_hw[0] / 2.0]) + np.asarray(dxy, dtype=float)
    shift = out_centre - linear @ src_centre
    return np.hstack([linear, shift[:, None]])


def _warp_channels(
    channels: np.ndarray, matrix: np.ndarray, out_hw: tuple[int, int], flag: int
) -> np.ndarray:
    """Warp each channel of ``[C, H, W]`` float32 into ``[C, h_out, w_out]`` (zero border)."""
    out = np.zeros((channels.shape[0], *out_hw), dtype=np.float32)
    dsize = (out_hw[1], out_hw[0])
    for c in range(channels.shape[0]):
        out[c] = cv2.warpAffine(
            channels[c], matrix, dsize, flags=flag, borderMode=cv2.BORDER_CONSTANT, borderValue=0
        )
    return out


def _warp_one(
    image: np.ndarray,
    labels: np.ndarray | None,
    theta: float,
    scale: float,
    flip: bool,
    dxy: Sequence[float] | np.ndarray,
    xy: tuple[int, int] = (224, 224),
) -> tuple[np.ndarray, np.ndarray | None]:
    """Apply one fixed flip / rotation / scale / shift to an image and its flow labels.

    Parameters
    ----------
    image : ndarray [C, H, W]
        Normalised image channels (warped bilinearly).
    labels : ndarray [L, H, W] or None
        ``L >= 3``: the last two channels are the flows (dY, dX), warped bilinearly and then
        rotated by θ; the channels before them (the binary cell probability) are warped
        with nearest neighbour.
    theta : float
        Rotation angle in radians (counter-clockwise in (x, y) with y pointing down, i.e.
        e_x goes to (cos θ, sin θ)).
    scale : float
        Zoom factor (output pixels per source pixel).
    flip : bool
        Mirror left-right before warping (dX is negated).
    dxy : (dx, dy)
        Shift of the output centre in pixels.
    xy : (h_out, w_out)
        Output size.

    Returns
    -------
    image : ndarray [C, h_out, w_out] float32
    labels : ndarray [L, h_out, w_out] float32 or None
    """
    image = np.asarray(image, dtype=np.float32)
    out_hw = (int(xy[0]), int(xy[1]))
    if labels is not None:
        labels = np.array(labels, dtype=np.float32)  # a copy: dX may be negated below
        if labels.ndim != 3 or labels.shape[0] < 3 or labels.shape[1:] != image.shape[1:]:
            raise ValueError(
                f"labels must be [L>=3, H, W] matching the image {image.shape[1:]}, "
                f"got {labels.shape}"
            )
    if flip:
        image = image[:, :, ::-1]
        if labels is not None:
            labels = labels[:, :, ::-1].copy()
            labels[-1] = -labels[-1]
    matrix = _affine_matrix(image.shape[1:], out_hw, theta, scale, np.asarray(dxy))
    img_out = _warp_channels(np.ascontiguousarray(image), matrix, out_hw, cv2.INTER_LINEAR)
    if labels is None:
        return img_out, None
    lbl_out = np.empty((labels.shape[0], *out_hw), dtype=np.float32)
    lbl_out[:-2] = _warp_channels(labels[:-2], matrix, out_hw, cv2.INTER_NEAREST)
    flows = _warp_channels(labels[-2:], matrix, out_hw, cv2.INTER_LINEAR)
    d_y, d_x = flows
    sin, cos = np.sin(theta), np.cos(theta)
    lbl_out[-2] = d_x * sin + d_y * cos
    lbl_out[-1] = d_x * cos - d_y * sin
    return img_out, lbl_out


def random_rotate_and_resize(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray] | None = None,
    *,
    rescale: np.ndarray | Sequence[float] | None = None,
    scale_range: float = 0.5,
    xy: tuple[int, int] = (224, 224),
    do_flip: bool = True,
    rng: np.random.Generator | int | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Randomly flip, rotate, scale and shift a batch into fixed-size training patches.

    Per image, in this order: ``flip = U() > 0.5`` (drawn even when ``do_flip`` is False),
    ``θ = 2π·U()``, ``scale = 1 − scale_range/2 + scale_range·U()`` divided by
    ``rescale[i]``, ``dxy = (U(2) − 0.5)·max(0, (W·scale − w_out, H·scale − h_out))``;
    then :func:`_warp_one`. Flow magnitudes are not rescaled.

    Parameters
    ----------
    images : list of ndarray [C, H, W] float32
        Normalised images (sizes may differ; C must agree).
    labels : list of ndarray [3, H, W] or None
        (binary cell probability, dY, dX) per image.
    rescale : ndarray [B] or None
        Per-image size factor (label diameter / diam_mean); scale is divided by it.
    scale_range : float
        Width of the uniform zoom range around 1.
    xy : (h_out, w_out)
        Output patch size.
    do_flip : bool
        Allow left-right mirroring.
    rng : numpy Generator, int seed or None
        Source of every random draw.

    Returns
    -------
    imgs : ndarray [B, C, h_out, w_out] float32
    lbls : ndarray [B, 3, h_out, w_out] float32, or None without labels
    scales : ndarray [B] float32
        The zoom factor applied to each image.
    """
    rng = np.random.default_rng(rng)
    n_img = len(images)
    if labels is not None and len(labels) != n_img:
        raise ValueError(f"{n_img} images but {len(labels)} labels")
    if rescale is not None and len(rescale) != n_img:
        raise ValueError(f"{n_img} images but {len(rescale)} rescale factors")
    out_hw = (int(xy[0]), int(xy[1]))
    n_chan = images[0].shape[0] if n_img else 0
    imgs = np.zeros((n_img, n_chan, *out_hw), dtype=np.float32)
    lbls = None
    if labels is not None and n_img:
        lbls = np.zeros((n_img, labels[0].shape[0], *out_hw), dtype=np.float32)
    scales = np.ones(n_img, dtype=np.float32)
    for i, image in enumerate(images):
        height, width = image.shape[-2:]
        flip = bool(rng.random() > 0.5) and do_flip
        theta = rng.random() * 2.0 * np.pi
        scale = (1.0 - scale_range / 2.0) + scale_range * rng.random()
        if rescale is not None:
            scale = scale / float(rescale[i])
        slack = np.maximum(0.0, np.array([width * scale - out_hw[1], height * scale - out_hw[0]]))
        dxy = (rng.random(2) - 0.5) * slack
        img_i, lbl_i = _warp_one(
            image, None if labels is None else labels[i], theta, scale, flip, dxy, out_hw
        )
        imgs[i] = img_i
        if lbls is not None:
            lbls[i] = lbl_i
        scales[i] = scale
    return imgs, lbls, scales
