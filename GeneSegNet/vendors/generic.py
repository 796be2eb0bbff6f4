"""Any image + transcript table with an explicit µm -> px transform.

``um_to_px`` (a b c d e f): x_px = a x + b y + c, y_px = d x + e y + f (x, y in the
table's units, normally µm), or ``pixel_size`` (µm/px) and ``origin_um`` (the µm position
of the image's pixel (0, 0) corner): x_px = (x - X0) / pixel_size. With ``um_to_px`` the
pixel size is 1 / sqrt(|a e - b d|); a ``pixel_size`` given as well must agree with it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from GeneSegNet.errors import InputError
from GeneSegNet.io.metadata import check_pixel_size
from GeneSegNet.vendors import Bundle
from GeneSegNet.vendors.common import (
    apply_affine,
    check_affine,
    open_tiff_level,
    pixel_size_of,
    require_file,
    scale_affine,
)
from GeneSegNet.vendors.transcripts import (
    as_float,
    iter_table,
    require_columns,
)

logger = logging.getLogger(__name__)


def open_generic(image: str | Path | None = None, transcripts: str | Path | None = None,
                x_col: str = "x", y_col: str = "y", gene_col: str = "gene",
                um_to_px: Sequence[float] | None = None, pixel_size: float | None = None,
                origin_um: Sequence[float] = (0.0, 0.0), channel: int = 0, level: int = 0,
                min_qv: float | None = None, **_: Any) -> Bundle:
    """Open an image (TIFF, read lazily) and a transcript table with an explicit affine."""
    if image is None or transcripts is None:
        raise InputError("generic import needs --image and --transcripts")
    img_path, tx_path = Path(image), Path(transcripts)
    require_file(img_path, "image")
    require_file(tx_path, "transcript table")
    if um_to_px is not None:
        affine = check_affine(np.asarray(um_to_px, dtype=float).reshape(2, 3), "--um_to_px")
        derived = pixel_size_of(affine)
        if pixel_size is not None and not np.isclose(derived, pixel_size, rtol=1e-3):
            raise InputError(f"--pixel_size {pixel_size} disagrees with --um_to_px "
                             f"({derived:.6g} µm/px)")
        pixel, source = derived, "--um_to_px"
    else:
        pixel = check_pixel_size(pixel_size, "--pixel_size (or give --um_to_px)")
        affine = scale_affine(pixel, pixel, (float(origin_um[0]), float(origin_um[1])))
        source = "--pixel_size"
    columns = require_columns(tx_path, [x_col, y_col, gene_col])
    extras = [c for c in columns if c not in (x_col, y_col, gene_col, "x", "y", "gene")]
    reader, shape, dtype, tif = open_tiff_level(img_path, level, {"C": channel})

    def batches() -> Iterator[pa.Table]:
        for t in iter_table(tx_path, [x_col, y_col, gene_col, *extras],
                            dictionary=[gene_col]):
            xp, yp = apply_affine(affine, as_float(t, x_col), as_float(t, y_col))
            cols = {"x": pa.array(xp), "y": pa.array(yp), "gene": t.column(gene_col),
                    "x_src": t.column(x_col), "y_src": t.column(y_col)}
            for c in extras:
                if c not in cols:
                    cols[c] = t.column(c)
            yield pa.table(cols)

    return Bundle(platform="generic", image_reader=reader, image_shape=shape,
                  image_dtype=dtype, affine=affine, pixel_size_um=pixel,
                  pixel_size_source=source, transcripts_path=tx_path, batches=batches,
                  min_qv=min_qv,
                  details={"image_file": str(img_path), "channel": channel, "level": level,
                           "columns": [x_col, y_col, gene_col]},
                  closers=[tif.close])
