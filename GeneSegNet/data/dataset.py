"""Loading preprocessed sample folders (the crop layout written by preprocessing).

A dataset root holds one folder per sample; each sample folder holds the crop layout of
:mod:`GeneSegNet.io.layout`::

    images/{k}_image.{png,jpg,tif}    labels/{k}_label.*    spots/{k}_spot.csv
    HeatMaps/HeatMap_all/{k}_gaumap_all.*          [newlabels/{k}_label.* after refinement]

Files are paired by crop key ``k`` (the name without the role's filter suffix), never by
sorted position. Loading never deletes or rewrites anything (unlike upstream, whose file
listing removed ``newlabels/``).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from GeneSegNet.data.sample_info import read_sample_info
from GeneSegNet.data.transcripts import read_transcript_channels
from GeneSegNet.errors import InputError
from GeneSegNet.io import (
    IMAGE_EXTENSIONS,
    LABEL_EXTENSIONS,
    index_by_sample,
    list_files,
    pair_samples,
    read_image,
    read_label,
    read_spots,
    spot_pixels,
)
from GeneSegNet.io import layout as lay

logger = logging.getLogger(__name__)


@dataclass
class Crop:
    """One training/test crop.

    image : (H, W) grey (chan 2) or (H, W, 3) BGR (chan 4), stored dtype.
    heatmap : (H, W) as stored (uint8 0..255 for our PNG heatmaps).
    labels : (H, W) integer ids or None when the folder has no labels.
    spots_xy : (N, 2) int64 spot pixels, columns (x = col, y = row).
    spot_genes : (N,) gene names aligned with ``spots_xy`` (empty when unknown).
    origin : (row, col) offset in px of the crop in its raw image (``crops.csv``);
        (0, 0) when unknown.
    pixel_size_um : µm per pixel of the raw sample (sample info file); None when unknown.
    transcripts : [C, H, W] float32 transcript channels (density mode); None in upstream
        heatmap mode, where ``heatmap`` is the network's transcript input.
    """

    sample: str
    key: str
    image: np.ndarray
    heatmap: np.ndarray
    labels: np.ndarray | None
    spots_xy: np.ndarray
    image_path: Path
    label_path: Path | None
    spot_genes: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))
    origin: tuple[int, int] = (0, 0)
    pixel_size_um: float | None = None
    transcripts: np.ndarray | None = None

    @property
    def name(self) -> str:
        return f"{self.sample}/{self.key}"


def _crop_spot_pixels(path: Path | None, shape: tuple[int, int]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Pixels of the spots of a crop's spot table that lie inside the (H, W) crop, int64
    [N, 2] with columns (x = col, y = row), by :func:`GeneSegNet.io.spots.spot_pixels`
    (floor; equals upstream's ``int(float())`` inside), and their gene names (N,) object;
    both empty for no table."""
    if path is None:
        return np.zeros((0, 2), np.int64), np.zeros(0, dtype=object)
    spots = read_spots(path, strict=True)
    rows, cols, inside = spot_pixels(spots["x"], spots["y"], shape)
    genes = spots["gene"].to_numpy().astype(str).astype(object)[inside]
    return np.stack([cols, rows], axis=1).astype(np.int64, copy=False), genes


def read_crop_origins(sample_dir: str | Path) -> dict[str, tuple[int, int]]:
    """Crop key -> (row, col) offset in px of the crop in its raw image, from the sample's
    ``crops.csv``; empty when the folder has none (upstream folders)."""
    path = Path(sample_dir) / lay.CROPS_TABLE
    if not path.is_file():
        return {}
    try:
        table = pd.read_csv(path, dtype={"crop": str})
        return {str(k): (int(r), int(c)) for k, r, c in
                zip(table["crop"], table["row_offset"], table["col_offset"], strict=True)}
    except (KeyError, ValueError, OSError, pd.errors.ParserError) as exc:
        raise InputError(f"malformed crop table ({exc}); expected columns crop, row_offset, "
                         "col_offset", path) from exc


