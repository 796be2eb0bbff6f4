"""Whole-slide segmentation of a set of images: every check first, then per image the
window pass (:mod:`GeneSegNet.slide.windows`), the block-wise masks
(:mod:`GeneSegNet.slide.blockwise`), the outputs and, optionally, the transcript mapping
(:mod:`GeneSegNet.slide.files`)."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

import GeneSegNet
from GeneSegNet.data.model_input import ModelInput, model_input_from_meta
from GeneSegNet.data.resample import (
    require_pixel_sizes,
    resample_image,
    resample_labels,
    spot_pixels_at,
    working_shape,
)
from GeneSegNet.data.transcripts import slide_density_scale
from GeneSegNet.dynamics.smoothing import smooth_outlines
from GeneSegNet.errors import InputError
from GeneSegNet.export.sample import SampleOutput, check_export_settings, write_sample_outputs
from GeneSegNet.io import atomic_path
from GeneSegNet.io.images import write_tiled_tiff
from GeneSegNet.io.layout import channels_for
from GeneSegNet.io.metadata import metadata_path, resolve_pixel_size
from GeneSegNet.slide.blockwise import reconstruct_blockwise, upstream_label_opening
from GeneSegNet.slide.files import (
    HEATMAP_TILE,
    SlideInputs,
    SlideSample,
    load_slide,
    window_heatmap_writer,
    write_label_outputs,
)
from GeneSegNet.slide.plan import SlideConfig, plan_windows
from GeneSegNet.slide.windows import SlideTranscripts, SpotIndex, heatmap_tiles, predict_slide

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideRunConfig:
    """Settings of a whole-slide run.

    slide : window pass settings.
    block_size : core block edge of the mask reconstruction (pixels).
    halo : context around each block (pixels); None: twice the cell diameter.
    spot_scale : pixels per spot-coordinate unit.
    mapping : write the transcript mapping and cell-by-gene counts.
    out_of_bounds : "background" or "drop", for spots outside the image (mapping).
    write_heatmap : write the heatmap (one tiled TIFF, or per window when window-local).
    upstream_opening : upstream's grey-level 5×5 opening of the label image.
    transcript_refine : with a density model, spots and a pixel size, trim each cell to
        and grow it into the territory its transcripts support
        (:func:`refine_with_transcripts`), as the relabelling between training rounds does.
    smooth_um : width (µm) of the outline smoothing applied last
        (:func:`GeneSegNet.dynamics.smoothing.smooth_outlines`; 0: none). It needs a pixel
        size; out-of-core slides are written unsmoothed (as they are unrefined).
    pixel_size_um : µm/px of every slide (``--pixel_size``); must agree with a slide's
        metadata file ``<metadata_dir>/metadata/<sample>.json`` when both exist.
    metadata_dir : the folder holding ``metadata/`` (the inference ``--root_dir``).
    outputs : result formats written with ``mapping`` (:data:`GeneSegNet.export.OUTPUT_KINDS`;
        default upstream's csv), into ``save_dir/mapping`` (:mod:`GeneSegNet.export.sample`).
    working_pixel_size_um : µm/px to segment at (``--working_pixel_size``; None: each
        slide's own): image and spots are resampled to it (:mod:`GeneSegNet.data.resample`)
        for the network and the masks; the labels go back to the slide's grid before the
        transcript refinement and the outputs.
    """

    slide: SlideConfig = field(default_factory=SlideConfig)
    block_size: int = 2048
    halo: int | None = None
    spot_scale: float = 1.0
    mapping: bool = False
    out_of_bounds: str = "background"
    write_heatmap: bool = True
    upstream_opening: bool = False
    transcript_refine: bool = True
    smooth_um: float = 1.0
    pixel_size_um: float | None = None
    metadata_dir: Path | None = None
    outputs: tuple[str, ...] = ("csv",)
    working_pixel_size_um: float | None = None


def block_halo(cfg: SlideRunConfig, diameter: float) -> int:
    """The block halo in pixels: ``cfg.halo``, or twice the cell diameter."""
    return cfg.halo if cfg.halo is not None else int(math.ceil(2.0 * diameter))


def segment_slide(
    net: nn.Module,
    image: np.ndarray,
    index: SpotIndex,
    cfg: SlideRunConfig,
    *,
    diam_mean: float,
    diam_labels: float,
    device,
    progress: bool = False,
    heatmap_sink=None,
    transcripts: SlideTranscripts | None = None,
    cellprob_sink=None,
) -> np.ndarray:
    """Label image [H, W] int32 of one whole image (window pass, then block-wise masks).

    ``cellprob_sink``, if given, is called with the [H, W] cell-probability logits before
    the canvases are released (e.g. to keep them for the transcript confidence columns).

    Only the blended canvases (:func:`GeneSegNet.slide.windows.predict_slide`) and the label
    image grow with the image; the canvases are released before returning.
    """
    result = predict_slide(
        net,
        image,
        index,
        cfg.slide,
        diam_mean=diam_mean,
        diam_labels=diam_labels,
        device=device,
        progress=progress,
        heatmap_sink=heatmap_sink,
        transcripts=transcripts,
    )
    ev = cfg.slide.evaluation
    labels = reconstruct_blockwise(
        result.flows,
        result.cellprob,
        block_size=cfg.block_size,
        halo=block_halo(cfg, result.plan.diameter),
        **ev.mask_kwargs(),
        device=device,
        progress=progress,
    )
    if cellprob_sink is not None:
        cellprob_sink(result.cellprob)
    del result
    if cfg.upstream_opening:
        upstream_label_opening(labels)
    return labels


def slide_pixel_size(name: str, cfg: SlideRunConfig, model_input: ModelInput) -> float | None:
    """The pixel size (µm/px) of slide ``name``: its metadata file and/or ``--pixel_size``
    (they must agree); InputError naming both when the model's input needs one and
    neither gives it."""
    pixel = resolve_pixel_size(cfg.metadata_dir, name, cfg.pixel_size_um, "--pixel_size")
    if pixel is None and model_input.transcripts.needs_slide_scale:
        where = (metadata_path(cfg.metadata_dir, name) if cfg.metadata_dir is not None
                 else f"metadata/{name}.json")
        raise InputError(f"the model's {model_input.transcripts.mode} transcript input needs "
                         f"the pixel size of {name!r} in µm/px: give --pixel_size or write "
                         f"it to {where}", where)
    return pixel


def slide_transcripts(rows: np.ndarray, cols: np.ndarray, model_input: ModelInput,
                      pixel_size_um: float | None) -> SlideTranscripts | None:
    """How a slide's transcript channels are rendered (None in heatmap mode): the slide
    scale is computed once, from every spot inside the image (as preprocessing does)."""
    tcfg = model_input.transcripts
    if not tcfg.needs_slide_scale:
        return None
    scale = slide_density_scale(rows, cols, pixel_size_um=pixel_size_um,
                                sigma_um=tcfg.sigma_um)
    return SlideTranscripts(tcfg, model_input.embedding, pixel_size_um, scale)


def refine_with_transcripts(labels: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                            codes: np.ndarray | None, pixel_size_um: float,
                            image: np.ndarray | None = None) -> np.ndarray:
    """The network's cells (int [H, W]) trimmed to and grown into their transcripts'
    territory where the transcripts are dense enough to place borders
    (:func:`GeneSegNet.growth.grow.regrow_whole_cells`; transcript-dense regions without a
    cell become cells); where they are sparse, redrawn from their nuclei in ``image``
    ((H, W) or (H, W, C) on the same grid; None: unchanged). Spots: int pixel (rows, cols)
    inside the image; ``codes``: the model's gene codes (-1 unknown; None: one gene).
    Returns int32 [H, W], cells 1..K."""
    from GeneSegNet.dynamics.masks import renumber
    from GeneSegNet.growth.grow import regrow_whole_cells

    genes = np.zeros(len(rows), np.int64) if codes is None else np.asarray(codes) + 1
    grown = regrow_whole_cells(labels, np.asarray(rows) + 0.5, np.asarray(cols) + 0.5, genes,
                               pixel_size_um=pixel_size_um, image=image)
    out = renumber(grown, order="first")
    logger.info("transcript refinement: cells cover %.1f %% of the image (network %.1f %%); "
                "%d cells", 100 * np.count_nonzero(out) / out.size,
                100 * np.count_nonzero(labels) / labels.size, int(out.max()))
    return out


def smooth_slide_outlines(labels: np.ndarray, smooth_um: float, pixel_size_um: float | None,
                          name: str) -> np.ndarray:
    """A slide's cells (int [H, W]) with outlines smoothed at ``smooth_um`` µm
    (:func:`GeneSegNet.dynamics.smoothing.smooth_outlines`); unchanged when ``smooth_um``
    is 0 or the pixel size is unknown (logged)."""
    if smooth_um <= 0:
        return labels
    if pixel_size_um is None:
        logger.info("%s: outlines not smoothed (--smooth_um needs a pixel size: --pixel_size "
                    "or a metadata file)", name)
        return labels
    return smooth_outlines(labels, smooth_um / pixel_size_um)


@dataclass
class WorkingSlide:
    """A slide's image and spot pixels (rows, cols int32) at the working resolution, its
    pixel size there (µm/px; None if unknown) and its input grid (rows, cols)."""

    image: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    pixel_size_um: float | None
    input_shape: tuple[int, int]

    def to_input(self, per_pixel: np.ndarray) -> np.ndarray:
        """A per-pixel array (labels, probabilities) of the working grid on the input grid."""
        return resample_labels(per_pixel, self.input_shape)


def working_slide(inputs: SlideInputs, pixel_size_um: float | None,
                  working_pixel_size_um: float | None) -> WorkingSlide:
    """``inputs`` at ``working_pixel_size_um`` (unchanged when None or equal). A spot is
    placed at its input pixel's centre, so its working pixel is exact to half an input
    pixel."""
    shape = inputs.image.shape[:2]
    if working_pixel_size_um is None or pixel_size_um == working_pixel_size_um:
        return WorkingSlide(inputs.image, inputs.rows, inputs.cols, pixel_size_um, shape)
    require_pixel_sizes({inputs.sample.name: pixel_size_um}, None)
    new_shape = working_shape(shape, pixel_size_um, working_pixel_size_um)
    rows, cols = spot_pixels_at(inputs.rows, inputs.cols, shape, new_shape)
    logger.info("%s: %d×%d px at %.4g µm/px -> %d×%d px at %.4g µm/px", inputs.sample.name,
                shape[1], shape[0], pixel_size_um, new_shape[1], new_shape[0],
                working_pixel_size_um)
    return WorkingSlide(resample_image(inputs.image, new_shape), rows, cols,
                        working_pixel_size_um, shape)


def write_run_config(path: Path, cfg: SlideRunConfig, extra: dict[str, Any]) -> None:
    """The run's settings as JSON (``<save_dir>/slidingwindows_gradient_config.json``),
    atomically; its presence marks the folder as this script's (reruns, resumes)."""
    record = {"package_version": GeneSegNet.__version__, **asdict(cfg), **extra}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")


def run_slides(
    net: nn.Module,
    meta: dict[str, Any],
    samples: list[SlideSample],
    save_dir: Path,
    cfg: SlideRunConfig,
    *,
    device,
    config_path: Path | None = None,
    progress: bool = True,
) -> list[tuple[str, int]]:
    """Segment every sample and write its outputs to ``save_dir``.

    Every input is read and checked (model channels, images, spot tables, spots inside
    the images, window settings) before the first image is segmented; problems raise
    InputError naming the file. Returns (sample name, number of cells) per sample.
    """
    model_input = model_input_from_meta(meta)
    ev = cfg.slide.evaluation
    if (ev.transcript_mode, ev.n_transcripts) != (model_input.transcripts.mode,
                                                  model_input.n_transcripts):
        raise InputError(f"settings take {ev.n_transcripts} {ev.transcript_mode} transcript "
                         f"channel(s) but the model {model_input.n_transcripts} "
                         f"{model_input.transcripts.mode} channel(s)")
    try:
        image_mode = channels_for(net.config.nchan - model_input.n_transcripts + 1)
    except ValueError as exc:
        raise InputError(f"unsupported model: {exc}") from None
    diams = {"diam_mean": meta["diam_mean"], "diam_labels": meta["diam_labels"]}
    encode = None if model_input.embedding is None else model_input.embedding.encode
    load = {"image_mode": image_mode, "spot_scale": cfg.spot_scale, "keep_table": cfg.mapping,
            "encode": encode}
    pixel_sizes = {s.name: slide_pixel_size(s.name, cfg, model_input) for s in samples}
    if cfg.working_pixel_size_um is not None:
        require_pixel_sizes(pixel_sizes, cfg.metadata_dir)
    if cfg.mapping:
        check_export_settings(cfg.outputs, pixel_sizes)
    first = None
    for sample in reversed(samples):  # check every input; keep the first sample loaded
        first = load_slide(sample, **load)
    first_shape = first.image.shape[:2]
    if cfg.working_pixel_size_um is not None:
        first_shape = working_shape(first_shape, pixel_sizes[samples[0].name],
                                    cfg.working_pixel_size_um)
    try:
        plan = plan_windows(
            first_shape, cfg.slide, **diams, size_multiple=net.config.size_multiple
        )
    except ValueError as exc:
        raise InputError(f"bad window settings: {exc}") from None
    if config_path is not None:
        write_run_config(
            config_path,
            cfg,
            {
                "device": str(device),
                "block_halo": block_halo(cfg, plan.diameter),
                **diams,
                "samples": [s.name for s in samples],
            },
        )
    done = []
    kept: list[np.ndarray] = []  # the current slide's cell-probability logits (mapping)
    for i, sample in enumerate(samples):
        inputs = first if i == 0 else load_slide(sample, **load)
        first = None
        start = time.perf_counter()
        shape = inputs.image.shape[:2]
        work = working_slide(inputs, pixel_sizes[sample.name], cfg.working_pixel_size_um)
        index = SpotIndex(work.rows, work.cols, work.image.shape[:2], codes=inputs.codes)
        transcripts = slide_transcripts(work.rows, work.cols, model_input, work.pixel_size_um)
        sink = None
        if cfg.write_heatmap and cfg.slide.window_local:
            sink = window_heatmap_writer(save_dir / "HeatMap" / sample.name)
        elif cfg.write_heatmap:
            write_tiled_tiff(
                save_dir / "HeatMap" / f"{sample.name}_gaumap.tif",
                heatmap_tiles(index, cfg.slide.sigma, tile=HEATMAP_TILE),
                work.image.shape[:2], np.uint8, HEATMAP_TILE,
            )
        labels = segment_slide(
            net,
            work.image,
            index,
            cfg,
            **diams,
            device=device,
            progress=progress,
            heatmap_sink=sink,
            transcripts=transcripts,
            cellprob_sink=(lambda a, to_input=work.to_input: kept.append(np.array(to_input(a))))
            if cfg.mapping and inputs.table is not None else None,
        )
        labels = work.to_input(labels)
        del work
        if cfg.transcript_refine and transcripts is not None and len(inputs.rows):
            # on the input grid: borders where the transcripts put them, to the input pixel
            labels = refine_with_transcripts(labels, inputs.rows, inputs.cols, inputs.codes,
                                             pixel_sizes[sample.name], image=inputs.image)
        labels = smooth_slide_outlines(labels, cfg.smooth_um, pixel_sizes[sample.name],
                                       sample.name)
        write_label_outputs(save_dir, sample.name, labels, inputs.image)
        if cfg.mapping and inputs.table is not None:
            export = SampleOutput(labels, inputs.image, pixel_sizes[sample.name],
                                  kept.pop() if kept else None,
                                  settings={"sample": sample.name, **asdict(cfg)})
            write_sample_outputs(export, inputs.table, save_dir / "mapping", sample.name,
                                 cfg.outputs, out_of_bounds=cfg.out_of_bounds)
            del export
        seconds = time.perf_counter() - start
        n_cells = int(labels.max(initial=0))
        logger.info(
            "%s: %d cells in %.1f s (%.3g megapixels/s) -> %s",
            sample.name,
            n_cells,
            seconds,
            shape[0] * shape[1] / 1e6 / seconds,
            save_dir,
        )
        done.append((sample.name, n_cells))
    return done
