"""Whole-slide network pass: overlapping windows streamed in batches (spec §8, §12 item 27).

The image is covered by square windows (row-major, the last window of each axis flush
with the edge, :func:`window_starts`). Each window's network output is added to
image-sized canvases ``[3, H, W]`` (dY, dX, cell-probability logit) and a weight canvas,
which are then divided in place: only these canvases (float16 or float32) grow with
the image; inputs and outputs exist one batch at a time.

Global mode (default; no seams):

- the spot heatmap is one image-wide map: each window renders its part of it, so spots
  outside a window but within the cut-off radius (≈ 3.035σ) still count;
- each image channel is normalised once for the whole image: its 1st/99th percentiles
  are estimated on a strided subsample of at most ``sample_pixels`` pixels (exact for
  smaller images); the heatmap is quantised to 8 bit and divided by 255, as in
  training ("fixed"), or normalised by image-wide percentiles ("percentile");
- each window is resized by the model's factor ``diam_mean / diameter`` (to a multiple
  of the network's size multiple), run in batches of ``batch_size`` windows, resized
  back and blended with the taper weights of :func:`GeneSegNet.model.tiling.taper_mask`;
  the default overlap is twice the cell diameter;
- around the image the network sees zeros (image and heatmap), 8 network pixels
  wide, as in the per-crop pass (:func:`GeneSegNet.model.predict.run_network`), so the image
  edge is handled as by ``GeneSeg_test.py``.

Window-local mode (``window_local=True``; upstream behaviour): each window's heatmap is
rendered from the spots inside that window only; each window is normalised on its own
and passed through :func:`GeneSegNet.model.predict.run_network` (resize, padding, 224-px tiles);
the stride is ``int(max(window - 16, 0.75 * window))`` (240 for 256-px windows) and
overlapping outputs are averaged uniformly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
from torch import nn
from tqdm import tqdm

from GeneSegNet.data.gene_embedding import GeneEmbedding
from GeneSegNet.data.heatmap import cutoff_radius, heatmap_to_uint8, render_heatmap
from GeneSegNet.data.normalize import apply_levels, local_levels
from GeneSegNet.data.transcripts import (
    TranscriptInput,
    kernel_radius,
    sigma_in_px,
    transcript_channels,
)
from GeneSegNet.data.transforms import resize_image
from GeneSegNet.model.predict import forward_tiles, prepare_input, run_network
from GeneSegNet.model.tiling import TiledAccumulator, taper_mask
from GeneSegNet.slide.plan import SlideConfig, WindowPlan, plan_windows

logger = logging.getLogger(__name__)


@dataclass
class SlideField:
    """Blended network outputs: ``field [3, H, W]`` = (dY, dX, logit), canvas dtype."""

    field: np.ndarray
    plan: WindowPlan

    @property
    def flows(self) -> np.ndarray:
        """[2, H, W] view (dY, dX), about 5x unit vectors."""
        return self.field[:2]

    @property
    def cellprob(self) -> np.ndarray:
        """[H, W] view of the cell-probability logits."""
        return self.field[2]


class SpotIndex:
    """Spot pixels binned once on a coarse grid, for window queries in O(spots nearby).

    Parameters
    ----------
    rows, cols : integer pixel coordinates (y, x) of spots inside the image, as given by
        :func:`GeneSegNet.io.spots.spot_pixels` (the rule the transcript mapping uses).
    shape : (H, W) of the image.
    bin_size : edge of the square bins in pixels.
    codes : optional int gene codes [N] aligned with the spots (``GeneEmbedding.encode``,
        -1 = unknown gene), returned by :meth:`query_codes`; None: all -1.
    """

    def __init__(
        self, rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int], bin_size: int = 256,
        codes: np.ndarray | None = None,
    ) -> None:
        rows = np.asarray(rows)
        cols = np.asarray(cols)
        if codes is not None and np.asarray(codes).shape != rows.shape:
            raise ValueError(f"codes of shape {np.shape(codes)} do not match {rows.shape} spots")
        height, width = int(shape[0]), int(shape[1])
        if rows.size and (
            rows.min() < 0 or cols.min() < 0 or rows.max() >= height or cols.max() >= width
        ):
            raise ValueError("SpotIndex takes spots inside the image only")
        self.shape = (height, width)
        self.bin = int(bin_size)
        self.n_bin_cols = -(-width // self.bin)
        n_bins = -(-height // self.bin) * self.n_bin_cols
        key_type = np.int32 if n_bins < 2**31 else np.int64
        key = (rows // self.bin).astype(key_type) * self.n_bin_cols + cols // self.bin
        order = np.argsort(key, kind="stable")
        key = key[order]
        self.rows = rows[order].astype(np.int32)
        self.cols = cols[order].astype(np.int32)
        self.codes = (np.full(rows.shape, -1, np.int32) if codes is None
                      else np.asarray(codes)[order].astype(np.int32))
        del order
        self.offsets = np.searchsorted(key, np.arange(n_bins + 1))

    def __len__(self) -> int:
        return int(self.rows.size)

    def _read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, cols, codes) int32 of the bin-sorted spots ``start:stop`` (the array
        source; :class:`GeneSegNet.slide.disk_spots.DiskSpotIndex` reads them from disk)."""
        return self.rows[start:stop], self.cols[start:stop], self.codes[start:stop]

    def query_codes(self, r0: int, r1: int, c0: int, c1: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, cols, gene codes) int32 of the spots with ``r0 <= row < r1`` and
        ``c0 <= col < c1``, in bin order (file order within a bin)."""
        height, width = self.shape
        lo_r, hi_r, lo_c, hi_c = max(r0, 0), min(r1, height), max(c0, 0), min(c1, width)
        if hi_r <= lo_r or hi_c <= lo_c or not len(self):
            empty = np.zeros(0, np.int32)
            return empty, empty, empty
        first_col, last_col = lo_c // self.bin, (hi_c - 1) // self.bin
        pieces = []
        for bin_row in range(lo_r // self.bin, (hi_r - 1) // self.bin + 1):
            base = bin_row * self.n_bin_cols
            start = int(self.offsets[base + first_col])
            stop = int(self.offsets[base + last_col + 1])
            if stop > start:
                pieces.append(self._read(start, stop))
        if not pieces:
            empty = np.zeros(0, np.int32)
            return empty, empty, empty
        rows, cols, codes = (np.concatenate(p) for p in zip(*pieces, strict=True))
        keep = (rows >= lo_r) & (rows < hi_r) & (cols >= lo_c) & (cols < hi_c)
        return rows[keep], cols[keep], codes[keep]

    def query(self, r0: int, r1: int, c0: int, c1: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cols) int32 of the spots with ``r0 <= row < r1`` and ``c0 <= col < c1``."""
        rows, cols, _ = self.query_codes(r0, r1, c0, c1)
        return rows, cols


