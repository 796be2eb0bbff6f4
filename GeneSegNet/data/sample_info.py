"""The per-sample info file of the crop layout: what the crops' network input was built with.

``<root>/<sample>/sample.json`` (name: :data:`GeneSegNet.io.layout.SAMPLE_INFO`), written by
preprocessing next to ``crops.csv``::

    {"pixel_size_um": 0.5 | null,          µm per px of the raw sample (null = unknown)
     "transcripts": {"mode": "density", "sigma_um": 2.0, "n_gene_channels": 3,
                     "heatmap_sigma_px": 7.0},
     "slide_scale": 0.42 | null,           transcripts per µm² (null in heatmap mode)
     "gene_embedding": {...} | null}       GeneEmbedding.to_dict() (null = none)

A folder without the file is an upstream (or older) crop folder: heatmap mode, unknown
pixel size.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from GeneSegNet.data.gene_embedding import GeneEmbedding
from GeneSegNet.data.transcripts import TranscriptInput
from GeneSegNet.errors import InputError
from GeneSegNet.io import layout as lay
from GeneSegNet.io.metadata import check_pixel_size
from GeneSegNet.io.records import write_json

logger = logging.getLogger(__name__)

#: the transcript input of crop folders without an info file (upstream's heatmap)
UPSTREAM_TRANSCRIPTS = TranscriptInput(mode="heatmap", n_gene_channels=0)


@dataclass(frozen=True)
class SampleInfo:
    """What one crop sample folder's network input was built with."""

    pixel_size_um: float | None = None
    transcripts: TranscriptInput = UPSTREAM_TRANSCRIPTS
    slide_scale: float | None = None
    embedding: GeneEmbedding | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"pixel_size_um": self.pixel_size_um,
                "transcripts": self.transcripts.to_dict(),
                "slide_scale": self.slide_scale,
                "gene_embedding": None if self.embedding is None else self.embedding.to_dict()}

    @classmethod
    def from_dict(cls, data: Any, where: str = "sample info") -> SampleInfo:
        if not isinstance(data, dict):
            raise InputError(f"{where}: expected a JSON object")
        try:
            pixel = data.get("pixel_size_um")
            pixel = None if pixel is None else check_pixel_size(pixel, "pixel_size_um")
            transcripts = TranscriptInput.from_dict(data.get("transcripts") or
                                                    UPSTREAM_TRANSCRIPTS.to_dict())
            scale = data.get("slide_scale")
            scale = None if scale is None else float(scale)
            emb = data.get("gene_embedding")
            embedding = None if emb is None else GeneEmbedding.from_dict(emb)
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from exc
        except (TypeError, ValueError) as exc:
            raise InputError(f"{where}: malformed value ({exc})") from exc
        return cls(pixel, transcripts, scale, embedding)


def sample_info_path(sample_dir: str | Path) -> Path:
    return Path(sample_dir) / lay.SAMPLE_INFO


def write_sample_info(sample_dir: str | Path, info: SampleInfo) -> Path:
    """Write ``<sample_dir>/sample.json`` atomically."""
    return write_json(sample_info_path(sample_dir), info.to_dict())


def read_sample_info(sample_dir: str | Path) -> SampleInfo | None:
    """The info of a crop sample folder, or None when it has no info file (upstream)."""
    path = sample_info_path(sample_dir)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read sample info ({exc.strerror or exc})", path) from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"sample info is not valid JSON ({exc})", path) from exc
    return SampleInfo.from_dict(data, where=str(path))


def same_embedding(a: GeneEmbedding | None, b: GeneEmbedding | None) -> bool:
    """True when both are None or equal (same genes, vectors within 1e-9, same bin)."""
    if a is None or b is None:
        return a is b
    import numpy as np

    return (a.genes == b.genes and a.vectors.shape == b.vectors.shape
            and bool(np.allclose(a.vectors, b.vectors, rtol=0, atol=1e-9))
            and a.bin_um == b.bin_um)


@dataclass(frozen=True)
class InputSpec:
    """The transcript input shared by all samples of a training set (stored in the model).

    ``pixel_size_um``: the training pixel size (the first known one; samples may differ).
    """

    transcripts: TranscriptInput = UPSTREAM_TRANSCRIPTS
    embedding: GeneEmbedding | None = None
    pixel_size_um: float | None = None


def common_input(infos: Sequence[tuple[str, SampleInfo | None]]) -> InputSpec:
    """The transcript input all named samples agree on; InputError naming the first sample
    that differs (transcript config or embedding). Pixel sizes may differ; in density mode
    every sample needs one."""
    if not infos:
        return InputSpec()
    resolved = [(name, info or SampleInfo()) for name, info in infos]
    first_name, first = resolved[0]
    for name, info in resolved[1:]:
        if info.transcripts != first.transcripts:
            raise InputError(f"sample {name!r} was preprocessed with transcript input "
                             f"{info.transcripts.to_dict()} but {first_name!r} with "
                             f"{first.transcripts.to_dict()}; preprocess all samples in one run")
        if not same_embedding(info.embedding, first.embedding):
            raise InputError(f"samples {first_name!r} and {name!r} have different gene "
                             "embeddings; preprocess all samples in one run")
    if first.transcripts.needs_slide_scale:
        for name, info in resolved:
            if info.pixel_size_um is None:
                raise InputError(f"sample {name!r}: transcript input "
                                 f"{first.transcripts.mode!r} needs a pixel size but its "
                                 f"{lay.SAMPLE_INFO} has none (preprocess with --pixel_size)")
    pixels = sorted({info.pixel_size_um for _, info in resolved if info.pixel_size_um})
    if len(pixels) > 1:
        logger.warning("training samples have different pixel sizes %s µm/px", pixels)
    pixel = next((i.pixel_size_um for _, i in resolved if i.pixel_size_um is not None), None)
    return InputSpec(first.transcripts, first.embedding, pixel)
