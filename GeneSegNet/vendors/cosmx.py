"""NanoString/Bruker CosMx SMI flat-file export -> raw layout.

Read from the bundle:

* the transcript file (``*_tx_file.csv[.gz]`` or ``--transcripts``): ``fov``,
  ``x_global_px``, ``y_global_px``, ``x_local_px``, ``y_local_px``, ``target``, optional
  ``CellComp``, ``cell_ID``;
* the FOV positions file (``*fov_positions_file.csv[.gz]``): ``fov``, ``x_global_px``,
  ``y_global_px``;
* ``Morphology2D/*_F<fff>.TIF``: per-FOV (C, H, W) morphology stacks; ``channel`` selects
  DAPI (default 4: DAPI is the last of CosMx's 5 standard stains);
* ``CellLabels/CellLabels_F<fff>.tif``: per-FOV cell labels (local px).

Convention (checked on the data): the FOV position is the global px of the top-left
corner of the FOV image's pixel (0, 0), and for every transcript
``x_global_px = x_fov + x_local_px`` and ``y_global_px = y_fov + y_local_px`` (x = column,
y = row, no axis flip). An import whose files disagree with this by more than 1 px fails
with the file named.

Modes: ``fov=N``: one FOV, its image and local px. ``fov=None``: every FOV of the
positions file stitched into one image at (y_fov - min y_fov, x_fov - min x_fov) (positions
rounded to whole px; where FOVs overlap the later FOV id wins), transcripts at
global px minus that origin. Pixel size: ``pixel_size`` (default 0.12028 µm/px, the
SMI's); µm = global px x pixel size.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import tifffile

from GeneSegNet.errors import InputError
from GeneSegNet.io.metadata import check_pixel_size
from GeneSegNet.vendors import Bundle
from GeneSegNet.vendors.common import (
    require_file,
    scale_affine,
)
from GeneSegNet.vendors.transcripts import (
    as_float,
    iter_table,
    require_columns,
)

logger = logging.getLogger(__name__)

DEFAULT_PIXEL_SIZE_UM = 0.12028
DEFAULT_DAPI_CHANNEL = 4
TX_REQUIRED = ["fov", "x_global_px", "y_global_px", "target"]
TX_OPTIONAL = ["x_local_px", "y_local_px", "CellComp", "cell_ID"]
MAX_CONVENTION_ERROR_PX = 1.0


def _find_one(bundle: Path, pattern: str, what: str) -> Path:
    hits = sorted(p for p in bundle.glob(pattern) if p.is_file())
    if not hits:
        raise InputError(f"required {what} ({pattern}) not found", bundle)
    return hits[0]


def _fov_files(folder: Path, what: str) -> dict[int, Path]:
    if not folder.is_dir():
        raise InputError(f"required {what} folder not found", folder)
    out = {}
    for f in folder.iterdir():
        m = re.search(r"_F(\d+)\.tiff?$", f.name, flags=re.IGNORECASE)
        if m:
            out[int(m.group(1))] = f
    if not out:
        raise InputError(f"no *_F<fff>.TIF files in the {what} folder", folder)
    return out


def read_positions(path: Path) -> pd.DataFrame:
    """FOV corners: DataFrame indexed by fov with float x_global_px, y_global_px."""
    require_file(path, "FOV positions file")
    frame = pd.read_csv(path)
    frame.columns = [c if c not in ("FOV", "Fov") else "fov" for c in frame.columns]
    missing = [c for c in ("fov", "x_global_px", "y_global_px") if c not in frame]
    if missing:
        raise InputError(f"missing column(s) {missing} (found {list(frame.columns)})", path)
    if frame["fov"].duplicated().any():
        raise InputError("duplicate fov ids", path)
    return frame.set_index("fov")[["x_global_px", "y_global_px"]].astype(float)


def _channel_reader(path: Path, channel: int) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        data = tif.series[0].asarray()
    if data.ndim == 2:
        return data
    if data.ndim == 3:
        axis = 0 if data.shape[0] < data.shape[-1] else -1
        n = data.shape[axis]
        if not -n <= channel < n:
            raise InputError(f"channel {channel} out of range ({n} channels)", path)
        return np.take(data, channel, axis=axis)
    raise InputError(f"expected a (C, H, W) stack, got shape {data.shape}", path)


def _fov_shape(path: Path) -> tuple[int, int]:
    with tifffile.TiffFile(path) as tif:
        shape = tif.series[0].shape
        axes = tif.series[0].axes
    if "Y" in axes and "X" in axes:
        return shape[axes.index("Y")], shape[axes.index("X")]
    return shape[-2], shape[-1]


def open_cosmx(bundle: str | Path, fov: int | None = None, channel: int = DEFAULT_DAPI_CHANNEL,
                pixel_size: float | None = None, transcripts: str | Path | None = None,
                positions: str | Path | None = None, **_: Any) -> Bundle:
    """Open a CosMx flat-file folder (see the module doc)."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise InputError("CosMx output folder not found", bundle)
    tx_path = Path(transcripts) if transcripts else _find_one(bundle, "*tx_file.csv*",
                                                             "transcript file")
    require_file(tx_path, "transcript file")
    columns = require_columns(tx_path, TX_REQUIRED)
    extras = [c for c in TX_OPTIONAL if c in columns]
    pos_path = Path(positions) if positions else _find_one(
        bundle, "*fov_positions_file.csv*", "FOV positions file")
    corners = read_positions(pos_path)
    images = _fov_files(bundle / "Morphology2D", "Morphology2D")
    ps = check_pixel_size(DEFAULT_PIXEL_SIZE_UM if pixel_size is None else pixel_size,
                          "--pixel_size")
    source = "--pixel_size" if pixel_size is not None else "CosMx default 0.12028 µm/px"

    fovs = [int(fov)] if fov is not None else [int(f) for f in corners.index]
    for f in fovs:
        if f not in corners.index:
            raise InputError(f"fov {f} is not in the FOV positions file", pos_path)
        if f not in images:
            raise InputError(f"no morphology image for fov {f} (fov ids of {pos_path.name} "
                             "and Morphology2D/ do not match)", bundle / "Morphology2D")
    shapes = {f: _fov_shape(images[f]) for f in fovs}
    offsets = {f: (int(round(corners.loc[f, "y_global_px"])),
                   int(round(corners.loc[f, "x_global_px"]))) for f in fovs}
    if fov is not None:
        origin = offsets[fovs[0]]
        shape = shapes[fovs[0]]
    else:
        origin = (min(o[0] for o in offsets.values()), min(o[1] for o in offsets.values()))
        shape = (max(offsets[f][0] + shapes[f][0] for f in fovs) - origin[0],
                 max(offsets[f][1] + shapes[f][1] for f in fovs) - origin[1])
    # µm -> image px: global px = µm / ps; image px = global px - origin (x = col, y = row)
    affine = scale_affine(ps, ps, origin_um=(origin[1] * ps, origin[0] * ps))
    dtype = np.dtype(tifffile.TiffFile(images[fovs[0]]).series[0].dtype)
    cache: dict[int, np.ndarray] = {}

    def read_rows(r0: int, r1: int) -> np.ndarray:
        out = np.zeros((r1 - r0, shape[1]), dtype=dtype)
        wanted = set()
        for f in fovs:
            top = offsets[f][0] - origin[0]
            left = offsets[f][1] - origin[1]
            h, w = shapes[f]
            a, b = max(r0, top), min(r1, top + h)
            if a >= b:
                continue
            wanted.add(f)
            if f not in cache:
                img = _channel_reader(images[f], channel)
                if img.shape != (h, w):
                    raise InputError(f"image shape {img.shape} != header {(h, w)}", images[f])
                cache[f] = img
            out[a - r0:b - r0, left:left + w] = cache[f][a - top:b - top]
        for f in list(cache):
            if f not in wanted:
                del cache[f]
        return out

    known = set(int(f) for f in corners.index)
    cx = {int(f): corners.loc[f, "x_global_px"] for f in corners.index}
    cy = {int(f): corners.loc[f, "y_global_px"] for f in corners.index}
    has_local = "x_local_px" in columns and "y_local_px" in columns

    def batches() -> Iterator[pa.Table]:
        for t in iter_table(tx_path, TX_REQUIRED + extras, dictionary=["target"]):
            f_arr = pc.cast(t.column("fov"), pa.int64()).to_numpy(zero_copy_only=False)
            bad = set(np.unique(f_arr).tolist()) - known
            if bad:
                raise InputError(f"fov ids {sorted(bad)[:10]} are not in {pos_path.name} "
                                 "(the files do not belong together)", tx_path)
            gx, gy = as_float(t, "x_global_px"), as_float(t, "y_global_px")
            if has_local:
                lx, ly = as_float(t, "x_local_px"), as_float(t, "y_local_px")
                ex = np.abs(gx - lx - np.vectorize(cx.get, otypes=[float])(f_arr))
                ey = np.abs(gy - ly - np.vectorize(cy.get, otypes=[float])(f_arr))
                worst = float(np.nanmax(np.maximum(ex, ey), initial=0.0))
                if worst > MAX_CONVENTION_ERROR_PX:
                    raise InputError(
                        f"global px != FOV corner + local px by up to {worst:.1f} px: the "
                        f"positions in {pos_path.name} do not follow the convention "
                        "x_global = x_fov + x_local, y_global = y_fov + y_local", tx_path)
            if fov is not None:
                sel = f_arr == fov
                t = t.filter(pa.array(sel))
                if has_local:
                    xp, yp = lx[sel], ly[sel]
                else:
                    xp, yp = gx[sel] - origin[1], gy[sel] - origin[0]
            else:
                xp, yp = gx - origin[1], gy - origin[0]
            cols = {"x": pa.array(xp, pa.float64()), "y": pa.array(yp, pa.float64()),
                    "gene": t.column("target")}
            for c in ["fov", "x_global_px", "y_global_px", *extras]:
                cols[c] = t.column(c)
            yield pa.table(cols)

    labels_dir = bundle / "CellLabels"
    nuclei = None
    if labels_dir.is_dir():
        def nuclei(out_shape: tuple[int, int]) -> tuple[np.ndarray, list[Any]]:
            files = _fov_files(labels_dir, "CellLabels")
            labels = np.zeros(out_shape, dtype=np.uint32)
            ids: list[Any] = []
            for f in fovs:
                if f not in files:
                    raise InputError(f"no CellLabels_F{f:03d}.tif for fov {f}", labels_dir)
                local = tifffile.imread(files[f])
                if local.shape != shapes[f]:
                    raise InputError(f"shape {local.shape} != its morphology image's "
                                     f"{shapes[f]}", files[f])
                top, left = offsets[f][0] - origin[0], offsets[f][1] - origin[1]
                uniq = np.unique(local[local > 0])
                lut = np.zeros(int(local.max(initial=0)) + 1, dtype=np.uint32)
                lut[uniq] = np.arange(len(ids) + 1, len(ids) + 1 + len(uniq), dtype=np.uint32)
                ids.extend(f"{f}_{int(u)}" for u in uniq)
                view = labels[top:top + shapes[f][0], left:left + shapes[f][1]]
                mapped = lut[local]
                view[mapped > 0] = mapped[mapped > 0]
            return labels, ids

    return Bundle(platform="cosmx", image_reader=read_rows, image_shape=shape,
                  image_dtype=dtype, affine=affine, pixel_size_um=ps, pixel_size_source=source,
                  transcripts_path=tx_path, batches=batches,
                  details={"bundle": str(bundle), "mode": "global" if fov is None else "fov",
                           "fov": fov, "channel": channel, "fovs": fovs,
                           "origin_global_px": {"x": origin[1], "y": origin[0]},
                           "positions_file": str(pos_path)},
                  nuclei=nuclei)
