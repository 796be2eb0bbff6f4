"""Out-of-core runs of ``Inference/slidingwindows_gradient.py`` (``--out_of_core``).

``--out_of_core on`` runs every slide through :mod:`GeneSegNet.slide.outofcore`;
``auto`` (default) does so when any slide exceeds ``--out_of_core_pixels`` (100 MP by
default, where the in-memory pass needs about 1.8 GB). Per sample the run store
``<save_dir>/label_<name>.zarr`` holds the blended field and the label image (zarr array
``labels``, int32, 1024² chunks), and the heatmap TIFF is written as usual. Slides up to
``in_memory_outputs`` pixels also get the usual files (label png/tif, mat, jpg, mapping);
larger ones get ``label_<name>.tif`` (tiled BigTIFF, int32, streamed from the store) and
the transcript mapping read from the store chunk by chunk (:func:`map_spots_out_of_core`):
``mapping/<name>.csv`` with upstream's columns and ``cell_probability`` (the rows of the
in-memory run), and ``mapping/<name>_cell_by_gene.csv``. Their spot table is never read
whole: it is streamed into ``<store>/spots`` (:func:`GeneSegNet.io.spot_stream.spill_spots`),
indexed on disk (:class:`GeneSegNet.slide.disk_spots.DiskSpotIndex`) and mapped in
buckets (:mod:`GeneSegNet.slide.spot_mapping`), so memory does not grow with the number
of transcripts. The outputs that need the whole label image (png/mat/jpg, boundary
distance and nearest-cell columns, polygons, h5ad and the other ``--outputs``) are named
in a warning and skipped.

With ``--dask_workers N`` (or ``--dask_scheduler``/``--slurm_jobs``) the window batches,
field chunks and mask blocks run as dask tasks (:mod:`GeneSegNet.slide.distributed`).
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from GeneSegNet.data.model_input import model_input_from_meta
from GeneSegNet.data.transcripts import slide_density_scale_stream
from GeneSegNet.errors import InputError
from GeneSegNet.export.sample import SampleOutput, check_export_settings, write_sample_outputs
from GeneSegNet.io import read_spots, spot_pixels
from GeneSegNet.io.images import write_tiled_tiff
from GeneSegNet.io.layout import channels_for
from GeneSegNet.io.spot_stream import FrameSpots, SpotSpill, spill_spots
from GeneSegNet.slide.disk_spots import DiskSpotIndex, inside_pixels
from GeneSegNet.slide.files import (
    HEATMAP_TILE,
    SlideSample,
    table_pixels,
    write_label_outputs,
)
from GeneSegNet.slide.outofcore import (
    MaskSettings,
    default_chunk,
    label_tiles,
    segment_slide_out_of_core,
    store_path,
)
from GeneSegNet.slide.pipeline import (
    SlideRunConfig,
    block_halo,
    slide_pixel_size,
    slide_transcripts,
    write_run_config,
)
from GeneSegNet.slide.plan import plan_windows
from GeneSegNet.slide.spot_mapping import Plane, write_mapping_streamed
from GeneSegNet.slide.store import LazyImage, SlideStore, weights_digest
from GeneSegNet.slide.windows import SlideTranscripts, SpotIndex, heatmap_tiles

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutOfCoreConfig:
    """mode : "auto", "on" or "off"; limit_pixels : the auto threshold (pixels);
    in_memory_outputs : largest slide (pixels) that still gets png/mat/jpg and mapping;
    chunk : store chunk edge (px), None: :func:`default_chunk`."""

    mode: str = "auto"
    limit_pixels: float = 1e8
    in_memory_outputs: float = 1e8
    chunk: int | None = None


def image_channels(image_mode: str) -> int:
    return 1 if image_mode == "gray" else 3


def use_out_of_core(samples: list[SlideSample], ooc: OutOfCoreConfig, image_mode: str) -> bool:
    """The ``--out_of_core`` decision (auto: any slide above ``limit_pixels``)."""
    if ooc.mode in ("on", "off"):
        return ooc.mode == "on"
    for sample in samples:
        if sample.image.suffix.lower() not in (".tif", ".tiff", ".zarr"):
            continue  # png/jpg hold at most 2^31 px and are read whole anyway
        shape = LazyImage(sample.image, image_channels(image_mode)).shape
        if shape[0] * shape[1] > ooc.limit_pixels:
            logger.info("%s: %d x %d px > %.3g px: out-of-core run", sample.image, shape[0],
                        shape[1], ooc.limit_pixels)
            return True
    return False


def load_spots(sample: SlideSample, shape: tuple[int, int], spot_scale: float, encode=None):
    """(rows, cols, codes, table) of the spots inside an image of ``shape`` (as
    :func:`GeneSegNet.slide.files.load_slide`, without reading the image)."""
    empty = np.zeros(0, np.int32)
    if sample.spots is None:
        return empty, empty, None, None
    table = read_spots(sample.spots, scale=spot_scale, strict=False)
    rows, cols, inside, codes = table_pixels(table, shape, encode)
    _check_inside(sample, shape, spot_scale, len(table), int(inside.sum()))
    return rows, cols, codes, table


def _check_inside(sample: SlideSample, shape: tuple[int, int], spot_scale: float, n: int,
                  n_inside: int) -> None:
    """InputError if none of ``n`` spots is inside the image; a warning if some are not."""
    if n and not n_inside:
        raise InputError(f"none of its {n} spots lies inside the {shape[1]}×{shape[0]} "
                         f"image {sample.image.name} (spot_scale {spot_scale})", sample.spots)
    if n_inside < n:
        logger.warning("%s: %d of %d spots lie outside the image or are invalid; they are "
                       "left out of the heatmap", sample.spots, n - n_inside, n)


def spots_on_disk(sample: SlideSample, store: SlideStore, spot_scale: float, model_input,
                  pixel_size: float | None, *, progress: bool = False
                  ) -> tuple[SpotIndex, SlideTranscripts | None, SpotSpill | None]:
    """(index, transcripts, spill) of a slide whose spot table is never read whole: the
    table spilled to ``<store>/spots``, a :class:`DiskSpotIndex` in
    ``<store>/spot_index.rec`` and the density scale from the spill (same values as
    :func:`load_spots` + :class:`SpotIndex` + ``slide_transcripts``)."""
    shape = store.shape
    if sample.spots is None:
        empty = np.zeros(0, np.int32)
        return (SpotIndex(empty, empty, shape),
                slide_transcripts(empty, empty, model_input, pixel_size), None)
    spill = spill_spots(sample.spots, store.path / "spots", spot_scale)
    table = None
    if model_input.embedding is not None:
        table = np.asarray(model_input.embedding.encode(spill.vocabulary.as_array()), np.int32)
    index = DiskSpotIndex.build(spill, shape, store.path / "spot_index.rec", code_table=table,
                                progress=progress)
    _check_inside(sample, shape, spot_scale, len(spill), len(index))
    tcfg = model_input.transcripts
    transcripts = None
    if tcfg.needs_slide_scale:
        def passes():
            return ((rows, cols) for rows, cols, _ in inside_pixels(spill, shape))

        scale = slide_density_scale_stream(passes, pixel_size_um=pixel_size,
                                           sigma_um=tcfg.sigma_um)
        transcripts = SlideTranscripts(tcfg, model_input.embedding, pixel_size, scale)
    return index, transcripts, spill


def run_slides_out_of_core(net, meta: dict[str, Any], samples: list[SlideSample],
                           save_dir: Path, cfg: SlideRunConfig, ooc: OutOfCoreConfig, *,
                           device, dask=None, progress: bool = True,
                           config_path: Path | None = None) -> list[tuple[str, int]]:
    """Segment every sample out of core (module docstring); returns (name, cells) pairs.

    ``dask``: a :class:`GeneSegNet.slide.distributed.DaskSettings`, or None (in process).
    ``config_path``: where the run's settings are written first (as the in-memory run).
    """
    if cfg.slide.window_local or cfg.upstream_opening:
        raise InputError("--out_of_core runs in global mode without --upstream_opening")
    model_input = model_input_from_meta(meta)
    image_mode = channels_for(net.config.nchan - model_input.n_transcripts + 1)
    diams = {"diam_mean": meta["diam_mean"], "diam_labels": meta["diam_labels"]}
    encode = None if model_input.embedding is None else model_input.embedding.encode
    pixel_sizes = {s.name: slide_pixel_size(s.name, cfg, model_input) for s in samples}
    refine = cfg.transcript_refine and model_input.transcripts.needs_slide_scale
    smooth = cfg.smooth_um > 0 and any(size is not None for size in pixel_sizes.values())
    skipped = [what for what, on in (("the transcript refinement", refine),
                                     ("the outline smoothing", smooth)) if on]
    if skipped:
        logger.warning("out of core: %s not run (they need the whole label image); the "
                       "cells are the network's", " and ".join(skipped))
    if cfg.mapping:
        check_export_settings(cfg.outputs, pixel_sizes)
    images = {s.name: LazyImage(s.image, image_channels(image_mode)) for s in samples}
    digest = weights_digest(net)
    if config_path is not None:
        write_run_config(config_path, cfg, {
            "device": str(device), **diams, "samples": [s.name for s in samples],
            "out_of_core": asdict(ooc),
            "dask": None if dask is None else asdict(dask)})
    context = nullcontext(None)
    if dask is not None:
        from GeneSegNet.slide.distributed import dask_client

        context = dask_client(dask)
    done = []
    with context as client:
        for sample in samples:
            start = time.perf_counter()
            image = images[sample.name]
            shape = image.shape[:2]
            big = shape[0] * shape[1] > ooc.in_memory_outputs
            if not big:
                rows, cols, codes, table = load_spots(sample, shape, cfg.spot_scale, encode)
                index = SpotIndex(rows, cols, shape, codes=codes)
                transcripts = slide_transcripts(rows, cols, model_input,
                                                pixel_sizes[sample.name])
            try:
                plan = plan_windows(shape, cfg.slide, **diams,
                                    size_multiple=net.config.size_multiple)
            except ValueError as exc:
                raise InputError(f"bad window settings: {exc}") from None
            ev = cfg.slide.evaluation
            ms = MaskSettings(cfg.block_size, block_halo(cfg, plan.diameter),
                              **ev.mask_kwargs())
            settings = {"run": asdict(cfg), "masks": asdict(ms), "image": image.identity(),
                        "spots": None if sample.spots is None else str(sample.spots),
                        "weights": digest, "diams": diams, "device": str(device)}
            store = SlideStore(store_path(save_dir, sample.name), shape, settings,
                               cfg.slide.canvas_dtype, chunk=ooc.chunk or default_chunk(
                                   cfg.slide.window))
            if big:
                index, transcripts, table = spots_on_disk(
                    sample, store, cfg.spot_scale, model_input, pixel_sizes[sample.name],
                    progress=progress)
            if cfg.write_heatmap:
                write_tiled_tiff(save_dir / "HeatMap" / f"{sample.name}_gaumap.tif",
                                 heatmap_tiles(index, cfg.slide.sigma, tile=HEATMAP_TILE),
                                 shape, np.uint8, HEATMAP_TILE)
            executor = None
            if client is not None:
                from GeneSegNet.slide.distributed import DaskExecutor

                executor = DaskExecutor(client, dask, str(device)).run
            n_cells = segment_slide_out_of_core(
                net, image, index, store, plan, cfg.slide, ms, device=device,
                progress=progress, transcripts=transcripts, executor=executor)
            _write_outputs(save_dir, sample.name, store, image, table, cfg, ooc,
                           pixel_sizes[sample.name])
            seconds = time.perf_counter() - start
            logger.info("%s: %d cells in %.1f s (out of core) -> %s", sample.name, n_cells,
                        seconds, store.path)
            done.append((sample.name, n_cells))
    return done


def map_spots_out_of_core(store: SlideStore, spots, out_of_bounds: str = "background"):
    """The mapping table of a finished store without loading its label image: upstream's
    columns (cell_id, spotX, spotY, gene; sorted by cell id, file order within a cell) and
    ``cell_probability`` (sigmoid of the stored logit; NaN outside the image), each read
    chunk by chunk (:func:`GeneSegNet.mapping.lookup_chunked`). Equal to the in-memory
    table's rows and columns of the same names."""
    from GeneSegNet.export.confidence import PROBABILITY_COLUMN, cell_probability
    from GeneSegNet.mapping import lookup_chunked, map_transcripts

    table = map_transcripts(store.labels, spots, out_of_bounds).table
    rows, cols, inside = spot_pixels(table["spotX"].to_numpy(np.float64),
                                     table["spotY"].to_numpy(np.float64), store.shape)
    prob = np.full(len(table), np.nan, dtype=np.float32)
    prob[inside] = cell_probability(lookup_chunked(Plane(store.field, 2), rows, cols))
    return table.assign(**{PROBABILITY_COLUMN: prob})


