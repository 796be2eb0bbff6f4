"""Python API: load a model, segment an image, assign transcripts, write outputs.

Example (see README "Python API")::

    import GeneSegNet as gsn

    model = gsn.load_model("model.pt", device="cpu")
    result = gsn.segment(model, dapi, spots, pixel_size_um=0.2125)
    table = gsn.assign_transcripts(result.labels, spots, prob=result.cell_probability,
                                   pixel_size_um=0.2125)
    gsn.write_outputs(result, spots, "out", outputs=("csv", "h5ad", "geojson"))

Coordinates: images are (H, W) = (rows, columns); spot tables have ``x`` (column) and
``y`` (row) in pixels of the image and a ``gene`` column.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

__all__ = ["Model", "SegmentationResult", "assign_transcripts", "load_model", "segment",
           "sopa_method", "write_outputs"]


@dataclass
class Model:
    """A loaded network: ``net`` (eval mode, on ``device``) and the checkpoint's ``meta``
    (``diam_mean``, ``diam_labels`` in px, ...)."""

    net: Any
    meta: dict
    device: Any

    @property
    def model_input(self):
        """The input the model was trained on (:class:`GeneSegNet.data.model_input.ModelInput`:
        transcript channels, gene embedding, image normalisation); upstream's for
        checkpoints that do not record one."""
        from GeneSegNet.data.model_input import model_input_from_meta

        return model_input_from_meta(self.meta)

    @property
    def n_image_channels(self) -> int:
        """Image channels the network takes (its input channels minus the transcript
        channels: one heatmap for upstream models; density and gene channels for ours)."""
        return int(self.net.config.nchan) - self.model_input.n_transcripts


@dataclass
class SegmentationResult:
    """Segmentation of one image.

    labels : (H, W) int32 cells 1..K (0 = background).
    flows : (2, H, W) float32 network flows (dY, dX).
    cell_logit : (H, W) float32 cell-probability logits.
    image : the input image; pixel_size_um : µm per px or None; settings : run settings.
    """

    labels: np.ndarray
    flows: np.ndarray
    cell_logit: np.ndarray
    image: np.ndarray | None = None
    pixel_size_um: float | None = None
    settings: dict = field(default_factory=dict)

    @property
    def cell_probability(self) -> np.ndarray:
        """(H, W) float32 sigmoid of :attr:`cell_logit`."""
        from GeneSegNet.export.confidence import cell_probability

        return cell_probability(self.cell_logit)


def load_model(path: str | Path, device: str = "cpu") -> Model:
    """Load a GeneSegNet checkpoint (or an upstream state dict) safely onto ``device``."""
    from GeneSegNet.device import as_device
    from GeneSegNet.model.checkpoint import load_checkpoint

    dev = as_device(device)
    net, meta = load_checkpoint(path, dev)
    return Model(net, meta, dev)


def _spot_pixels(spots: pd.DataFrame | None, shape: tuple[int, int], encode=None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Int (rows, cols) pixels of the spots inside the image, and their gene codes
    (``encode`` of the gene column; None without an encoder)."""
    from GeneSegNet.errors import InputError
    from GeneSegNet.slide.files import table_pixels

    if spots is None or not len(spots):
        empty = np.zeros(0, np.int32)
        return empty, empty, None if encode is None else np.zeros(0, np.int64)
    needed = ["x", "y"] + ([] if encode is None else ["gene"])
    missing = [c for c in needed if c not in spots.columns]
    if missing:
        raise InputError(f"the spot table has no column {', '.join(missing)} (it needs "
                         f"{', '.join(needed)}; x and y in pixels, x = column)")
    rows, cols, inside, codes = table_pixels(spots, shape, encode)
    if (~inside).any():
        logger.warning("%d of %d spots lie outside the %d×%d image; left out",
                       int((~inside).sum()), len(inside), shape[1], shape[0])
    return rows, cols, codes


