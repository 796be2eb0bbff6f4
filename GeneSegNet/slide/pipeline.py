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
from GeneSegNet.errors import InputError
from GeneSegNet.io import atomic_path
from GeneSegNet.io.layout import channels_for
from GeneSegNet.mapping import write_mapping
from GeneSegNet.slide.blockwise import reconstruct_blockwise, upstream_label_opening
from GeneSegNet.slide.files import (
    SlideSample,
    load_slide,
    window_heatmap_writer,
    write_label_outputs,
    write_tiled_tiff,
)
from GeneSegNet.slide.plan import SlideConfig, plan_windows
from GeneSegNet.slide.windows import SpotIndex, heatmap_tiles, predict_slide

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
    """

    slide: SlideConfig = field(default_factory=SlideConfig)
    block_size: int = 2048
    halo: int | None = None
    spot_scale: float = 1.0
    mapping: bool = False
    out_of_bounds: str = "background"
    write_heatmap: bool = True
    upstream_opening: bool = False


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
) -> np.ndarray:
    """Label image [H, W] int32 of one whole image (window pass, then block-wise masks).

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
    )
    ev = cfg.slide.evaluation
    labels = reconstruct_blockwise(
        result.flows,
        result.cellprob,
        block_size=cfg.block_size,
        halo=block_halo(cfg, result.plan.diameter),
        niter=ev.niter,
        confidence_threshold=ev.confidence_threshold,
        flow_threshold=ev.flow_threshold,
        min_size=ev.min_size,
        y_only_movers=ev.y_only_movers,
        device=device,
        progress=progress,
    )
    del result
    if cfg.upstream_opening:
        upstream_label_opening(labels)
    return labels


def _write_config(path: Path, cfg: SlideRunConfig, extra: dict[str, Any]) -> None:
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
    try:
        image_mode = channels_for(net.config.nchan)
    except ValueError as exc:
        raise InputError(f"unsupported model: {exc}") from None
    diams = {"diam_mean": meta["diam_mean"], "diam_labels": meta["diam_labels"]}
    load = {"image_mode": image_mode, "spot_scale": cfg.spot_scale, "keep_table": cfg.mapping}
    first = None
    for sample in reversed(samples):  # check every input; keep the first sample loaded
        first = load_slide(sample, **load)
    try:
        plan = plan_windows(
            first.image.shape[:2], cfg.slide, **diams, size_multiple=net.config.size_multiple
        )
    except ValueError as exc:
        raise InputError(f"bad window settings: {exc}") from None
    if config_path is not None:
        _write_config(
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
    for i, sample in enumerate(samples):
        inputs = first if i == 0 else load_slide(sample, **load)
        first = None
        start = time.perf_counter()
        shape = inputs.image.shape[:2]
        index = SpotIndex(inputs.rows, inputs.cols, shape)
        sink = None
        if cfg.write_heatmap and cfg.slide.window_local:
            sink = window_heatmap_writer(save_dir / "HeatMap" / sample.name)
        elif cfg.write_heatmap:
            write_tiled_tiff(
                save_dir / "HeatMap" / f"{sample.name}_gaumap.tif",
                heatmap_tiles(index, cfg.slide.sigma),
                shape,
            )
        labels = segment_slide(
            net,
            inputs.image,
            index,
            cfg,
            **diams,
            device=device,
            progress=progress,
            heatmap_sink=sink,
        )
        write_label_outputs(save_dir, sample.name, labels, inputs.image)
        if cfg.mapping and inputs.table is not None:
            write_mapping(save_dir / "mapping", sample.name, labels, inputs.table,
                          cfg.out_of_bounds, source=sample.spots)
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