def write_mapping_out_of_core(folder: Path, name: str, store: SlideStore, spots,
                              out_of_bounds: str = "background", **stream) -> list[Path]:
    """``<folder>/<name>.csv`` (the rows of :func:`map_spots_out_of_core`) and
    ``<folder>/<name>_cell_by_gene.csv`` (cells 1..K of the store), atomically, streamed
    (:func:`GeneSegNet.slide.spot_mapping.write_mapping_streamed`; ``stream``: its
    ``batch_rows``, ``bucket_rows``, ``progress``). ``spots``: a table (x, y, gene) or a
    :class:`GeneSegNet.io.spot_stream.SpotSpill`."""
    if isinstance(spots, pd.DataFrame):
        spots = FrameSpots(spots)
    return write_mapping_streamed(Path(folder), name, store, spots, out_of_bounds, **stream)


def _write_outputs(save_dir: Path, name: str, store: SlideStore, image: LazyImage, table,
                   cfg: SlideRunConfig, ooc: OutOfCoreConfig, pixel_size: float | None) -> None:
    height, width = store.shape
    if height * width > ooc.in_memory_outputs:
        write_tiled_tiff(save_dir / f"label_{name}.tif", label_tiles(store.labels, 1024),
                         store.shape, np.int32, 1024)
        mapped = cfg.mapping and table is not None
        if mapped:
            (save_dir / "mapping").mkdir(parents=True, exist_ok=True)
            write_mapping_out_of_core(save_dir / "mapping", name, store, table,
                                      cfg.out_of_bounds)
        logger.warning("%s: %d x %d px is above %.3g px: wrote label_%s.tif (tiled), the "
                       "zarr labels in %s%s; label png/mat/jpg%s skipped (they need the whole "
                       "label image in memory)", name, height, width, ooc.in_memory_outputs,
                       name, store.path, " and the mapping csv (cell probability, no boundary "
                       "distance or nearest cell)" if mapped else "",
                       " and the other --outputs" if mapped else "")
        return
    labels = store.labels[:]
    whole = image[:, :]
    write_label_outputs(save_dir, name, labels, whole)
    if cfg.mapping and table is not None:
        export = SampleOutput(labels, whole, pixel_size, store.field[2].astype(np.float32),
                              settings={"sample": name, **asdict(cfg)})
        write_sample_outputs(export, table, save_dir / "mapping", name, cfg.outputs,
                             out_of_bounds=cfg.out_of_bounds)
