"""Shared machinery of the vendor importers: affines, staged outputs, tile-by-tile image
copies and sample metadata (transcript tables: :mod:`GeneSegNet.vendors.transcripts`).

Coordinates: x = column, y = row. Image pixel (row, col) covers [row, row + 1) x
[col, col + 1) px; a point at (x, y) px lies in pixel (floor(y), floor(x)) (the rule of
:func:`GeneSegNet.io.spots.spot_pixels`). An affine ``um_to_px`` is a 2x3 matrix ``A``
with ``[x_px, y_px] = A @ [x_um, y_um, 1]``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from GeneSegNet.errors import InputError
from GeneSegNet.io.atomic import temp_file
from GeneSegNet.io.metadata import METADATA_DIR, SampleMetadata, check_pixel_size
from GeneSegNet.io.records import json_ready

logger = logging.getLogger(__name__)

CONTROLS_DIR = "controls"
NUCLEI_DIR = "nuclei"  # id tables of vendor nuclei (label id -> vendor cell id)
IMAGE_TILE = 512  # px, tile edge of the written BigTIFF

Affine = np.ndarray  # (2, 3) float64, µm -> px


def check_affine(affine: Any, where: str) -> Affine:
    """``affine`` as a finite, invertible (2, 3) float64 array; else InputError."""
    try:
        a = np.asarray(affine, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where}: µm -> px transform is not numeric") from exc
    if a.shape == (3, 3):
        if not np.allclose(a[2], (0, 0, 1)):
            raise InputError(f"{where}: last row of the 3x3 transform must be 0 0 1, got {a[2]}")
        a = a[:2]
    if a.shape != (2, 3):
        raise InputError(f"{where}: expected a 2x3 or 3x3 transform, got shape {a.shape}")
    det = float(np.linalg.det(a[:, :2]))
    if not np.all(np.isfinite(a)) or not math.isfinite(det) or abs(det) < 1e-12:
        raise InputError(f"{where}: transform is not finite and invertible: {a.tolist()}")
    return a


def pixel_size_of(affine: Affine) -> float:
    """Edge of one pixel in µm implied by a µm -> px affine (geometric mean of the axes)."""
    return 1.0 / math.sqrt(abs(float(np.linalg.det(affine[:, :2]))))


def scale_affine(pixel_size_x: float, pixel_size_y: float | None = None,
                 origin_um: tuple[float, float] = (0.0, 0.0)) -> Affine:
    """µm -> px affine for an image whose pixel (0, 0) corner sits at ``origin_um``."""
    psy = pixel_size_x if pixel_size_y is None else pixel_size_y
    return np.array([[1 / pixel_size_x, 0, -origin_um[0] / pixel_size_x],
                     [0, 1 / psy, -origin_um[1] / psy]], dtype=np.float64)


def apply_affine(affine: Affine, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x_px, y_px) = affine @ (x_um, y_um, 1); (N,) float64 arrays."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return _affine_row(affine[0], x, y), _affine_row(affine[1], x, y)


def _affine_row(row: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``row[0] x + row[1] y + row[2]`` (float64, (N,)), skipping a zero x or y term.

    Equal to the full sum: a zero term adds exactly 0.0 (a non-finite x or y, whose zero
    term would be NaN, makes the other coordinate NaN, and such rows are dropped)."""
    a, b, c = (float(v) for v in row)
    if b == 0.0:
        out = np.multiply(x, a)
    elif a == 0.0:
        out = np.multiply(y, b)
    else:
        out = np.multiply(x, a)
        out += b * y
    out += c
    return out


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a non-empty file; else InputError naming it and ``what`` it is."""
    if not path.is_file():
        raise InputError(f"required {what} not found", path)
    if path.stat().st_size == 0:
        raise InputError(f"{what} is empty", path)
    return path


# ---------------------------------------------------------------- staged outputs
class Staging:
    """Outputs written under temporary names and renamed together by :meth:`commit`.

    ``path(final)`` returns a temporary path beside ``final`` (same suffix). If the work
    fails, :meth:`discard` deletes every temporary file, so no output is half-written.
    """

    def __init__(self, overwrite: bool = False) -> None:
        self.overwrite = overwrite
        self._pending: list[tuple[Path, Path]] = []

    def path(self, final: str | Path) -> Path:
        final = Path(final)
        if final.exists() and not self.overwrite:
            raise InputError("output already exists (use --overwrite to replace it)", final)
        tmp = temp_file(final)
        self._pending.append((tmp, final))
        return tmp

    def commit(self) -> list[Path]:
        done = []
        for tmp, final in self._pending:
            os.replace(tmp, final)
            done.append(final)
        self._pending = []
        return done

    def discard(self) -> None:
        for tmp, _ in self._pending:
            tmp.unlink(missing_ok=True)
        self._pending = []

    def __enter__(self) -> Staging:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


# ---------------------------------------------------------------- images
RowReader = Callable[[int, int], np.ndarray]  # (row0, row1) -> (row1 - row0, W) array


def zarr_row_reader(store_array: Any, axes: str, select: dict[str, int]) -> RowReader:
    """Row-strip reader over a zarr array (tifffile ``aszarr``) with ``axes`` such as
    "CYX" or "ZYX": axes other than Y and X take the index in ``select`` (default 0)."""
    def read(r0: int, r1: int) -> np.ndarray:
        index = tuple(slice(r0, r1) if a == "Y" else slice(None) if a == "X"
                      else select.get(a, 0) for a in axes)
        return np.asarray(store_array[index])
    return read


def open_tiff_level(path: Path, level: int = 0, select: dict[str, int] | None = None
                    ) -> tuple[RowReader, tuple[int, int], np.dtype, tifffile.TiffFile]:
    """Open series 0 of a TIFF at pyramid ``level`` as a lazy row-strip reader.

    Returns (reader, (H, W), dtype, open TiffFile: close it when done). ``select`` gives
    the index of each non-spatial axis (e.g. ``{"C": 0}`` = first channel); an index out
    of range raises InputError.
    """
    import zarr

    select = dict(select or {})
    try:
        tif = tifffile.TiffFile(path)
    except (OSError, tifffile.TiffFileError) as exc:
        raise InputError(f"cannot read TIFF ({exc})", path) from exc
    try:
        if not tif.series:
            raise InputError("TIFF contains no image", path)
        series = tif.series[0]
        levels = series.levels or [series]
        if not 0 <= level < len(levels):
            raise InputError(f"pyramid level {level} requested; the file has levels "
                             f"0..{len(levels) - 1}", path)
        lev = levels[level]
        axes = lev.axes
        if "Y" not in axes or "X" not in axes:
            raise InputError(f"image axes {axes!r} have no Y and X", path)
        for ax, size in zip(axes, lev.shape, strict=True):
            if ax in select and not -size <= select[ax] < size:
                raise InputError(f"{ax} index {select[ax]} out of range (size {size})", path)
        array = zarr.open(series.aszarr(level=level), mode="r")
        shape = (lev.shape[axes.index("Y")], lev.shape[axes.index("X")])
        return zarr_row_reader(array, axes, select), shape, np.dtype(lev.dtype), tif
    except BaseException:
        tif.close()
        raise


def ome_pixel_size(tif: tifffile.TiffFile) -> tuple[float | None, float | None]:
    """(PhysicalSizeX, PhysicalSizeY) in µm of an OME-TIFF's first image, or None each."""
    xml = tif.ome_metadata or ""
    out = []
    for key in ("PhysicalSizeX", "PhysicalSizeY"):
        m = re.search(rf'{key}="([^"]+)"', xml)
        unit = re.search(rf'{key}Unit="([^"]+)"', xml)
        value = float(m.group(1)) if m else None
        if value is not None and unit and unit.group(1) in ("nm",):
            value /= 1000.0
        out.append(value)
    return out[0], out[1]


