"""Image transforms shared by training and inference: normalise, resize, pad.

Arrays are channel-first ``[C, H, W]`` (rows = y, columns = x) unless stated otherwise.
Random augmentation lives in :mod:`GeneSegNet.training.augment`, tiling in
:mod:`GeneSegNet.model.tiling`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from GeneSegNet.data.normalize import LevelGrid, apply_levels, normalize_local

logger = logging.getLogger(__name__)

_INTERPOLATION = {"linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}

HeatmapMode = Literal["fixed", "percentile"]
HEATMAP_MODES: tuple[HeatmapMode, ...] = ("fixed", "percentile")  # the one list of scalings
# image-channel normalisation: local levels (GeneSegNet.data.normalize) or 1-99 % per input
IMAGE_NORMS = ("local", "percentile")
MIN_NORM_SCALE_PX = 64  # smallest block of local normalisation (px)
NORM_SCALE_DIAMETERS = 4.0  # local normalisation block = this many cell diameters


def check_heatmap_mode(mode: str) -> None:
    """Raise ValueError unless ``mode`` is one of :data:`HEATMAP_MODES`."""
    if mode not in HEATMAP_MODES:
        choices = " or ".join(repr(m) for m in HEATMAP_MODES)
        raise ValueError(f"heatmap_mode must be {choices}, got {mode!r}")


def normalize99(x: np.ndarray, lower: float = 1.0, upper: float = 99.0) -> np.ndarray:
    """Rescale one channel so that its ``lower`` and ``upper`` percentiles map to 0 and 1.

    Upstream semantics: percentiles use numpy's linear interpolation; the result is not
    clipped; a channel whose percentile range is at most 1e-3 becomes all zeros.

    Parameters
    ----------
    x : ndarray [H, W]
        One image channel, any real dtype.
    lower, upper : float
        Percentiles (0..100) mapped to 0 and 1.

    Returns
    -------
    ndarray [H, W] float32
    """
    x = np.asarray(x, dtype=np.float32)
    finite = np.isfinite(x)
    all_finite = bool(finite.all())
    if not all_finite:  # missing pixels: ignored by the percentiles, 0 in the output
        n_bad = int(x.size - finite.sum())
        logger.warning("%d non-finite pixel(s) (%.2g %% of the image) treated as missing",
                       n_bad, 100.0 * n_bad / max(x.size, 1))
        if not finite.any():
            return np.zeros_like(x, dtype=np.float32)
    p_low, p_high = np.percentile(x if all_finite else x[finite], [lower, upper])
    if p_high - p_low > 1e-3:
        out = ((x - p_low) / (p_high - p_low)).astype(np.float32, copy=False)
        return out if all_finite else np.where(finite, out, np.float32(0))
    return np.zeros_like(x, dtype=np.float32)


def _fixed_heatmap(channel: np.ndarray) -> np.ndarray:
    """Map a heatmap to [0, 1] without looking at its content (fix of spec §12 item 24).

    Integer maps are 8-bit renderings (0..255) and are divided by 255. Float maps already
    in [0, 1] are kept. A float map whose maximum lies in (1, 255] is taken to be an 8-bit
    map cast to float and is divided by 255; anything larger is rejected.
    """
    if np.issubdtype(channel.dtype, np.integer) or channel.dtype == bool:
        return channel.astype(np.float32) / np.float32(255.0)
    out = channel.astype(np.float32)
    peak = float(out.max()) if out.size else 0.0
    if peak <= 1.0 + 1e-6:
        return out
    if peak <= 255.0 + 1e-3:
        logger.debug("float heatmap with maximum %.3g taken as 8-bit scale, divided by 255", peak)
        return out / np.float32(255.0)
    raise ValueError(
        f"heatmap channel has maximum {peak:.4g}; expected a float map in [0, 1] "
        "or an 8-bit map in 0..255"
    )


def normalize_channels(
    image: np.ndarray,
    *,
    heatmap_channel: int | None,
    heatmap_mode: HeatmapMode = "fixed",
    invert: bool = False,
    passthrough: int = 0,
    image_norm: str = "percentile",
    scale_px: int = 0,
    origin: tuple[int, int] = (0, 0),
    levels: Sequence[LevelGrid] | None = None,
) -> np.ndarray:
    """Normalise every channel of one image, treating the heatmap channel apart.

    Parameters
    ----------
    image : ndarray [C, H, W]
        Stacked image channels (e.g. gray, heatmap) in any real dtype.
    heatmap_channel : int or None
        Index of the spot-heatmap channel (negative indices allowed), or None if there is
        no heatmap.
    heatmap_mode : {"fixed", "percentile"}
        ``"fixed"`` (default): integer heatmaps are divided by 255 and float heatmaps in
        [0, 1] are kept, so sparse heatmaps survive. ``"percentile"``: upstream behaviour,
        :func:`normalize99` on the heatmap as well (zeroes heatmaps that are non-zero on
        fewer than about 1 % of the pixels).
    invert : bool
        Replace every image channel x by 1 - x after normalisation.
    passthrough : int
        The last ``passthrough`` channels (density-mode transcript channels, on a fixed
        per-slide scale) are copied unchanged.
    image_norm : {"percentile", "local"}
        Image channels (neither heatmap nor passthrough): :func:`normalize99`, or local
        levels (:mod:`GeneSegNet.data.normalize`) on blocks of ``scale_px`` px anchored at
        the absolute ``origin`` (row, col) of pixel (0, 0), or the slide's ``levels``
        (one :class:`LevelGrid` per image channel) when given.

    Returns
    -------
    ndarray [C, H, W] float32
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"expected an image of shape [C, H, W], got shape {image.shape}")
    check_heatmap_mode(heatmap_mode)
    check_image_norm(image_norm)
    n_chan = image.shape[0]
    if not 0 <= passthrough <= n_chan:
        raise ValueError(f"passthrough {passthrough} out of range for {n_chan} channels")
    if image_norm == "local" and levels is None and scale_px < 2:
        raise ValueError(f"local image normalisation needs scale_px >= 2, got {scale_px}")
    heat = None
    if heatmap_channel is not None:
        if not -n_chan <= heatmap_channel < n_chan:
            raise ValueError(
                f"heatmap_channel {heatmap_channel} out of range for {n_chan} channels"
            )
        heat = heatmap_channel % n_chan
    out = np.empty(image.shape, dtype=np.float32)
    image_index = 0
    for c in range(n_chan):
        if c >= n_chan - passthrough:
            out[c] = image[c]
            continue
        if c == heat:
            out[c] = _fixed_heatmap(image[c]) if heatmap_mode == "fixed" else normalize99(image[c])
            continue
        if image_norm == "local" and levels is not None:
            out[c] = apply_levels(image[c], levels[image_index], origin)
        elif image_norm == "local":
            out[c] = normalize_local(image[c], scale_px=int(scale_px), origin=origin)
        else:
            out[c] = normalize99(image[c])
        image_index += 1
        if invert:
            out[c] = 1.0 - out[c]
    return out


