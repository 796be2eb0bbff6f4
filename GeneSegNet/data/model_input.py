"""What a trained model's input is: transcript channels, gene embedding, image normalisation.

Stored in a checkpoint's extra entry ``"model_input"`` (:data:`CHECKPOINT_KEY`) by training
and read back by testing and whole-slide inference, so they build the same input::

    {"transcripts": TranscriptInput.to_dict(), "gene_embedding": GeneEmbedding.to_dict()
     | None, "pixel_size_um": float | None (the training pixel size, µm/px),
     "image_norm": "local" | "percentile", "norm_scale_px": int (local block, training px)}

A checkpoint without the entry (older ones, upstream state dicts) is an upstream model:
heatmap transcript input and percentile image normalisation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from GeneSegNet.data.gene_embedding import GeneEmbedding
from GeneSegNet.data.sample_info import UPSTREAM_TRANSCRIPTS, common_input, read_sample_info
from GeneSegNet.data.transcripts import TranscriptInput
from GeneSegNet.data.transforms import IMAGE_NORMS, InputNorm, check_image_norm, norm_scale_for
from GeneSegNet.errors import InputError
from GeneSegNet.io.metadata import check_pixel_size

logger = logging.getLogger(__name__)

CHECKPOINT_KEY = "model_input"
DEFAULT_TRAIN_IMAGE_NORM = "local"  # training default; models without a value: percentile


@dataclass(frozen=True)
class ModelInput:
    """The input a model was trained on (defaults: upstream's)."""

    transcripts: TranscriptInput = UPSTREAM_TRANSCRIPTS
    embedding: GeneEmbedding | None = None
    pixel_size_um: float | None = None
    image_norm: str = "percentile"
    norm_scale_px: int = 0

    def __post_init__(self) -> None:
        try:
            check_image_norm(self.image_norm)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        if self.image_norm == "local" and self.norm_scale_px < 2:
            raise InputError(f"local image normalisation needs norm_scale_px >= 2, "
                             f"got {self.norm_scale_px}")
        if self.transcripts.n_gene_channels > 0 and self.embedding is None:
            raise InputError(f"{self.transcripts.n_gene_channels} gene channel(s) need a "
                             "gene embedding")

    @property
    def n_transcripts(self) -> int:
        """Transcript channels after the image channels."""
        return self.transcripts.n_channels

    def to_dict(self) -> dict[str, Any]:
        return {"transcripts": self.transcripts.to_dict(),
                "gene_embedding": None if self.embedding is None else self.embedding.to_dict(),
                "pixel_size_um": self.pixel_size_um, "image_norm": self.image_norm,
                "norm_scale_px": int(self.norm_scale_px)}

    @classmethod
    def from_dict(cls, data: Any, where: str = "model input") -> ModelInput:
        if not isinstance(data, dict):
            raise InputError(f"{where}: expected a dictionary")
        try:
            pixel = data.get("pixel_size_um")
            emb = data.get("gene_embedding")
            return cls(
                transcripts=TranscriptInput.from_dict(dict(data["transcripts"])),
                embedding=None if emb is None else GeneEmbedding.from_dict(emb),
                pixel_size_um=None if pixel is None else check_pixel_size(pixel,
                                                                          "pixel_size_um"),
                image_norm=str(data.get("image_norm", "percentile")),
                norm_scale_px=int(data.get("norm_scale_px", 0)),
            )
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{where}: malformed entry ({exc})") from None

    def with_image_norm(self, image_norm: str | None) -> ModelInput:
        """A copy with ``image_norm`` (None: unchanged); "local" on a model without a
        block size gets none and raises InputError."""
        if image_norm is None or image_norm == self.image_norm:
            return self
        if image_norm not in IMAGE_NORMS:
            raise InputError(f"--image_norm must be one of {IMAGE_NORMS}, got {image_norm!r}")
        logger.warning("--image_norm %s differs from the model's training setting (%s)",
                       image_norm, self.image_norm)
        return ModelInput(self.transcripts, self.embedding, self.pixel_size_um, image_norm,
                          self.norm_scale_px)

    def input_norm(self, heatmap_mode: str = "fixed", *, invert: bool = False) -> InputNorm:
        """The :class:`InputNorm` of this input. The local block ``norm_scale_px`` is in
        pixels of the data, like the cell diameters (not converted by pixel size)."""
        return InputNorm(heatmap_mode=heatmap_mode,  # type: ignore[arg-type]
                         image_norm=self.image_norm, transcript_mode=self.transcripts.mode,
                         n_transcripts=self.n_transcripts, scale_px=int(self.norm_scale_px),
                         invert=invert)

    def eval_fields(self) -> dict[str, Any]:
        """The :class:`GeneSegNet.model.predict.EvalConfig` fields describing this input."""
        return {"image_norm": self.image_norm, "transcript_mode": self.transcripts.mode,
                "n_transcripts": self.n_transcripts, "norm_scale_px": int(self.norm_scale_px)}


def model_input_from_meta(meta: dict[str, Any] | None) -> ModelInput:
    """The model input of a loaded checkpoint (``meta`` of ``load_checkpoint``); upstream's
    for checkpoints without one."""
    extra = (meta or {}).get("extra") or {}
    data = extra.get(CHECKPOINT_KEY)
    if data is None:
        return ModelInput()
    return ModelInput.from_dict(data, where=f"checkpoint entry {CHECKPOINT_KEY!r}")


def image_channels_for(chan: int) -> int:
    """Image channels of ``--chan`` (2: grey = 1, 4: BGR = 3)."""
    if chan not in (2, 4):
        raise InputError(f"--chan must be 2 (grey) or 4 (BGR), got {chan}")
    return 1 if chan == 2 else 3


def check_model_channels(nchan: int, chan: int, model: ModelInput, where: Any = None) -> None:
    """InputError unless the network's ``nchan`` = image channels of ``--chan`` + the
    model's transcript channels."""
    want = image_channels_for(chan) + model.n_transcripts
    if nchan != want:
        raise InputError(
            f"the network takes {nchan} input channels but --chan {chan} gives "
            f"{image_channels_for(chan)} image channel(s) + {model.n_transcripts} transcript "
            f"channel(s) ({model.transcripts.mode} input) = {want}", where)


def training_model_input(roots: Sequence[str | Path | None], *, image_norm: str,
                         diam_mean: float) -> ModelInput:
    """The model input of a training run from its dataset roots' ``sample.json`` files.

    Every sample folder under ``roots`` (train, validation, test) must share one transcript
    input and gene embedding (:func:`GeneSegNet.data.sample_info.common_input`); folders
    without an info file are upstream (heatmap) folders. ``image_norm`` (``--image_norm``):
    "local" uses blocks of :func:`GeneSegNet.data.transforms.norm_scale_for` (``diam_mean``).
    """
    from GeneSegNet.data.dataset import sample_folders

    infos = [(f"{Path(root).name}/{folder.name}", read_sample_info(folder))
             for root in roots if root is not None for folder in sample_folders(root)]
    spec = common_input(infos)
    try:
        check_image_norm(image_norm)
    except ValueError as exc:
        raise InputError(f"--image_norm: {exc}") from None
    scale = norm_scale_for(diam_mean) if image_norm == "local" else 0
    model = ModelInput(spec.transcripts, spec.embedding, spec.pixel_size_um, image_norm, scale)
    logger.info("model input: %s transcript input (%d channel(s)), %s image normalisation%s",
                model.transcripts.mode, model.n_transcripts, image_norm,
                f" on {scale}-px blocks" if scale else "")
    return model