def row_tiles(read_rows: RowReader, shape: tuple[int, int], dtype: np.dtype,
              tile: int = IMAGE_TILE) -> Iterator[np.ndarray]:
    """``tile`` x ``tile`` tiles (row-major, edge tiles zero-padded) of an (H, W) image read
    one strip of ``tile`` rows at a time (memory: one strip)."""
    from tqdm import tqdm

    height, width = int(shape[0]), int(shape[1])
    padded_w = -(-width // tile) * tile
    for r0 in tqdm(range(0, height, tile), desc="image", unit="strip", leave=False):
        r1 = min(r0 + tile, height)
        strip = np.zeros((tile, padded_w), dtype=dtype)
        strip[: r1 - r0, :width] = read_rows(r0, r1)
        for c0 in range(0, padded_w, tile):
            yield strip[:, c0:c0 + tile]


# ---------------------------------------------------------------- metadata
def write_sample_metadata(path: Path, meta: SampleMetadata, extra: dict[str, Any]) -> None:
    """Write the SampleMetadata JSON plus ``extra`` keys (counts, import details)."""
    check_pixel_size(meta.pixel_size_um, str(path))
    data = meta.to_dict() | json_ready(extra)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def metadata_dir(base: Path) -> Path:
    return base / METADATA_DIR

