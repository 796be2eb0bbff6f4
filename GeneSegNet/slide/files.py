"""Inputs and outputs of whole-slide inference (``Inference/slidingwindows_gradient.py``).

Input layout: ``<root_dir>/images/<name>.{png,jpg,tif,…}`` and, optionally,
``<root_dir>/spots/<name>.{csv,csv.gz,parquet}`` (``<name>_spots``/``<name>_spot``
also pair). Images and spot tables are paired by sample name, never by sorted
position; a ``labels/`` folder is not needed. An image without a spot table runs on the
image alone (empty heatmap) with a warning.

Outputs per sample in ``save_dir`` (upstream's names, spec §8), each written atomically:

- ``label_<name>.png``: the label image (8/16-bit), or ``label_<name>.tif`` (32-bit)
  when ids exceed 65,535;
- ``label_<name>.mat``: the label image under the key ``CellMap``;
- ``label_plt_<name>.jpg``: the cells in colour over the image, at most
  ``PLOT_MAX_SIDE`` pixels on a side;
- ``HeatMap/<name>_gaumap.tif``: the image-wide 8-bit heatmap as a tiled, compressed
  TIFF (window-local mode: one ``HeatMap/<name>/<k>_gaumap.png`` per window, as upstream
  but lossless);
- with mapping: ``mapping/<name>.csv`` (cell_id, spotX, spotY, gene) and
  ``mapping/<name>_cell_by_gene.csv``.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from GeneSegNet.errors import InputError
from GeneSegNet.figures import mask_overlay
from GeneSegNet.io import (
    IMAGE_EXTENSIONS,
    SPOT_EXTENSIONS,
    index_by_sample,
    list_files,
    read_image,
    read_spots,
    spot_pixels,
    write_image,
    write_label,
)
from GeneSegNet.mapping import SPOT_SUFFIXES

logger = logging.getLogger(__name__)

PLOT_MAX_SIDE = 2048
MAT_MAX_BYTES = 2**31 - 1  # MATLAB v5 files hold at most 2 GiB per variable
HEATMAP_TILE = 256


@dataclass(frozen=True)
class SlideSample:
    """One image and its spot table (None when it has none)."""

    name: str
    image: Path
    spots: Path | None


@dataclass
class SlideInputs:
    """A loaded sample.

    image : [H, W] grey or [H, W, 3] BGR, stored dtype.
    rows, cols : int32 pixel (y, x) of the spots inside the image.
    table : the spot table (x, y, gene; pixels), kept for mapping, else None.
    n_spots, n_outside, n_invalid : all rows; rows outside the image; rows with
        non-numeric or non-finite coordinates.
    codes : int gene codes of the spots inside the image (``encode`` of
        :func:`load_slide`), or None.
    """

    sample: SlideSample
    image: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    table: pd.DataFrame | None
    n_spots: int = 0
    n_outside: int = 0
    n_invalid: int = 0
    codes: np.ndarray | None = None


def discover_slides(root_dir: str | Path) -> list[SlideSample]:
    """Samples of ``root_dir`` (images/ and optional spots/), sorted by name.

    Raises InputError when images/ is missing or empty; warns about images without a
    spot table and spot tables without an image.
    """
    root = Path(root_dir)
    images = index_by_sample(list_files(root / "images", IMAGE_EXTENSIONS))
    if not images:
        raise InputError("no images found (expected .png, .jpg or .tif files)", root / "images")
    spot_dir = root / "spots"
    spots: dict[str, Path] = {}
    if spot_dir.is_dir():
        spots = index_by_sample(list_files(spot_dir, SPOT_EXTENSIONS), (), SPOT_SUFFIXES)
    else:
        logger.warning("%s: no spots folder; images run without spot heatmaps", spot_dir)
    orphans = sorted(set(spots) - set(images))
    if orphans:
        logger.warning(
            "spot tables without an image (ignored): %s",
            ", ".join(str(spots[n]) for n in orphans[:10]),
        )
    samples = [SlideSample(n, images[n], spots.get(n)) for n in sorted(images)]
    for sample in samples:
        if sample.spots is None and spot_dir.is_dir():
            logger.warning(
                "%s: no spot table in %s; it runs on the image alone (empty "
                "heatmap) and gets no transcript mapping",
                sample.image,
                spot_dir,
            )
    return samples


def check_output_dir(path: str | Path) -> Path:
    """Create ``path`` if needed and make sure a file can be written in it.

    Raises InputError naming the folder otherwise.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError("output folder path exists and is not a folder", path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise InputError(f"output folder cannot be written ({exc.strerror or exc})", path) from None
    return path


def table_pixels(table: pd.DataFrame, shape: tuple[int, int], encode=None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """(rows, cols) int32 pixels of the spots of ``table`` (x, y in px, x = column) inside
    an image of ``shape``, the (N,) bool inside mask, and their gene codes (``encode`` of
    the gene column; None without an encoder)."""
    rows, cols, inside = spot_pixels(table["x"].to_numpy(np.float64),
                                     table["y"].to_numpy(np.float64), shape)
    codes = None if encode is None else np.asarray(encode(table["gene"].to_numpy()))[inside]
    return rows.astype(np.int32), cols.astype(np.int32), inside, codes


def load_slide(
    sample: SlideSample, *, image_mode: str, spot_scale: float = 1.0, keep_table: bool = False,
    encode=None,
) -> SlideInputs:
    """Read a sample's image and spots; count and report spots outside the image.

    ``encode``: optional gene name -> int code function (``GeneEmbedding.encode``); the
    codes of the spots inside the image are then kept.

    Spots outside the image (x < 0, y < 0, x ≥ W or y ≥ H) or with invalid
    coordinates are left out of the heatmap, with a warning naming the file; a table
    with no spot inside the image raises InputError (usually a wrong ``spot_scale``).
    """
    image = read_image(sample.image, image_mode)
    height, width = image.shape[:2]
    empty = np.zeros(0, np.int32)
    if sample.spots is None:
        return SlideInputs(sample, image, empty, empty, None)
    table = read_spots(sample.spots, scale=spot_scale, strict=False)
    finite = np.isfinite(table["x"].to_numpy(np.float64)) & np.isfinite(
        table["y"].to_numpy(np.float64))
    rows, cols, inside, codes = table_pixels(table, (height, width), encode)
    n, n_in = len(table), int(inside.sum())
    n_invalid, n_outside = int((~finite).sum()), int((finite & ~inside).sum())
    if n and not n_in:
        raise InputError(
            f"none of its {n} spots lies inside the {width}×{height} image {sample.image.name} "
            f"(spot_scale {spot_scale} px per unit; coordinates must be pixels of the image)",
            sample.spots,
        )
    if n_outside or n_invalid:
        logger.warning(
            "%s: %d of %d spots lie outside the %d×%d image %s and %d have invalid "
            "coordinates; they are left out of the heatmap (and mapped as background)",
            sample.spots,
            n_outside,
            n,
            width,
            height,
            sample.image.name,
            n_invalid,
        )
    return SlideInputs(
        sample, image, rows, cols, table if keep_table else None, n, n_outside, n_invalid,
        codes,
    )


def label_figure(
    labels: np.ndarray, image: np.ndarray, max_side: int = PLOT_MAX_SIDE
) -> np.ndarray:
    """Cells in colour over the image, subsampled to at most ``max_side`` px, uint8 BGR."""
    step = max(1, math.ceil(max(labels.shape) / max_side))
    return mask_overlay(image[::step, ::step], labels[::step, ::step])


def write_label_outputs(
    save_dir: Path, name: str, labels: np.ndarray, image: np.ndarray
) -> list[Path]:
    """Write ``label_<name>.png|tif``, ``label_<name>.mat`` and ``label_plt_<name>.jpg``.

    A ``label_<name>`` file of the other format left by an earlier run is removed, so
    the folder holds one label image per sample.
    """
    written = [write_label(save_dir / f"label_{name}.png", labels)]
    stale = written[0].with_suffix(".tif" if written[0].suffix == ".png" else ".png")
    if stale.exists():
        logger.info("removing %s from an earlier run (now %s)", stale, written[0].name)
        stale.unlink()
    nbytes = labels.size * (2 if labels.max(initial=0) <= np.iinfo(np.uint16).max else 4)
    if nbytes > MAT_MAX_BYTES:
        logger.warning(
            "label image of %.1f GB is too large for a .mat file; %s not written",
            nbytes / 1e9,
            save_dir / f"label_{name}.mat",
        )
    else:
        written.append(write_label(save_dir / f"label_{name}.mat", labels))
    written.append(write_image(save_dir / f"label_plt_{name}.jpg", label_figure(labels, image)))
    return written


def window_heatmap_writer(folder: Path):
    """Sink for window-local heatmaps: writes ``<folder>/<k>_gaumap.png``."""
    folder.mkdir(parents=True, exist_ok=True)

    def sink(k: int, heatmap: np.ndarray) -> None:
        write_image(folder / f"{k}_gaumap.png", heatmap)

    return sink
