"""Working resolution: resample an image, its labels and its spots to another pixel size.

``--working_pixel_size`` lets preprocessing (hence training) and inference run at a pixel
size of the user's choice (e.g. 0.5 µm/px for a 0.2125 µm/px Xenium image: 5.5× fewer
pixels) while inference still writes its results on the input's pixel grid.

Pixel convention (the project's, :func:`GeneSegNet.io.spots.spot_pixels`): pixel ``i``
covers the continuous coordinates ``[i, i + 1)``. A grid of H px resampled to H' px keeps
the image's extent: continuous coordinate ``y`` becomes ``y * H' / H``, so working pixel
``j`` covers input coordinates ``[j H / H', (j + 1) H / H')`` and its centre is
``(j + 0.5) H / H'``. Images are resampled by linear interpolation at the pixel centres
(area-averaged first when shrinking), labels by the nearest pixel centre, spots by the
per-axis factor.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from skimage.transform import resize

from GeneSegNet.errors import InputError
from GeneSegNet.io.metadata import metadata_path

logger = logging.getLogger(__name__)


def working_shape(shape: tuple[int, int], pixel_size_um: float, working_pixel_size_um: float
                  ) -> tuple[int, int]:
    """(rows, cols) of a ``shape`` grid at ``pixel_size_um`` resampled to
    ``working_pixel_size_um`` (µm/px; each side rounded, at least 1 px)."""
    if not (pixel_size_um > 0 and working_pixel_size_um > 0):
        raise InputError(f"pixel sizes must be positive, got {pixel_size_um} and "
                         f"{working_pixel_size_um} µm/px")
    factor = pixel_size_um / working_pixel_size_um
    return (max(1, int(round(shape[0] * factor))), max(1, int(round(shape[1] * factor))))


def require_pixel_sizes(pixel_sizes: Mapping[str, float | None], metadata_base: Path | None
                        ) -> None:
    """InputError unless every sample has a pixel size (``--working_pixel_size`` needs
    them), naming the first samples without one and the metadata file to write."""
    unknown = sorted(name for name, pixel in pixel_sizes.items() if pixel is None)
    if unknown:
        where = (metadata_path(metadata_base, unknown[0]) if metadata_base is not None
                 else f"metadata/{unknown[0]}.json")
        raise InputError(f"--working_pixel_size needs every pixel size; none for "
                         f"{', '.join(unknown[:5])}: give --pixel_size or write {where}")


def axis_factors(shape: tuple[int, int], new_shape: tuple[int, int]) -> tuple[float, float]:
    """(row, col) factors that take continuous coordinates of ``shape`` to ``new_shape``."""
    return new_shape[0] / shape[0], new_shape[1] / shape[1]


def resample_image(image: np.ndarray, new_shape: tuple[int, int]) -> np.ndarray:
    """``image`` (H, W) or (H, W, C) at (H', W') px, same dtype (integers rounded and
    clipped to the dtype's range); area-averaged when shrinking."""
    image = np.asarray(image)
    if image.shape[:2] == tuple(new_shape):
        return image
    shrinking = new_shape[0] < image.shape[0] or new_shape[1] < image.shape[1]
    out = resize(image.astype(np.float32, copy=False), tuple(new_shape) + image.shape[2:],
                 order=1, mode="edge", anti_aliasing=shrinking, preserve_range=True)
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(image.dtype, copy=False)


def resample_labels(labels: np.ndarray, new_shape: tuple[int, int]) -> np.ndarray:
    """Label (or any per-pixel) image (H, W, ...) at (H', W') by the nearest pixel centre:
    output pixel ``j`` takes input pixel ``floor((j + 0.5) H / H')``. Up- and
    down-sampling by the same integer factor are exact inverses."""
    labels = np.asarray(labels)
    height, width = labels.shape[:2]
    if (height, width) == tuple(new_shape):
        return labels
    rows = np.minimum(((np.arange(new_shape[0]) + 0.5) * height / new_shape[0]).astype(np.int64),
                      height - 1)
    cols = np.minimum(((np.arange(new_shape[1]) + 0.5) * width / new_shape[1]).astype(np.int64),
                      width - 1)
    return labels[rows[:, None], cols[None, :]]


def scale_spots(x_px: np.ndarray, y_px: np.ndarray, shape: tuple[int, int],
                new_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Continuous spot coordinates (x = col, y = row; px of ``shape``) in px of
    ``new_shape``."""
    fr, fc = axis_factors(shape, new_shape)
    return np.asarray(x_px, dtype=np.float64) * fc, np.asarray(y_px, dtype=np.float64) * fr


def spot_pixels_at(rows_px: np.ndarray, cols_px: np.ndarray, shape: tuple[int, int],
                   new_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Integer spot pixels (rows, cols) of ``shape`` (each spot at its pixel's centre) as
    integer pixels of ``new_shape``."""
    fr, fc = axis_factors(shape, new_shape)
    rows = np.minimum(np.floor((np.asarray(rows_px) + 0.5) * fr), new_shape[0] - 1)
    cols = np.minimum(np.floor((np.asarray(cols_px) + 0.5) * fc), new_shape[1] - 1)
    return rows.astype(np.int32), cols.astype(np.int32)
