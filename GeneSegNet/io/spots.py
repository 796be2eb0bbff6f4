"""Reading and writing transcript (spot) tables.

A spot table has one row per detected transcript with its position and gene. Positions
are x = column and y = row, in pixels of the matching image. Recognised layouts (by
header, case-insensitive):

============  ===================  ===================  ================
layout        x column             y column             gene column
============  ===================  ===================  ================
upstream      spotX                spotY                gene
plain         x                    y                    gene
Xenium        x_location           y_location           feature_name
MERSCOPE      global_x             global_y             gene
CosMx         x_global_px          y_global_px          target
============  ===================  ===================  ================

Xenium and MERSCOPE store micrometres: pass ``scale`` (pixels per unit, e.g.
1/0.2125 for Xenium's morphology image) to convert. A header that matches none of these
falls back to upstream's positional reading (column 0 = x, column 1 = y, column 2 =
gene) with a warning. Files: ``.csv``, ``.csv.gz`` and ``.parquet``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from GeneSegNet.errors import InputError
from GeneSegNet.io.atomic import atomic_path

logger = logging.getLogger(__name__)

SPOT_EXTENSIONS = (".csv", ".csv.gz", ".parquet", ".pq")
KNOWN_LAYOUTS: dict[str, tuple[str, str, str]] = {
    "upstream": ("spotx", "spoty", "gene"),
    "plain": ("x", "y", "gene"),
    "xenium": ("x_location", "y_location", "feature_name"),
    "merscope": ("global_x", "global_y", "gene"),
    "cosmx": ("x_global_px", "y_global_px", "target"),
}
UPSTREAM_HEADER = ("spotX", "spotY", "gene")


def _read_header(path: Path, is_parquet: bool) -> list[str]:
    if is_parquet:
        import pyarrow.parquet as pq

        return list(pq.read_schema(path).names)
    return list(pd.read_csv(path, nrows=0).columns)


def _choose_columns(columns: list[str], path: Path) -> tuple[str, str, str | None, str]:
    lower = {c.strip().lower(): c for c in columns}
    for layout, (x, y, gene) in KNOWN_LAYOUTS.items():
        if x in lower and y in lower:
            return lower[x], lower[y], lower.get(gene), layout
    if len(columns) >= 2:
        logger.warning(
            "%s: header %s not recognised; reading column 0 as x, column 1 as y"
            " and column 2 as gene (upstream's positional layout)",
            path,
            columns,
        )
        return columns[0], columns[1], columns[2] if len(columns) > 2 else None, "positional"
    expected = ", ".join("/".join(v[:2]) for v in KNOWN_LAYOUTS.values())
    raise InputError(
        f"spot table has no usable x/y columns (found {columns}; expected one of {expected})", path
    )


def spot_columns(path: str | Path) -> tuple[Path, bool, tuple[str, str, str | None, str]]:
    """(path, is_parquet, (x column, y column, gene column or None, layout)) of a spot
    table; InputError naming the file if it is missing, empty or has no usable header."""
    path = Path(path)
    if not path.is_file():
        raise InputError("spot file not found", path)
    if path.stat().st_size == 0:
        raise InputError("spot file is empty (expected at least a header line)", path)
    is_parquet = path.suffix.lower() in (".parquet", ".pq")
    try:
        columns = _read_header(path, is_parquet)
    except Exception as exc:  # noqa: BLE001 - pandas/pyarrow raise many types
        raise InputError(f"cannot read spot table ({exc})", path) from exc
    return path, is_parquet, _choose_columns(columns, path)


def read_spots(path: str | Path, scale: float = 1.0, *, strict: bool = True) -> pd.DataFrame:
    """Read a spot table into a DataFrame with columns ``x``, ``y`` (float64, pixels) and
    ``gene`` (str objects; a table of N spots holds N Python strings).

    Parameters
    ----------
    path : ``.csv``, ``.csv.gz`` or ``.parquet`` file.
    scale : pixels per stored coordinate unit (1 for tables already in pixels).
    strict : raise ``InputError`` on non-numeric or non-finite coordinates, naming the
        first offending row; when false such rows are kept with NaN coordinates so that
        callers can count and report them.
    """
    path, is_parquet, (x_col, y_col, gene_col, layout) = spot_columns(path)
    use = [x_col, y_col] + ([gene_col] if gene_col else [])
    try:
        if is_parquet:
            table = pd.read_parquet(path, columns=use)
        else:
            table = pd.read_csv(
                path, usecols=use, dtype=dict.fromkeys(use, str), keep_default_na=False
            )  # gene names as written ("1.50", "007"), never parsed as numbers
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot read spot table ({exc})", path) from exc
    x = pd.to_numeric(table[x_col], errors="coerce").to_numpy(np.float64)
    y = pd.to_numeric(table[y_col], errors="coerce").to_numpy(np.float64)
    bad = ~(np.isfinite(x) & np.isfinite(y))
    if strict and bad.any():
        first = int(np.flatnonzero(bad)[0])
        line = first + 2  # 1-based, after the header line
        raise InputError(
            f"{int(bad.sum())} row(s) have non-numeric or non-finite coordinates "
            f"(first at line {line}: {x_col}={table[x_col].iloc[first]!r}, "
            f"{y_col}={table[y_col].iloc[first]!r})",
            path,
        )
    gene = (
        table[gene_col].astype(str).to_numpy()
        if gene_col
        else np.full(len(table), "NA", dtype=object)
    )
    logger.debug("%s: %d spots, layout %s", path, len(table), layout)
    return pd.DataFrame({"x": x * scale, "y": y * scale, "gene": gene})


def spot_pixels(x: np.ndarray, y: np.ndarray, shape: tuple[int, int]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The project's one rule for which pixel a spot lies in.

    A spot at (x, y) px lies in pixel (row, col) = (floor(y), floor(x)); it is inside
    the image iff ``0 <= x < W`` and ``0 <= y < H`` (so -1 < x < 0 is outside, never
    column 0). Non-finite coordinates are outside. For inside spots floor equals
    upstream's ``int(float())`` truncation.

    Parameters
    ----------
    x, y : (N,) float spot coordinates in px (x = column, y = row).
    shape : (H, W) of the image in px.

    Returns
    -------
    rows, cols : (n_inside,) int64 pixel (row, col) of the inside spots, in spot order.
    inside : (N,) bool, which spots are inside the image.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    height, width = int(shape[0]), int(shape[1])
    with np.errstate(invalid="ignore"):
        inside = (x >= 0) & (y >= 0) & (x < width) & (y < height)  # False for NaN
    rows = np.floor(y[inside]).astype(np.int64)
    cols = np.floor(x[inside]).astype(np.int64)
    return rows, cols, inside


def write_spots(path: str | Path, x: np.ndarray, y: np.ndarray, gene: np.ndarray) -> Path:
    """Write an upstream-format spot CSV (``spotX,spotY,gene``) atomically."""
    path = Path(path)
    frame = pd.DataFrame({UPSTREAM_HEADER[0]: x, UPSTREAM_HEADER[1]: y, UPSTREAM_HEADER[2]: gene})
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.10g")
    return path
