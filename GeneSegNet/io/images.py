"""Reading and writing images and label images.

Images: jpg, png, tif/tiff (including OME-TIFF), 8- or 16-bit, grey or colour. Colour
images are returned in OpenCV's BGR channel order, channels last, as upstream did.
Label images: png, tif, MATLAB ``.mat`` (key ``CellMap``) and ``.npy``; instance ids
keep an integer type at least as wide as stored (never truncated to 8 bit).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np
import tifffile

from GeneSegNet.errors import InputError
from GeneSegNet.io.atomic import atomic_path
from GeneSegNet.io.image_limits import check_declared_size, check_pixels, to_png_storable
from GeneSegNet.io.safe_npy import load_npy_restricted

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
LABEL_EXTENSIONS = (".png", ".tif", ".tiff", ".mat", ".npy")
TIFF_EXTENSIONS = (".tif", ".tiff")
MAT_LABEL_KEY = "CellMap"
UINT16_MAX = np.iinfo(np.uint16).max
MAX_CHANNELS = 8  # more: a Z stack or time series, not the channels of one image
MAX_LABEL_ID = np.iinfo(np.int32).max  # label ids are processed as int32


def grey(image: np.ndarray) -> np.ndarray:
    """(H, W) single-channel view of an [H, W] or [H, W, C] image (mean over channels)."""
    image = np.asarray(image)
    if image.ndim == 2:
        return image
    if image.ndim == 3:
        return image[:, :, 0] if image.shape[2] == 1 else image.mean(axis=2)
    raise ValueError(f"expected an image [H, W] or [H, W, C], got shape {image.shape}")


def _read_tiff(path: Path) -> np.ndarray:
    """First series, full resolution, as (H, W) or (H, W, C)."""
    with tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise InputError("TIFF file contains no image", path)
        series = tif.series[0]
        level = series.levels[0] if series.levels else series
        _check_tiff_size(level, path)
        array = level.asarray()
        axes = series.axes
    array, axes = _squeeze_axes(array, axes)
    if "Z" in axes and array.ndim >= 3:
        z = axes.index("Z")
        logger.warning("%s: a stack of %d Z planes; using their maximum projection",
                       path, array.shape[z])
        array, axes = array.max(axis=z), axes.replace("Z", "")
    if array.ndim == 3 and ("C" in axes or "S" in axes):
        # OME-TIFF and ImageJ stacks store channels first (CYX); samples are last (YXS).
        if array.shape[0] < array.shape[-1] and array.shape[0] <= 8:
            array = np.moveaxis(array, 0, -1)
    if array.ndim not in (2, 3):
        raise InputError(f"expected a 2-D image, found an array of shape {array.shape}", path)
    if array.ndim == 3 and min(array.shape[0], array.shape[-1]) > MAX_CHANNELS:
        raise InputError(
            f"a stack of {array.shape[0]} planes (shape {array.shape}, axes "
            f"{axes or 'unknown'}), not a 2-D image; give one plane or a projection",
            path,
        )
    return array


def _squeeze_axes(array: np.ndarray, axes: str) -> tuple[np.ndarray, str]:
    """Drop length-1 axes, keeping the axes string in step when it matches."""
    if len(axes) != array.ndim:
        return np.squeeze(array), ""
    keep = [i for i, n in enumerate(array.shape) if n != 1]
    return array.reshape([array.shape[i] for i in keep]), "".join(axes[i] for i in keep)


def _check_tiff_size(series, path: Path) -> None:
    """Refuse a TIFF whose declared pixels would not fit (checked before decoding)."""
    shape = tuple(int(n) for n in series.shape)
    if len(shape) < 2:
        return
    axes = series.axes if len(series.axes) == len(shape) else ""
    if "Y" in axes and "X" in axes:
        hw = (shape[axes.index("Y")], shape[axes.index("X")])
    else:
        hw = shape[-2:] if len(shape) == 2 or shape[-1] > 4 else shape[-3:-1]
    check_pixels(hw, int(np.prod(shape)) * np.dtype(series.dtype).itemsize, path)


def _check_channels(image: np.ndarray, path: Path) -> None:
    if image.ndim == 3 and image.shape[2] > MAX_CHANNELS:
        raise InputError(
            f"image has {image.shape[2]} channels (shape {image.shape}): a Z stack or time "
            f"series is not a 2-D image; give one plane or a projection (at most "
            f"{MAX_CHANNELS} channels)",
            path,
        )


def _check_readable(path: Path) -> None:
    if not path.is_file():
        raise InputError("file not found", path)
    if path.stat().st_size == 0:
        raise InputError("file is empty", path)


def read_image(path: str | Path, mode: str = "unchanged") -> np.ndarray:
    """Read an image file.

    Parameters
    ----------
    path : image file (png, jpg, jpeg, tif, tiff).
    mode : "unchanged" returns the stored array ((H, W) or (H, W, C), uint8/uint16/float);
        "gray" returns (H, W) in the stored bit depth (colour is converted with OpenCV's
        BGR weights; other multi-channel images keep their first channel, the nuclear
        stain); "color" returns (H, W, 3) BGR.

    Raises
    ------
    InputError : missing, empty, unreadable or not an image.
    """
    path = Path(path)
    _check_readable(path)
    if path.suffix.lower() in TIFF_EXTENSIONS:
        try:
            image = _read_tiff(path)
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001 - tifffile raises many types on bad files
            raise InputError(f"cannot read TIFF image ({exc})", path) from exc
    else:
        check_declared_size(path)
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise InputError("cannot read image (corrupt or unsupported format)", path)
        if image.ndim == 3 and image.shape[2] == 4:  # drop alpha
            image = image[:, :, :3]
    if image.size == 0 or min(image.shape[:2]) == 0:
        raise InputError("image has no pixels", path)
    _check_channels(image, path)
    return _convert_mode(_fill_non_finite(image, path), mode, path)


def _fill_non_finite(image: np.ndarray, path: Path) -> np.ndarray:
    """NaN/inf pixels of a float image are missing data: they take the image's lowest
    finite value (background), with a warning; an image without finite pixels is refused."""
    if not np.issubdtype(image.dtype, np.floating):
        return image
    finite = np.isfinite(image)
    if finite.all():
        return image
    if not finite.any():
        raise InputError("image holds no finite pixel values (all NaN or infinite)", path)
    n_bad = int(image.size - finite.sum())
    logger.warning("%s: %d non-finite pixel value(s) (%.2g %%) treated as missing (set to the "
                   "lowest finite value)", path, n_bad, 100.0 * n_bad / image.size)
    return np.where(finite, image, image[finite].min())


def _convert_mode(image: np.ndarray, mode: str, path: Path) -> np.ndarray:
    if mode == "unchanged":
        return image
    if mode == "gray":
        if image.ndim == 2:
            return image
        if image.shape[2] == 3:
            return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        return np.ascontiguousarray(image[:, :, 0])
    if mode == "color":
        if image.ndim == 2:
            return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        if image.shape[2] == 3:
            return image
        if image.shape[2] == 1:
            return np.repeat(image, 3, axis=2)
        raise InputError(f"cannot make a colour image from {image.shape[2]} channels", path)
    raise ValueError(f"unknown image mode {mode!r}")


def _as_label_array(array: np.ndarray, path: Path) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim > 2:  # e.g. (1, H, W) stacks; a single-row image stays 2-D
        array = np.squeeze(array)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        raise InputError("label image has colour channels; expected one integer id per pixel", path)
    if array.ndim != 2:
        raise InputError(f"label image must be 2-D, found shape {array.shape}", path)
    if array.dtype == bool:
        return array.astype(np.int32)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise InputError("label image holds non-integer values", path)
        if array.size and (array.min() < 0 or array.max() > MAX_LABEL_ID):
            raise InputError(f"label ids must be 0..{MAX_LABEL_ID:,}", path)
        return array.astype(np.int64 if array.max(initial=0) > np.iinfo(np.int32).max else np.int32)
    if not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"label image has unsupported type {array.dtype}", path)
    if array.size and array.min() < 0:
        raise InputError("label image holds negative ids", path)
    if array.size and int(array.max()) > MAX_LABEL_ID:
        raise InputError(
            f"label ids up to {int(array.max()):,} exceed {MAX_LABEL_ID:,} (32-bit signed); "
            "renumber the cells 1..N",
            path,
        )
    return array


def read_label(path: str | Path) -> np.ndarray:
    """Read an instance label image (0 = background), keeping the stored integer type.

    Supports png/tif (read unchanged), ``.mat`` (key ``CellMap``) and ``.npy`` (an array,
    or a Cellpose-style dict with key ``masks``).
    """
    path = Path(path)
    _check_readable(path)
    suffix = path.suffix.lower()
    if suffix == ".mat":
        array = _read_mat_label(path)
    elif suffix == ".npy":
        loaded = load_npy_restricted(path)  # pickles: plain data only, never code
        array = _read_npy_dict(loaded, path) if loaded.dtype.hasobject else loaded
    elif suffix in TIFF_EXTENSIONS:
        try:
            with tifffile.TiffFile(path) as tif:
                if not tif.series:
                    raise InputError("TIFF file contains no image", path)
                _check_tiff_size(tif.series[0], path)
                array = tif.series[0].asarray()
        except InputError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"cannot read TIFF label ({exc})", path) from exc
    else:
        check_declared_size(path)
        array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if array is None:
            raise InputError("cannot read label image (corrupt or unsupported format)", path)
    return _as_label_array(array, path)


def _read_npy_dict(loaded: np.ndarray, path: Path) -> np.ndarray:
    """Cellpose ``_seg.npy`` files are pickled dicts; only plain arrays are accepted."""
    data = loaded.item() if loaded.shape == () else None
    if not isinstance(data, dict) or "masks" not in data:
        raise InputError("a pickled .npy label must be a dict with key 'masks'", path)
    return np.asarray(data["masks"])


def _read_mat_label(path: Path) -> np.ndarray:
    from scipy.io import loadmat

    try:
        data = loadmat(path)
    except NotImplementedError as exc:
        raise InputError("MATLAB v7.3 (HDF5) files are not supported; save with -v7", path) from exc
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot read .mat file ({exc})", path) from exc
    if MAT_LABEL_KEY not in data:
        keys = sorted(k for k in data if not k.startswith("__"))
        raise InputError(f"no '{MAT_LABEL_KEY}' variable in .mat file (found {keys})", path)
    return data[MAT_LABEL_KEY]


def write_image(path: str | Path, image: np.ndarray, jpeg_quality: int = 95) -> Path:
    """Write an image atomically (format from the suffix: png, jpg or tif)."""
    path = Path(path)
    if path.suffix.lower() not in TIFF_EXTENSIONS:
        image = to_png_storable(np.asarray(image))  # scaled, never clipped or wrapped
        if path.suffix.lower() in (".jpg", ".jpeg") and image.dtype == np.uint16:
            image = (image >> 8).astype(np.uint8)
    with atomic_path(path) as tmp:
        if path.suffix.lower() in TIFF_EXTENSIONS:
            tifffile.imwrite(tmp, image)
        else:
            params = (
                [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]
                if path.suffix.lower() in (".jpg", ".jpeg")
                else []
            )
            if not cv2.imwrite(str(tmp), image, params):
                raise OSError(f"OpenCV could not write {path}")
    return path


def write_label(path: str | Path, labels: np.ndarray, dtype: np.dtype | None = None) -> Path:
    """Write a label image atomically, choosing the narrowest lossless type (or ``dtype``,
    e.g. uint32 for tools that want 32-bit labels; ids must fit it).

    ``.png``: 8-bit when ids ≤ 255, else 16-bit; ids above 65,535 cannot be stored in a
    PNG, so the file is written as 32-bit TIFF with suffix ``.tif`` instead (the path
    actually written is returned). ``.tif``/``.tiff``: uint8/16/32 as needed.
    ``.mat``: key ``CellMap``. ``.npy``: the integer array.
    """
    path = Path(path)
    labels = np.asarray(labels)
    top = int(labels.max(initial=0))
    suffix = path.suffix.lower()
    if suffix == ".png" and top > UINT16_MAX:
        path = path.with_suffix(".tif")
        suffix = ".tif"
    if dtype is None:
        dtype = np.uint8 if top <= 255 else np.uint16 if top <= UINT16_MAX else np.uint32
    elif labels.size and (labels.min() < 0 or top > np.iinfo(dtype).max):
        raise InputError(f"label ids do not fit {np.dtype(dtype).name}", path)
    data = labels.astype(dtype, copy=False)
    with atomic_path(path) as tmp:
        if suffix == ".png":
            if not cv2.imwrite(str(tmp), data):
                raise OSError(f"OpenCV could not write {path}")
        elif suffix in TIFF_EXTENSIONS:
            tifffile.imwrite(tmp, data, compression="zlib")
        elif suffix == ".mat":
            from scipy.io import savemat

            # scipy compresses in memory (several times the array's size): only small ones.
            savemat(tmp, {MAT_LABEL_KEY: data}, do_compression=data.nbytes < 2**26)
        elif suffix == ".npy":
            np.save(tmp, data)
        else:
            raise ValueError(f"unsupported label format {suffix!r}")
    return path


def write_tiled_tiff(path: str | Path, tiles: Iterable[np.ndarray], shape: tuple[int, int],
                     dtype: np.dtype, tile: int, *, pixel_size_um: float | None = None,
                     compression: str | None = "zlib") -> Path:
    """Stream ``tile`` x ``tile`` tiles (row-major, edge tiles zero-padded) into a tiled
    BigTIFF of ``shape`` (H, W), atomically; memory is one tile. ``pixel_size_um`` is
    stored as the TIFF resolution."""
    resolution = None
    if pixel_size_um:
        resolution = (1e4 / pixel_size_um, 1e4 / pixel_size_um)  # px per cm
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, iter(tiles), shape=tuple(shape), dtype=dtype, tile=(tile, tile),
                         bigtiff=True, photometric="minisblack", compression=compression,
                         resolution=resolution,
                         resolutionunit="CENTIMETER" if resolution else None, metadata=None)
    return Path(path)