@dataclass(frozen=True)
class SlideTranscripts:
    """What renders a slide's density-mode transcript channels.

    cfg : the model's transcript input; embedding : its gene embedding (gene channels);
    pixel_size_um : the slide's µm/px; slide_scale : transcripts per µm², computed once
    from the slide's whole spot table (:func:`GeneSegNet.data.transcripts.slide_density_scale`).
    """

    cfg: TranscriptInput
    embedding: GeneEmbedding | None
    pixel_size_um: float | None
    slide_scale: float | None

    @property
    def radius(self) -> int:
        """Kernel radius in px: spots this far outside a window still count."""
        return kernel_radius(sigma_in_px(self.cfg.sigma_um, self.pixel_size_um))


def window_transcripts(
    index: SpotIndex, r0: int, c0: int, shape: tuple[int, int], st: SlideTranscripts,
    local: bool = False,
) -> np.ndarray:
    """float32 [T, h, w] transcript channels of the window at (r0, c0), rendered by
    :func:`GeneSegNet.data.transcripts.transcript_channels` as preprocessing renders a crop
    at that origin. ``local=False``: spots up to the kernel radius outside the window
    count; ``local=True``: only spots inside the window."""
    pad = 0 if local else st.radius + 1
    rows, cols, codes = index.query_codes(r0 - pad, r0 + shape[0] + pad, c0 - pad,
                                          c0 + shape[1] + pad)
    return transcript_channels(rows, cols, codes, shape, st.cfg,
                               pixel_size_um=st.pixel_size_um, slide_scale=st.slide_scale,
                               embedding=st.embedding, origin=(r0, c0))