def check_image_norm(mode: str) -> None:
    """Raise ValueError unless ``mode`` is one of :data:`IMAGE_NORMS`."""
    if mode not in IMAGE_NORMS:
        raise ValueError(f"image_norm must be one of {IMAGE_NORMS}, got {mode!r}")


def norm_scale_for(diameter_px: float) -> int:
    """Block size (px) of local image normalisation for cells of ``diameter_px`` px:
    ``max(MIN_NORM_SCALE_PX, ceil(NORM_SCALE_DIAMETERS × diameter))``."""
    return max(MIN_NORM_SCALE_PX, int(math.ceil(NORM_SCALE_DIAMETERS * float(diameter_px))))


@dataclass(frozen=True)
class InputNorm:
    """How a network input ``[image channels..., transcript channels...]`` is normalised.

    ``transcript_mode`` "heatmap": one transcript channel (the last), scaled by
    ``heatmap_mode``; "density": the last ``n_transcripts`` channels pass unchanged.
    ``image_norm``/``scale_px`` (px): see :func:`normalize_channels`.
    """

    heatmap_mode: HeatmapMode = "fixed"
    image_norm: str = "percentile"
    transcript_mode: str = "heatmap"
    n_transcripts: int = 1
    scale_px: int = 0
    invert: bool = False

    def __post_init__(self) -> None:
        check_heatmap_mode(self.heatmap_mode)
        check_image_norm(self.image_norm)
        if self.transcript_mode not in ("heatmap", "density"):
            raise ValueError(f"transcript_mode must be 'heatmap' or 'density', "
                             f"got {self.transcript_mode!r}")
        if self.n_transcripts < 1 or (self.transcript_mode == "heatmap"
                                      and self.n_transcripts != 1):
            raise ValueError(f"n_transcripts={self.n_transcripts} invalid for "
                             f"{self.transcript_mode} mode")
        if self.image_norm == "local" and self.scale_px < 2:
            raise ValueError(f"local image normalisation needs scale_px >= 2, got "
                             f"{self.scale_px}")


