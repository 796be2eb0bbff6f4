"""The network pass on one crop and the masks it yields (spec §7.1-7.2).

One crop goes through: per-channel normalisation (the spot heatmap, last channel, by
``EvalConfig.heatmap_mode``), a resize by ``r = diam_mean / diameter``, zero padding to a
multiple of 16 plus 8 px per side, 224-px tiles with ~10 % overlap run in batches,
taper-weighted blending, removal of the padding and a bilinear resize back to the crop
size (flow magnitudes are not rescaled). Masks come from
:func:`GeneSegNet.dynamics.reconstruct.compute_masks`.

The network is passed in, already loaded: weights are read once per run, never per
image (upstream re-read them from disk for every image, spec §12 item 5).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from GeneSegNet.data.dataset import Crop, network_input
from GeneSegNet.data.normalize import LevelGrid
from GeneSegNet.data.transforms import (
    HEATMAP_MODES,
    HeatmapMode,
    InputNorm,
    normalize_input,
    pad_to_multiple,
    resize_image,
)
from GeneSegNet.dynamics.flow_targets import DEFAULT_FLOW_TARGET_MODE, check_mode
from GeneSegNet.dynamics.masks import renumber
from GeneSegNet.dynamics.reconstruct import compute_masks
from GeneSegNet.model.tiling import blend_tiles, make_tiles

logger = logging.getLogger(__name__)

_PAD_MULTIPLE = 16  # upstream pad_image_ND: pad to a multiple of 16 ...
_PAD_EXTRA = 8  # ... plus 8 px on each side


@dataclass(frozen=True)
class EvalConfig:
    """Settings of the network pass and of mask reconstruction (spec §7.1 defaults).

    Attributes
    ----------
    diameter : expected cell diameter in pixels; the crop is resized by
        ``diam_mean / diameter``. 0 uses the checkpoint's ``diam_labels`` instead
        (the training-set median, spec §12 item 22).
    tile_size : tile edge in pixels (a multiple of the network's size multiple).
    tile_overlap : fraction of overlap between neighbouring tiles.
    batch_size : tiles per forward pass.
    resample : True: compute masks at the crop's resolution (outputs resized back
        first). False: compute masks at the network's resolution and resize the masks
        back with nearest neighbour (faster; upstream ``--no_resample``/``--fast_mode``).
    normalize : per-channel 1-99 % normalisation of the image channels (upstream
        ``--no_norm`` switches it off; the raw values then go to the network).
    invert : replace the normalised image channels x by 1 - x (needs ``normalize``).
    heatmap_mode : ``"fixed"`` (heatmap divided by 255, keeps sparse heatmaps) or
        ``"percentile"`` (upstream: 1-99 % like the image, zeroes sparse heatmaps).
    flow_threshold : maximum flow error of a kept mask (0 switches the check off).
    confidence_threshold : cell-probability logit threshold (0 means p > 0.5).
    min_size : minimum mask area in pixels, at the resolution the masks are computed at.
    niter : flow-following steps (upstream 200, not scaled with the resize).
    y_only_movers : choose the pixels to move by their Y flow only (upstream's quirk,
        which leaves exactly horizontal flows unlabelled); False tests both components.
    flow_target_mode : flow targets the flow check compares with (the mode the model was
        trained with; see :data:`GeneSegNet.dynamics.flow_targets.FLOW_TARGET_MODES`).
    image_norm : image-channel normalisation, "percentile" (1-99 %) or "local" (levels
        on blocks of ``norm_scale_px`` px, :mod:`GeneSegNet.data.normalize`).
    transcript_mode, n_transcripts : the model's transcript input (the trailing
        ``n_transcripts`` channels): "heatmap" (one channel, ``heatmap_mode``) or
        "density" (channels passed unchanged). Set from the checkpoint
        (:meth:`GeneSegNet.data.model_input.ModelInput.eval_fields`).
    norm_scale_px : block of local normalisation in px (0 when unused).
    augment : average the network's outputs over the four flips of each tile (none,
        left-right, up-down, both), each flipped back with its flow component's sign
        turned (:func:`forward_tiles`); four times the network time.
    """

    diameter: float = 32.0
    tile_size: int = 224
    tile_overlap: float = 0.1
    batch_size: int = 8
    resample: bool = True
    normalize: bool = True
    invert: bool = False
    heatmap_mode: HeatmapMode = "fixed"
    flow_threshold: float = 0.4
    confidence_threshold: float = 0.0
    min_size: int = 15
    niter: int = 200
    y_only_movers: bool = False
    flow_target_mode: str = DEFAULT_FLOW_TARGET_MODE
    image_norm: str = "percentile"
    transcript_mode: str = "heatmap"
    n_transcripts: int = 1
    norm_scale_px: int = 0
    augment: bool = False

    def __post_init__(self) -> None:
        problems = []
        try:
            self.input_norm()
        except ValueError as exc:
            problems.append(str(exc))
        if not self.diameter >= 0:
            problems.append(f"diameter must be >= 0 (0 = use the model's), got {self.diameter}")
        if self.tile_size < 1:
            problems.append(f"tile_size must be >= 1, got {self.tile_size}")
        if not 0.0 <= self.tile_overlap < 1.0:
            problems.append(f"tile_overlap must lie in [0, 1), got {self.tile_overlap}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.heatmap_mode not in HEATMAP_MODES:
            problems.append(
                f"heatmap_mode must be one of {HEATMAP_MODES}, got {self.heatmap_mode!r}"
            )
        if self.invert and not self.normalize:
            problems.append("invert needs normalisation (it flips the normalised 0..1 range)")
        if self.niter < 1:
            problems.append(f"niter must be >= 1, got {self.niter}")
        try:
            check_mode(self.flow_target_mode)
        except ValueError as exc:
            problems.append(str(exc))
        if problems:
            raise ValueError("; ".join(problems))

    def mask_kwargs(self) -> dict[str, Any]:
        """The mask-reconstruction settings, as keyword arguments of
        :func:`GeneSegNet.dynamics.reconstruct.compute_masks` (and of the block-wise
        reconstruction of whole slides)."""
        return {"niter": self.niter, "confidence_threshold": self.confidence_threshold,
                "flow_threshold": self.flow_threshold, "min_size": self.min_size,
                "y_only_movers": self.y_only_movers, "target_mode": self.flow_target_mode}

    def input_norm(self) -> InputNorm:
        """How the network input is normalised (see
        :func:`GeneSegNet.data.transforms.normalize_input`)."""
        return InputNorm(heatmap_mode=self.heatmap_mode, image_norm=self.image_norm,
                         transcript_mode=self.transcript_mode, n_transcripts=self.n_transcripts,
                         scale_px=self.norm_scale_px, invert=self.invert)


@dataclass
class Prediction:
    """Network outputs and masks of one crop, all at the crop's size (H, W).

    masks : int32 [H, W], cells 1..K (0 = background).
    flows : float32 [2, H, W], (dY, dX) as the network outputs them (about 5x unit).
    cellprob : float32 [H, W], cell-probability logits.
    style : float32 [S], L2-normalised style vector (S = nbase[-1], 256 by default).
    """

    masks: np.ndarray
    flows: np.ndarray
    cellprob: np.ndarray
    style: np.ndarray


MAX_RESCALE = 16.0  # largest resize (and 1 / smallest) of an image for the network


def eval_config_for_model(settings: dict[str, Any], trained: dict[str, Any] | None,
                          model_input=None, *, heatmap_norm: str | None = None,
                          image_norm: str | None = None, diam_mean: float | None = None
                          ) -> EvalConfig:
    """The :class:`EvalConfig` of ``settings`` (EvalConfig fields chosen by the caller) for
    a model, with what the model itself fixes.

    trained : the settings the model was trained with (a checkpoint's ``train_config``, or
        ``TrainConfig.to_dict()`` in training); None when unknown (an upstream state
        dict). Its ``heatmap_mode`` is used unless ``heatmap_norm`` is given (then with a
        warning if they differ); its ``flow_target_mode`` sets the flow check's targets.
    model_input : the model's input (:func:`GeneSegNet.data.model_input.model_input_from_meta`):
        the transcript-input and image-normalisation fields, ``image_norm`` overriding the
        model's image normalisation (with a warning). None: EvalConfig's defaults (upstream
        heatmap input), ``image_norm`` ignored. A local normalisation without a block size
        gets one from ``diam_mean`` (the trained one first, else 34).

    Raises ``InputError`` for invalid settings.
    """
    from dataclasses import replace

    from GeneSegNet.data.transforms import norm_scale_for
    from GeneSegNet.errors import InputError

    kwargs = dict(settings)
    trained_mode = (trained or {}).get("heatmap_mode")
    if heatmap_norm is not None and trained_mode is not None and heatmap_norm != trained_mode:
        logger.warning(
            "--heatmap_norm %s differs from the model's training setting (%s): the model "
            "sees heatmaps scaled differently from training",
            heatmap_norm,
            trained_mode,
        )
    mode = heatmap_norm if heatmap_norm is not None else trained_mode
    if mode is not None:
        kwargs["heatmap_mode"] = mode
    if trained is not None:  # the flow check compares with the targets the model learnt
        kwargs["flow_target_mode"] = trained.get("flow_target_mode", "upstream")
    if model_input is not None:
        model_input = model_input.with_image_norm(image_norm)
        if model_input.image_norm == "local" and not model_input.norm_scale_px:
            diam = (trained or {}).get("diam_mean") or diam_mean or 34.0
            model_input = replace(model_input, norm_scale_px=norm_scale_for(float(diam)))
        kwargs.update(model_input.eval_fields())
    try:
        return EvalConfig(**kwargs)
    except ValueError as exc:
        raise InputError(f"bad evaluation settings: {exc}") from None


def rescale_factor(cfg: EvalConfig, *, diam_mean: float, diam_labels: float) -> float:
    """Resize factor of the network pass: ``diam_mean / diameter``, or
    ``diam_mean / diam_labels`` when ``cfg.diameter == 0``."""
    from GeneSegNet.errors import InputError

    diameter = cfg.diameter if cfg.diameter > 0 else diam_labels
    if not diameter > 0 or not diam_mean > 0 or not math.isfinite(diam_mean / diameter):
        raise InputError(
            f"cannot derive a resize factor from diam_mean={diam_mean}, diameter={diameter} "
            "(with --diameter 0 the model's diam_labels must be positive)"
        )
    rescale = float(diam_mean) / float(diameter)
    if not 1.0 / MAX_RESCALE <= rescale <= MAX_RESCALE:
        raise InputError(
            f"cell diameter {diameter:g} px against the model's {diam_mean:g} px asks to resize "
            f"the image by {rescale:.3g}x (allowed 1/{MAX_RESCALE:g}..{MAX_RESCALE:g}; each "
            f"side grows by that factor, the memory by its square): check --diameter"
        )
    return rescale


# (flip rows, flip cols) of test-time augmentation; outputs are (dY, dX, cell logit)
_FLIPS = ((False, False), (False, True), (True, False), (True, True))


def forward_tiles(
    net: nn.Module, tiles: np.ndarray, batch_size: int, device: torch.device | str,
    augment: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Run tiles [n, C, th, tw] in batches; return outputs [n, K, th, tw] and styles [n, S].

    ``augment``: the mean over the four flips of each batch, each output flipped back
    and its flow component along a flipped axis negated (dY for rows, dX for columns).
    """
    outs, styles = [], []
    with torch.inference_mode():
        for start in range(0, len(tiles), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(tiles[start : start + batch_size]))
            x = x.to(device=device, dtype=torch.float32)
            y_sum, style_sum = None, None
            for flip_rows, flip_cols in _FLIPS if augment else _FLIPS[:1]:
                dims = [d for d, on in ((-2, flip_rows), (-1, flip_cols)) if on]
                y, style = net(torch.flip(x, dims) if dims else x)
                y = y.float()
                if dims:
                    y = torch.flip(y, dims)
                    sign = torch.ones(y.shape[1], device=y.device)
                    sign[0] = -1.0 if flip_rows else 1.0
                    sign[1] = -1.0 if flip_cols else 1.0
                    y = y * sign[None, :, None, None]
                y_sum = y if y_sum is None else y_sum + y
                style_sum = style.float() if style_sum is None else style_sum + style.float()
            n = len(_FLIPS) if augment else 1
            outs.append((y_sum / n).cpu().numpy())
            styles.append((style_sum / n).cpu().numpy())
    return np.concatenate(outs), np.concatenate(styles)