def segment(model: Model, image: np.ndarray, spots: pd.DataFrame | None = None, *,
            pixel_size_um: float | None = None, diameter: float = 0.0, window: int = 256,
            block_size: int = 2048, halo: int | None = None, flow_threshold: float = 0.4,
            cellprob_threshold: float = 0.0, min_size: int = 15, niter: int = 200,
            batch_size: int = 8, augment: bool = False, transcript_refine: bool = True,
            smooth_um: float = 1.0, progress: bool = False) -> SegmentationResult:
    """Segment a whole image as the inference script does: window pass
    (:func:`GeneSegNet.slide.windows.predict_slide`), block-wise masks
    (:func:`GeneSegNet.slide.blockwise.reconstruct_blockwise`), then, for models with a
    transcript density input, the transcript refinement of the cells, and last the
    outline smoothing (with a pixel size).

    The transcript input and image normalisation are the model's own (from its
    checkpoint): upstream's heatmap, or the density with gene channels of a model trained
    here, which needs ``pixel_size_um``.

    Parameters
    ----------
    model : from :func:`load_model`.
    image : (H, W) grey (DAPI) or (H, W, C) with C = the model's image channels.
    spots : table with x, y (px; x = column) and gene, or None (no transcripts).
    pixel_size_um : µm per px of the image (needed by density models; kept with the
        result for the µm outputs).
    diameter : expected cell diameter in px; 0 uses the model's ``diam_labels``.
    window, block_size, halo : window edge, mask block edge and halo (px; None = two
        cell diameters).
    flow_threshold, cellprob_threshold, min_size, niter, batch_size, augment : as the
        inference script's options (``--confidence_threshold`` for ``cellprob_threshold``).
    transcript_refine : as the inference script (off: ``--no_transcript_refine``).
    smooth_um : outline smoothing width in µm (``--smooth_um``; 0: off; needs
        ``pixel_size_um``).
    """
    import math

    from GeneSegNet.errors import InputError
    from GeneSegNet.io.metadata import check_pixel_size
    from GeneSegNet.model.predict import eval_config_for_model
    from GeneSegNet.slide.blockwise import reconstruct_blockwise
    from GeneSegNet.slide.pipeline import (
        refine_with_transcripts,
        slide_transcripts,
        smooth_slide_outlines,
    )
    from GeneSegNet.slide.plan import SlideConfig
    from GeneSegNet.slide.windows import SpotIndex, predict_slide

    model_input = model.model_input
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    n_img = model.n_image_channels
    if img.ndim not in (2, 3) or (img.ndim == 2 and n_img != 1) or (
            img.ndim == 3 and img.shape[2] != n_img):
        raise InputError(f"image of shape {img.shape} does not fit a model with {n_img} image "
                         "channel(s) (expected (H, W) or (H, W, C))")
    if not smooth_um >= 0:
        raise InputError(f"smooth_um must be >= 0 (µm; 0: no outline smoothing), got {smooth_um}")
    if pixel_size_um is not None:
        pixel_size_um = check_pixel_size(pixel_size_um, "pixel_size_um")
    elif model_input.transcripts.needs_slide_scale:
        raise InputError(f"the model's {model_input.transcripts.mode} transcript input needs "
                         "the image's pixel size: give pixel_size_um (µm/px)")
    shape = img.shape[:2]
    encode = None if model_input.embedding is None else model_input.embedding.encode
    rows, cols, codes = _spot_pixels(spots, shape, encode)
    # as the inference script: the model's transcript input, image normalisation, heatmap
    # scaling and flow targets, with these settings
    settings = {"diameter": diameter, "flow_threshold": flow_threshold,
                "confidence_threshold": cellprob_threshold, "min_size": min_size,
                "niter": niter, "batch_size": batch_size, "augment": augment}
    ev = eval_config_for_model(settings, model.meta.get("train_config"), model_input)
    cfg = SlideConfig(window=window, evaluation=ev, canvas_dtype="float32")
    diams = {"diam_mean": float(model.meta["diam_mean"]),
             "diam_labels": float(model.meta["diam_labels"])}
    transcripts = slide_transcripts(rows, cols, model_input, pixel_size_um)
    field_ = predict_slide(model.net, img, SpotIndex(rows, cols, shape, codes=codes), cfg,
                           **diams, device=model.device, progress=progress,
                           transcripts=transcripts)
    halo_px = halo if halo is not None else int(math.ceil(2.0 * field_.plan.diameter))
    labels = reconstruct_blockwise(
        field_.flows, field_.cellprob, block_size=block_size, halo=halo_px,
        **ev.mask_kwargs(), device=model.device, progress=progress)
    refined = transcript_refine and transcripts is not None and len(rows) > 0
    if refined:
        labels = refine_with_transcripts(labels, rows, cols, codes, pixel_size_um, image=img)
    smoothed = smooth_um if smooth_um > 0 and pixel_size_um is not None else 0.0
    labels = smooth_slide_outlines(labels, smoothed, pixel_size_um, "image")
    settings = {"diameter_px": field_.plan.diameter, "window": window, "block_size": block_size,
                "halo": halo_px, "flow_threshold": flow_threshold,
                "cellprob_threshold": cellprob_threshold, "min_size": min_size, "niter": niter,
                "augment": augment, "transcript_refine": refined, "smooth_um": smoothed, **diams,
                "transcript_mode": ev.transcript_mode, "image_norm": ev.image_norm}
    return SegmentationResult(labels, np.asarray(field_.flows, np.float32),
                              np.asarray(field_.cellprob, np.float32), img, pixel_size_um,
                              settings)


