"""Window grid of whole-slide inference: settings, starts and the resize to the network.

Windows are square, row-major (y outer), with starts ``0, stride, 2·stride, …`` per axis
and the last window flush with the edge (MONAI ``dense_patch_slices`` semantics, spec §8).
Global mode overlaps windows by twice the cell diameter by default and lets the grid
extend ``border`` pixels beyond the image on every side, where the network sees zeros
(the 8 network pixels of zero padding that the per-crop pass adds, spec §7.1 step 3),
so the image edge is treated as in ``GeneSeg_test.py``. Window-local (upstream) mode
uses upstream's stride ``int(max(window - 16, 0.75·window))`` and no border.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from GeneSegNet.model.predict import EvalConfig, rescale_factor

UPSTREAM_OVERLAP = 16  # px; upstream stride = int(max(window - 16, 0.75 * window))
BORDER_NET_PX = 8  # zero padding around the image, in network pixels (upstream pad_image_ND)
CANVAS_DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class SlideConfig:
    """Settings of the whole-slide network pass.

    Attributes
    ----------
    window : window edge in image pixels (upstream 256).
    overlap : overlap of neighbouring windows in pixels. None: twice the cell diameter
        (global mode), upstream's rule (window-local mode).
    sigma : heatmap Gaussian sigma in pixels (upstream 7).
    window_local : upstream behaviour (window-local heatmaps and normalisation, uniform
        averaging); see the module docstring.
    canvas_dtype : "float16" (default, 8 bytes per pixel in all) or "float32".
    sample_pixels : pixels in the strided subsample used for the image percentiles.
    evaluation : diameter, batch size, normalisation and heatmap scaling of the network
        pass (``batch_size`` counts windows here; tiles in window-local mode).
    """

    window: int = 256
    overlap: int | None = None
    sigma: float = 7.0
    window_local: bool = False
    canvas_dtype: str = "float16"
    sample_pixels: int = 4_000_000
    evaluation: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        problems = []
        if self.window < 16:
            problems.append(f"window must be >= 16 px, got {self.window}")
        if self.overlap is not None and not 0 <= self.overlap < self.window:
            problems.append(f"overlap must lie in [0, window), got {self.overlap}")
        if not self.sigma > 0:
            problems.append(f"sigma must be > 0, got {self.sigma}")
        if self.canvas_dtype not in CANVAS_DTYPES:
            problems.append(f"canvas_dtype must be one of {CANVAS_DTYPES}, got {self.canvas_dtype}")
        if self.sample_pixels < 1:
            problems.append(f"sample_pixels must be >= 1, got {self.sample_pixels}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class WindowPlan:
    """Resolved window grid: top-left corners (row-major) and the resize to the network."""

    window: int
    stride: tuple[int, int]
    starts: list[tuple[int, int]]  # may be negative by up to ``border``
    border: int  # zero-padded pixels around the image covered by the grid
    rescale: float  # diam_mean / diameter
    net_size: int  # window edge as the network sees it (global mode)
    diameter: float  # cell diameter in image pixels


def upstream_stride(length: int, window: int = 256) -> int:
    """Upstream's stride along an axis: the window itself if the (bottom/right
    zero-padded) axis is exactly one window long, else ``int(max(window - 16,
    0.75 * window))`` (240 for 256)."""
    if max(length, window) == window:
        return window
    return int(max(window - UPSTREAM_OVERLAP, 0.75 * window))


def window_starts(length: int, window: int, stride: int) -> np.ndarray:
    """Window starts along one axis (MONAI ``dense_patch_slices`` semantics, spec §8).

    Starts are ``0, stride, 2·stride, …`` for as many windows as needed to reach the
    end, each pulled back to at most ``length - window`` (so the last is flush with the
    edge). An axis no longer than the window has the single start 0 (it is padded).

    Examples
    --------
    >>> window_starts(737, 256, 240).tolist()
    [0, 240, 480, 481]
    """
    if stride < 1 or window < 1:
        raise ValueError(f"window and stride must be positive, got {window}, {stride}")
    if length <= window:
        return np.zeros(1, dtype=np.int64)
    count = 1 + math.ceil((length - window) / stride)
    return np.minimum(np.arange(count, dtype=np.int64) * stride, length - window)


def default_overlap(diameter: float) -> int:
    """Default overlap of global mode: twice the cell diameter, in whole pixels."""
    return int(math.ceil(2.0 * diameter))


def plan_windows(
    shape: tuple[int, int],
    cfg: SlideConfig,
    *,
    diam_mean: float,
    diam_labels: float,
    size_multiple: int = 8,
) -> WindowPlan:
    """Window grid and resize factor for an image of ``shape`` (H, W).

    Raises ValueError when the overlap does not fit the window.
    """
    rescale = rescale_factor(cfg.evaluation, diam_mean=diam_mean, diam_labels=diam_labels)
    diameter = float(diam_mean) / rescale
    window = cfg.window
    if cfg.window_local and cfg.overlap is None:
        stride = (upstream_stride(shape[0], window), upstream_stride(shape[1], window))
    else:
        overlap = default_overlap(diameter) if cfg.overlap is None else cfg.overlap
        if overlap >= window:
            raise ValueError(
                f"an overlap of {overlap} px (twice the {diameter:.1f}-px cell diameter) "
                f"does not fit {window}-px windows; use a larger window or a smaller overlap"
            )
        stride = (window - overlap, window - overlap)
    border = 0 if cfg.window_local else int(math.ceil(BORDER_NET_PX / rescale))
    rows = window_starts(shape[0] + 2 * border, window, stride[0]) - border
    cols = window_starts(shape[1] + 2 * border, window, stride[1]) - border
    starts = [(int(r), int(c)) for r in rows for c in cols]
    multiple = max(1, int(size_multiple))
    net_size = max(multiple, int(round(window * rescale / multiple)) * multiple)
    return WindowPlan(window, stride, starts, border, rescale, net_size, diameter)