def run_network(
    net: nn.Module,
    image: np.ndarray,
    *,
    rescale: float,
    cfg: EvalConfig,
    device: torch.device | str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tiled network pass on one normalised image (spec §7.1 steps 2-6).

    Parameters
    ----------
    net : the network (``forward(x) -> (out [B, 3, h, w], style [B, S])``), on ``device``.
        It runs in eval mode under ``torch.inference_mode``; its previous train/eval mode
        is restored afterwards.
    image : float32 [C, H, W], normalised, heatmap last.
    rescale : resize factor r; the network sees ``(int(H·r), int(W·r))`` pixels.
    cfg : tile size, overlap, batch size and ``resample``.
    device : where the tiles are sent.

    Returns
    -------
    flows : float32 [2, h, w] (dY, dX)
    cellprob : float32 [h, w] logits
    style : float32 [S], averaged over tiles and L2-normalised
        ``(h, w) = (H, W)`` when ``cfg.resample`` (bilinear resize back, magnitudes not
        rescaled), else the network's resolution ``(int(H·r), int(W·r))``.
    """
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"expected an image [C, H, W], got shape {image.shape}")
    if not rescale > 0:
        raise ValueError(f"rescale must be > 0, got {rescale}")
    multiple = int(getattr(getattr(net, "config", None), "size_multiple", 1))
    if cfg.tile_size % multiple:
        raise ValueError(f"tile_size {cfg.tile_size} is not a multiple of {multiple}")
    height, width = image.shape[1:]
    if rescale != 1.0:
        shape = (max(1, int(height * rescale)), max(1, int(width * rescale)))
        image = resize_image(image, shape, "linear")
    padded, crop = pad_to_multiple(image, _PAD_MULTIPLE, _PAD_EXTRA)
    tiles, starts = make_tiles(padded, cfg.tile_size, cfg.tile_overlap)
    was_training = net.training
    net.eval()
    try:
        outputs, styles = forward_tiles(net, tiles, cfg.batch_size, device, cfg.augment)
    finally:
        net.train(was_training)
    blended = blend_tiles(outputs, starts, padded.shape[1:], taper=True)[:, crop[0], crop[1]]
    if cfg.resample and blended.shape[1:] != (height, width):
        blended = resize_image(blended, (height, width), "linear")
    style = styles.sum(axis=0)
    style = style / max(float(np.sqrt(np.sum(style.astype(np.float64) ** 2))), 1e-20)
    return (
        np.ascontiguousarray(blended[:2], dtype=np.float32),
        np.ascontiguousarray(blended[2], dtype=np.float32),
        style.astype(np.float32),
    )


def prepare_input(
    crop_or_input: Crop | np.ndarray,
    cfg: EvalConfig,
    *,
    origin: tuple[int, int] | None = None,
    levels: Sequence[LevelGrid] | None = None,
) -> np.ndarray:
    """Network input of a crop: [C, H, W] float32, normalised per ``cfg``.

    ``crop_or_input`` is a :class:`Crop` (its stored transcript channels in density mode,
    its heatmap otherwise) or an unnormalised [C, H, W] array as returned by
    :func:`GeneSegNet.data.dataset.network_input` (transcript channels last). ``origin``
    (row, col, px) of pixel (0, 0) in the raw image, for local normalisation (default:
    the crop's origin, or (0, 0)); ``levels``: the slide's local levels per image channel.
    """
    if isinstance(crop_or_input, Crop):
        raw = network_input(crop_or_input, density=cfg.transcript_mode == "density")
        origin = crop_or_input.origin if origin is None else origin
    else:
        raw = np.asarray(crop_or_input)
    if raw.ndim != 3 or raw.shape[0] <= cfg.n_transcripts:
        raise ValueError(f"expected an input [C, H, W] with C > {cfg.n_transcripts} (image, "
                         f"then {cfg.n_transcripts} transcript channel(s)), got {raw.shape}")
    if not cfg.normalize:
        return raw.astype(np.float32)
    return normalize_input(raw, cfg.input_norm(), origin=origin or (0, 0), levels=levels)


def predict_crop(
    net: nn.Module,
    crop_or_input: Crop | np.ndarray,
    cfg: EvalConfig,
    *,
    diam_mean: float,
    diam_labels: float,
    device: torch.device | str,
) -> Prediction:
    """Network pass and masks of one crop.

    Parameters
    ----------
    net : loaded network on ``device`` (see :func:`run_network`).
    crop_or_input : a :class:`Crop`, or an unnormalised [C, H, W] array (heatmap last).
    cfg : evaluation settings.
    diam_mean, diam_labels : the checkpoint's diameters in pixels (``meta`` of
        :func:`GeneSegNet.model.checkpoint.load_checkpoint`).
    device : device of the network pass and of flow following.

    Returns
    -------
    Prediction, every array at the crop's size.
    """
    image = prepare_input(crop_or_input, cfg)
    height, width = image.shape[1:]
    rescale = rescale_factor(cfg, diam_mean=diam_mean, diam_labels=diam_labels)
    flows, cellprob, style = run_network(net, image, rescale=rescale, cfg=cfg, device=device)
    masks = compute_masks(flows, cellprob, device=device, **cfg.mask_kwargs())
    if flows.shape[1:] != (height, width):  # resample=False: back to the crop's size
        masks = renumber(resize_image(masks, (height, width), "nearest"), order="first")
        flows = resize_image(flows, (height, width), "linear")
        cellprob = resize_image(cellprob, (height, width), "linear")
    return Prediction(masks.astype(np.int32, copy=False), flows, cellprob, style)