def assign_transcripts(labels: np.ndarray, spots: pd.DataFrame, prob: np.ndarray | None = None,
                       pixel_size_um: float | None = None) -> pd.DataFrame:
    """Per transcript, in the input order: ``cell_id``, ``spotX``, ``spotY``, ``gene``, then
    ``cell_probability`` (with ``prob``, an (H, W) map in [0, 1]), ``boundary_distance_um``
    (``_px`` without a pixel size) and ``nearest_cell_id``
    (:mod:`GeneSegNet.export.confidence`)."""
    from GeneSegNet.export.confidence import transcript_confidence
    from GeneSegNet.mapping import lookup_cell_ids

    labels = np.asarray(labels)
    x = spots["x"].to_numpy(np.float64)
    y = spots["y"].to_numpy(np.float64)
    cell_ids, _, _ = lookup_cell_ids(labels, x, y)
    table = pd.DataFrame({"cell_id": cell_ids, "spotX": x, "spotY": y,
                          "gene": spots["gene"].to_numpy()})
    extra = transcript_confidence(labels, x, y, cell_prob=prob, pixel_size_um=pixel_size_um)
    return pd.concat([table, extra], axis=1)


def write_outputs(result: SegmentationResult, spots: pd.DataFrame | None, out_dir: str | Path,
                  outputs: Iterable[str] | str = ("csv", "h5ad", "geojson"), *,
                  name: str = "sample", nuclei: np.ndarray | None = None
                  ) -> dict[str, list[Path]]:
    """Write ``outputs`` (any of :data:`GeneSegNet.export.OUTPUT_KINDS`) of ``result`` into
    ``out_dir``; returns the written paths per kind (:mod:`GeneSegNet.export.sample`)."""
    from GeneSegNet.export.sample import SampleOutput, write_sample_outputs

    sample = SampleOutput(result.labels, result.image, result.pixel_size_um, result.cell_logit,
                          nuclei, result.settings)
    return write_sample_outputs(sample, spots, out_dir, name, outputs)


def transcript_channel_spots(channel: np.ndarray) -> pd.DataFrame:
    """Spots from a transcript-count image (Y, X): one spot per count at the pixel centre
    (x, y) = (col + 0.5, row + 0.5); gene "unknown". Non-integer values are rounded."""
    counts = np.rint(np.nan_to_num(np.asarray(channel, dtype=np.float64))).astype(np.int64)
    counts = np.maximum(counts, 0)
    rows, cols = np.nonzero(counts)
    reps = counts[rows, cols]
    return pd.DataFrame({"x": np.repeat(cols + 0.5, reps), "y": np.repeat(rows + 0.5, reps),
                         "gene": "unknown"})


def sopa_method(model: Model | str | Path, **segment_kwargs: Any
                ) -> Callable[[np.ndarray], np.ndarray]:
    """A sopa custom staining-based method: ``method(image) -> labels``.

    The returned function takes an image (C, Y, X) whose last channel counts transcripts
    per pixel (the other C - 1 channels are the model's image channels, e.g. DAPI) and
    returns the (Y, X) int32 label image. ``segment_kwargs`` go to :func:`segment`.
    """
    loaded = model if isinstance(model, Model) else load_model(model)

    def method(image: np.ndarray) -> np.ndarray:
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[0] < 2:
            raise ValueError(f"expected an image (C, Y, X) with C >= 2, got {image.shape}")
        stain = np.moveaxis(image[:-1], 0, -1)
        spots = transcript_channel_spots(image[-1])
        return segment(loaded, stain, spots, **segment_kwargs).labels

    return method