def load_sample_folder(sample_dir: str | Path, *, chan: int = 2,
                       img_filter: str = lay.IMAGE_SUFFIX, mask_filter: str = lay.LABEL_SUFFIX,
                       heatmap_filter: str = lay.HEATMAP_ALL_SUFFIX,
                       label_dir: str = lay.LABELS_DIR, require_labels: bool = True) -> list[Crop]:
    """Load every crop of one sample folder, paired by crop key."""
    sample_dir = Path(sample_dir)
    mode = lay.channels_for(chan)
    images_dir, heatmap_dir = sample_dir / lay.IMAGES_DIR, sample_dir / lay.HEATMAP_ALL_DIR
    groups = {"images": index_by_sample(list_files(images_dir, IMAGE_EXTENSIONS),
                                        suffixes=(img_filter,))}
    if not groups["images"]:
        raise InputError(f"no images matching *{img_filter}.*", images_dir)
    groups["heatmaps"] = index_by_sample(list_files(heatmap_dir, IMAGE_EXTENSIONS),
                                         suffixes=(heatmap_filter,))
    if not groups["heatmaps"]:
        raise InputError(f"no gaussian heatmaps matching *{heatmap_filter}.*", heatmap_dir)
    label_path = sample_dir / label_dir
    if label_path.is_dir() and list_files(label_path, LABEL_EXTENSIONS):
        groups["labels"] = index_by_sample(
            [p for p in list_files(label_path, LABEL_EXTENSIONS)
             if not p.name.endswith(lay.LABEL_FLOWS_ENDING)], suffixes=(mask_filter,))
    elif require_labels:
        raise InputError("no label files found", label_path)
    spots_dir = sample_dir / lay.SPOTS_DIR
    if spots_dir.is_dir():
        groups["spots"] = index_by_sample(list_files(spots_dir, (lay.SPOT_TABLE_EXT,)),
                                          suffixes=lay.CROP_SPOT_SUFFIXES)
    required = [r for r in ("images", "heatmaps", "labels") if r in groups]
    info = read_sample_info(sample_dir)
    origins = read_crop_origins(sample_dir)
    density = info is not None and info.transcripts.mode == "density"
    crops = []
    for key, paths in pair_samples(groups, required=required):
        image = read_image(paths["images"], mode)
        heatmap = read_image(paths["heatmaps"], "gray")
        labels = read_label(paths["labels"]) if "labels" in paths else None
        for what, array in (("heatmap", heatmap), ("label", labels)):
            if array is not None and array.shape[:2] != image.shape[:2]:
                raise InputError(f"{what} shape {array.shape[:2]} differs from its image's "
                                 f"{image.shape[:2]} ({paths['images'].name})",
                                 paths["heatmaps" if what == "heatmap" else "labels"])
        spots_xy, genes = _crop_spot_pixels(paths.get("spots"), image.shape[:2])
        transcripts = None
        if density:
            transcripts = _read_crop_transcripts(sample_dir, key, image.shape[:2],
                                                 info.transcripts.n_channels)
        crops.append(Crop(sample_dir.name, key, image, heatmap, labels, spots_xy,
                          paths["images"], paths.get("labels"), spot_genes=genes,
                          origin=origins.get(key, (0, 0)),
                          pixel_size_um=None if info is None else info.pixel_size_um,
                          transcripts=transcripts))
    return sorted(crops, key=lambda c: _natural_key(c.key))


def _read_crop_transcripts(sample_dir: Path, key: str, shape: tuple[int, int],
                           n_channels: int) -> np.ndarray:
    """float32 [C, H, W] stored transcript channels of crop ``key`` (density mode)."""
    path = sample_dir / lay.TRANSCRIPTS_DIR / lay.transcripts_name(key)
    if not path.is_file():
        raise InputError(f"transcript channels of crop {key!r} missing ({lay.SAMPLE_INFO} "
                         "says density mode)", path)
    array = read_transcript_channels(path)
    if array.shape != (n_channels, *shape):
        raise InputError(f"transcript channels have shape {array.shape}, expected "
                         f"{(n_channels, *shape)} ({lay.SAMPLE_INFO})", path)
    return array


def _natural_key(text: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def sample_folders(root: str | Path) -> list[Path]:
    """Sample folders under a dataset root (every sub-folder, natural order)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError("dataset folder not found", root)
    folders = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                     key=lambda p: _natural_key(p.name))
    if not folders:
        raise InputError("no sample folders found (expected <root>/<sample>/images/...)", root)
    return folders


def load_dataset(root: str | Path, *, round_index: int = 1,
                 refined_name: str = lay.REFINED_LABELS_DIR, **kwargs) -> list[Crop]:
    """Load all sample folders of a dataset root; labels follow
    :func:`GeneSegNet.io.layout.label_folder_for_round`.

    Keyword arguments are passed to :func:`load_sample_folder`.
    """
    crops: list[Crop] = []
    for folder in sample_folders(root):
        label_dir = lay.label_folder_for_round(folder, round_index, refined_name)
        crops.extend(load_sample_folder(folder, label_dir=label_dir, **kwargs))
    logger.info("%s: %d crops from %d sample folder(s)", root, len(crops),
                len({c.sample for c in crops}))
    return crops


def network_input(crop: Crop, density: bool | None = None) -> np.ndarray:
    """Stack a crop's image channels and transcript input into (C, H, W) float32,
    unnormalised.

    Image channels first (grey, or B, G, R), then the transcript channels: the crop's
    stored ``transcripts`` [T, H, W] (density mode), else its heatmap (one channel, last).
    ``density``: True requires the stored channels, False uses the heatmap, None (default)
    uses the channels when the crop has them.
    """
    image = crop.image[..., None] if crop.image.ndim == 2 else crop.image
    image = np.moveaxis(image.astype(np.float32), -1, 0)
    if density is None:
        density = crop.transcripts is not None
    if density:
        if crop.transcripts is None:
            raise InputError(f"crop {crop.name} has no transcript channels (its folder was "
                             "preprocessed in heatmap mode) but the model takes density "
                             "input; preprocess with --transcript_input density",
                             crop.image_path)
        transcripts = np.asarray(crop.transcripts, dtype=np.float32)
    else:
        transcripts = crop.heatmap[None].astype(np.float32)
    return np.ascontiguousarray(np.concatenate([image, transcripts]))