def window_heatmap(
    index: SpotIndex, r0: int, c0: int, shape: tuple[int, int], sigma: float, local: bool = False
) -> np.ndarray:
    """8-bit heatmap (×255) of the window at (r0, c0) of size ``shape``, uint8.

    ``local=False``: the window of the image-wide heatmap (nearby spots outside the
    window count). ``local=True``: only spots inside the window count (upstream).
    """
    pad = 0 if local else int(math.floor(cutoff_radius(sigma))) + 1
    rows, cols = index.query(r0 - pad, r0 + shape[0] + pad, c0 - pad, c0 + shape[1] + pad)
    return heatmap_to_uint8(render_heatmap(rows, cols, shape, sigma, origin=(r0, c0)))


def heatmap_tiles(index: SpotIndex, sigma: float, tile: int = 256) -> Iterator[np.ndarray]:
    """The image-wide 8-bit heatmap as full ``tile``×``tile`` uint8 tiles, row-major
    (edge tiles extend past the image), e.g. for a tiled TIFF."""
    height, width = index.shape
    for r0 in range(0, height, tile):
        for c0 in range(0, width, tile):
            yield window_heatmap(index, r0, c0, (tile, tile), sigma)


def _as_channels_last(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        return image[:, :, None]
    if image.ndim == 3:
        return image
    raise ValueError(f"expected an image [H, W] or [H, W, C], got shape {image.shape}")


def channel_percentiles(
    image: np.ndarray, sample_pixels: int = 4_000_000, lower: float = 1.0, upper: float = 99.0
) -> np.ndarray:
    """Per-channel (lower, upper) percentiles of an [H, W] or [H, W, C] image, float32 [C, 2].

    Computed on ``image[::s, ::s]`` with the smallest stride s that leaves at most
    ``sample_pixels`` pixels; s = 1 (exact) for smaller images.
    """
    img = _as_channels_last(image)
    step = max(1, math.ceil(math.sqrt(img.shape[0] * img.shape[1] / sample_pixels)))
    sub = img[::step, ::step]
    return np.stack(
        [
            np.percentile(sub[:, :, c].astype(np.float32), [lower, upper])
            for c in range(sub.shape[2])
        ]
    ).astype(np.float32)


def _apply_percentiles(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """``normalize99`` with fixed percentiles: (x - low) / (high - low), 0 if flat."""
    if high - low > 1e-3:
        return (x - np.float32(low)) / np.float32(high - low)
    return np.zeros_like(x)


def _raw_window(
    image: np.ndarray, r0: int, c0: int, window: int
) -> tuple[np.ndarray, tuple[slice, slice]]:
    """Image channels of a window whose corner (r0, c0) may lie outside the image.

    Returns float32 [C, window, window], zero beyond the image, and the (rows, cols)
    slices of the window that hold image pixels.
    """
    height, width = image.shape[:2]
    top, left = max(r0, 0), max(c0, 0)
    bottom, right = min(r0 + window, height), min(c0 + window, width)
    out = np.zeros((image.shape[2], window, window), dtype=np.float32)
    inside = (
        slice(top - r0, max(bottom - r0, top - r0)),
        slice(left - c0, max(right - c0, left - c0)),
    )
    if bottom > top and right > left:
        out[:, inside[0], inside[1]] = np.moveaxis(image[top:bottom, left:right], -1, 0)
    return out, inside


class _GlobalInputs:
    """Network inputs of global mode: image-wide normalisation (percentiles, or one local
    level grid per channel) and image-wide transcript channels (heatmap or density)."""

    def __init__(self, image: np.ndarray, index: SpotIndex, cfg: SlideConfig,
                 transcripts: SlideTranscripts | None = None) -> None:
        self.image, self.index, self.cfg = image, index, cfg
        self.transcripts = transcripts
        ev = cfg.evaluation
        self.levels = None
        if ev.normalize and ev.image_norm == "local":
            self.levels = [local_levels(image[:, :, c], ev.norm_scale_px)
                           for c in range(image.shape[2])]
        self.image_pct = None
        if ev.normalize and self.levels is None:
            self.image_pct = channel_percentiles(image, cfg.sample_pixels)
        self.heat_pct = None
        if ev.heatmap_mode == "percentile" and ev.transcript_mode == "heatmap":
            self.heat_pct = self._heatmap_percentiles()
        logger.debug("image percentiles %s, heatmap percentiles %s", self.image_pct, self.heat_pct)

    def _density(self) -> SlideTranscripts:
        if self.transcripts is None:
            raise ValueError("density transcript input needs the slide's SlideTranscripts")
        return self.transcripts

    def _heatmap_percentiles(self) -> np.ndarray:
        """1/99 % of the 8-bit heatmap, pooled over up to 4×4 windows spread evenly."""
        height, width = self.index.shape
        size = min(512, height, width)
        rows = np.unique(np.linspace(0, height - size, 4).astype(int))
        cols = np.unique(np.linspace(0, width - size, 4).astype(int))
        maps = [
            window_heatmap(self.index, r, c, (size, size), self.cfg.sigma)
            for r in rows
            for c in cols
        ]
        return np.percentile(np.stack(maps).astype(np.float32), [1.0, 99.0]).astype(np.float32)

    def __call__(self, r0: int, c0: int) -> np.ndarray:
        """Normalised input [C + 1, w, w] of the window at (r0, c0); zero outside the image."""
        window, ev = self.cfg.window, self.cfg.evaluation
        x, inside = _raw_window(self.image, r0, c0, window)
        for c in range(x.shape[0]):
            if self.levels is not None:
                x[c] = apply_levels(x[c], self.levels[c], (r0, c0))
            elif self.image_pct is not None:
                x[c] = _apply_percentiles(x[c], *self.image_pct[c])
            else:
                continue
            if ev.invert:
                x[c] = 1.0 - x[c]
        if ev.transcript_mode == "density":
            trans = window_transcripts(self.index, r0, c0, (window, window),
                                       self._density())
        else:
            heat = window_heatmap(self.index, r0, c0, (window, window), self.cfg.sigma)
            heat = heat.astype(np.float32)
            if self.heat_pct is not None:
                heat = _apply_percentiles(heat, *self.heat_pct)
            else:
                heat /= np.float32(255.0)
            trans = heat[None]
        out = np.concatenate([x, trans])
        if out[:, inside[0], inside[1]].shape[1:] != (window, window):  # zero the border
            keep = np.zeros((window, window), dtype=bool)
            keep[inside] = True
            out[:, ~keep] = 0.0
        return out


def _forward_windows(net: nn.Module, batch: np.ndarray, net_size: int, device,
                     augment: bool = False) -> np.ndarray:
    """Network outputs [B, 3, w, w] for windows [B, C, w, w], resized to and from
    ``net_size`` with OpenCV bilinear interpolation (flow magnitudes not rescaled);
    ``augment``: averaged over the four flips (:func:`forward_tiles`)."""
    window = batch.shape[-1]
    if net_size != window:
        batch = np.stack([resize_image(x, (net_size, net_size)) for x in batch])
    out, _ = forward_tiles(net, batch, len(batch), device, augment)
    if net_size != window:
        out = np.stack([resize_image(y, (window, window)) for y in out])
    return out


def _finalize(acc: TiledAccumulator, rows_per_step: int = 256) -> np.ndarray:
    """Divide the sum canvas by the weights in place, strip by strip; returns it."""
    total, weight = acc.sum, acc.weight
    for r0 in range(0, total.shape[1], rows_per_step):
        w = weight[r0 : r0 + rows_per_step].astype(np.float32)
        part = total[:, r0 : r0 + rows_per_step].astype(np.float32)
        np.divide(part, w, out=part, where=w > 0)
        part[:, w <= 0] = 0.0
        total[:, r0 : r0 + rows_per_step] = part
    return total


def _stream_global(net, image, index, cfg, plan, acc, device, bar, transcripts) -> None:
    inputs = _GlobalInputs(image, index, cfg, transcripts)
    weight = taper_mask(plan.window)
    size = cfg.evaluation.batch_size
    for first in range(0, len(plan.starts), size):
        corners = plan.starts[first : first + size]
        batch = np.stack([inputs(r0, c0) for r0, c0 in corners])
        for (r0, c0), out in zip(
            corners, _forward_windows(net, batch, plan.net_size, device,
                                      cfg.evaluation.augment), strict=True
        ):
            acc.add(out, r0, c0, weight)
        bar.update(len(corners))


def _stream_window_local(
    net, image, index, cfg, plan, acc, device, bar, heatmap_sink, transcripts
) -> None:
    ev = replace(cfg.evaluation, resample=True)
    window = plan.window
    for k, (r0, c0) in enumerate(plan.starts):
        heat = window_heatmap(index, r0, c0, (window, window), cfg.sigma, local=True)
        if heatmap_sink is not None:
            heatmap_sink(k, heat)
        if ev.transcript_mode == "density":
            if transcripts is None:
                raise ValueError("density transcript input needs the slide's SlideTranscripts")
            trans = window_transcripts(index, r0, c0, (window, window), transcripts, local=True)
        else:
            trans = heat[None].astype(np.float32)
        raw = np.concatenate([_raw_window(image, r0, c0, window)[0], trans])
        flows, cellprob, _ = run_network(
            net, prepare_input(raw, ev, origin=(r0, c0)), rescale=plan.rescale, cfg=ev,
            device=device,
        )
        acc.add(np.concatenate([flows, cellprob[None]]), r0, c0)
        bar.update(1)


def predict_slide(
    net: nn.Module,
    image: np.ndarray,
    index: SpotIndex,
    cfg: SlideConfig,
    *,
    diam_mean: float,
    diam_labels: float,
    device,
    progress: bool = False,
    heatmap_sink: Callable[[int, np.ndarray], None] | None = None,
    transcripts: SlideTranscripts | None = None,
) -> SlideField:
    """Network outputs over a whole image, blended from overlapping windows.

    Parameters
    ----------
    net : loaded network on ``device``; ``net.config`` gives ``nchan`` (image channels
        + 1 heatmap channel) and ``size_multiple``.
    image : [H, W] grey or [H, W, C] (e.g. BGR) image, any real dtype, unnormalised.
    index : the spots (:class:`SpotIndex` of the same image; may be empty).
    cfg : window, overlap, heatmap and normalisation settings.
    diam_mean, diam_labels : the checkpoint's diameters (pixels).
    device : device of the network pass.
    progress : show a progress bar over windows.
    heatmap_sink : window-local mode only: called as ``sink(k, heatmap_uint8)`` for
        every window k (upstream wrote these maps to disk).
    transcripts : density transcript input (``cfg.evaluation.transcript_mode ==
        "density"``): how the slide's transcript channels are rendered.

    Returns
    -------
    SlideField with ``field [3, H, W]`` in ``cfg.canvas_dtype``.
    """
    img = _as_channels_last(image)
    height, width = img.shape[:2]
    config = getattr(net, "config", None)
    n_trans = cfg.evaluation.n_transcripts
    nchan = int(getattr(config, "nchan", img.shape[2] + n_trans))
    if img.shape[2] + n_trans != nchan:
        raise ValueError(
            f"the network takes {nchan} channels ({nchan - n_trans} image + {n_trans} "
            f"transcript) but the image has {img.shape[2]}"
        )
    if index.shape != (height, width):
        raise ValueError(f"spot index is for shape {index.shape}, image is {(height, width)}")
    plan = plan_windows(
        (height, width),
        cfg,
        diam_mean=diam_mean,
        diam_labels=diam_labels,
        size_multiple=int(getattr(config, "size_multiple", 1)),
    )
    logger.info(
        "%d×%d px: %d windows of %d px (stride %s, network %d px, resize %.4g), %s mode",
        height,
        width,
        len(plan.starts),
        plan.window,
        plan.stride,
        plan.net_size,
        plan.rescale,
        "window-local" if cfg.window_local else "global",
    )
    acc = TiledAccumulator(3, (height, width), dtype=np.dtype(cfg.canvas_dtype))
    was_training = net.training
    net.eval()
    try:
        with tqdm(total=len(plan.starts), desc="windows", unit="win", disable=not progress) as bar:
            if cfg.window_local:
                _stream_window_local(
                    net, img, index, cfg, plan, acc, device, bar, heatmap_sink, transcripts
                )
            else:
                _stream_global(net, img, index, cfg, plan, acc, device, bar, transcripts)
    finally:
        net.train(was_training)
    return SlideField(_finalize(acc), plan)