def normalize_input(
    raw: np.ndarray,
    norm: InputNorm,
    *,
    origin: tuple[int, int] = (0, 0),
    levels: Sequence[LevelGrid] | None = None,
) -> np.ndarray:
    """Normalised network input float32 [C, H, W] from an unnormalised one (see
    :class:`InputNorm`); ``origin`` (row, col, px) of pixel (0, 0) in the raw slide."""
    raw = np.asarray(raw)
    if raw.ndim != 3 or raw.shape[0] <= norm.n_transcripts:
        raise ValueError(f"expected an input [C, H, W] with more than {norm.n_transcripts} "
                         f"channels (image, then transcripts), got shape {raw.shape}")
    density = norm.transcript_mode == "density"
    return normalize_channels(
        raw,
        heatmap_channel=None if density else -1,
        heatmap_mode=norm.heatmap_mode,
        invert=norm.invert,
        passthrough=norm.n_transcripts if density else 0,
        image_norm=norm.image_norm,
        scale_px=norm.scale_px,
        origin=origin,
        levels=levels,
    )


def _cv2_dtype(img: np.ndarray, interpolation: str) -> tuple[np.ndarray, np.dtype]:
    """Return ``img`` in a dtype cv2 can resize, and the dtype of the result."""
    if interpolation == "nearest" and (np.issubdtype(img.dtype, np.integer) or img.dtype == bool):
        if img.size and (img.min() < np.iinfo(np.int32).min or img.max() > np.iinfo(np.int32).max):
            raise ValueError("integer values do not fit in int32; cannot resize")
        return img.astype(np.int32, copy=False), img.dtype
    return img.astype(np.float32, copy=False), np.dtype(np.float32)


def resize_image(
    img: np.ndarray,
    out_shape: tuple[int, int],
    interpolation: Literal["linear", "nearest"] = "linear",
) -> np.ndarray:
    """Resize the last two axes of an image with OpenCV.

    Parameters
    ----------
    img : ndarray [C, H, W] or [H, W]
        Any number of channels.
    out_shape : (h, w)
        Output size in pixels (rows, columns).
    interpolation : {"linear", "nearest"}
        ``"linear"`` is OpenCV bilinear; ``"nearest"`` is OpenCV nearest neighbour.

    Returns
    -------
    ndarray [C, h, w] or [h, w]
        float32; ``"nearest"`` keeps an integer (label) dtype.
    """
    if interpolation not in _INTERPOLATION:
        raise ValueError(f"interpolation must be 'linear' or 'nearest', got {interpolation!r}")
    img = np.asarray(img)
    if img.ndim not in (2, 3):
        raise ValueError(f"expected an image of shape [C, H, W] or [H, W], got {img.shape}")
    h, w = int(out_shape[0]), int(out_shape[1])
    if h < 1 or w < 1:
        raise ValueError(f"output shape must be positive, got {out_shape}")
    work, out_dtype = _cv2_dtype(img, interpolation)
    flag = _INTERPOLATION[interpolation]
    if work.ndim == 2:
        return cv2.resize(work, (w, h), interpolation=flag).astype(out_dtype, copy=False)
    out = np.empty((work.shape[0], h, w), dtype=out_dtype)
    for c in range(work.shape[0]):
        out[c] = cv2.resize(work[c], (w, h), interpolation=flag)
    return out


def pad_to_multiple(
    img: np.ndarray, multiple: int = 16, extra: int = 8
) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Zero-pad the last two axes up to a multiple of ``multiple`` plus ``extra`` per side.

    Upstream ``pad_image_ND`` semantics: along each spatial axis of length L, the
    ``ceil(L/multiple)·multiple − L`` missing pixels are split half before (rounded down)
    and half after, and ``extra`` pixels are added on both sides (272 → 288, 256 → 272).

    Parameters
    ----------
    img : ndarray [C, H, W] (or [H, W])
    multiple : int
        Padded size before ``extra`` is a multiple of this.
    extra : int
        Pixels added on each side of each spatial axis.

    Returns
    -------
    padded : ndarray, same dtype and leading axes
    crop : (slice, slice)
        ``padded[..., crop[0], crop[1]]`` is ``img``.
    """
    img = np.asarray(img)
    if img.ndim < 2:
        raise ValueError(f"expected at least 2 dimensions, got shape {img.shape}")
    pads = []
    crop = []
    for length in img.shape[-2:]:
        missing = int(multiple * np.ceil(length / multiple)) - length
        before = extra + missing // 2
        after = extra + missing - missing // 2
        pads.append((before, after))
        crop.append(slice(before, before + length))
    widths = [(0, 0)] * (img.ndim - 2) + pads
    return np.pad(img, widths, mode="constant"), (crop[0], crop[1])
