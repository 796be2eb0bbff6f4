"""The on-disk layout of datasets: the one place that names folders, suffixes and affixes.

Preprocessed (crop) layout, written by :mod:`GeneSegNet.data.crops` and read by
:mod:`GeneSegNet.data.dataset` (upstream's, spec §1.4)::

    <root>/<sample>/images/{k}_image.<ext>                   image crop
    <root>/<sample>/labels/{k}_label.<ext>                   label crop (original labels)
    <root>/<sample>/spots/{k}_spot.csv                       spotX,spotY,gene in crop pixels
    <root>/<sample>/HeatMaps/HeatMap_all/{k}_gaumap_all.<ext>  network input: all spots
    <root>/<sample>/HeatMaps/HeatMap/{k}_gaumap.<ext>          spots on labelled pixels only
    <root>/<sample>/HeatMaps/Transcripts/{k}_transcripts.tif  density-mode network input
                                                             ([C, H, W] float32 TIFF)
    <root>/<sample>/crops.csv                                crop key and (row, col) offsets
    <root>/<sample>/sample.json                              per-sample info: pixel size,
                                                             transcript input, slide scale,
                                                             gene embedding
    <root>/<sample>/newlabels/{k}_label.<ext>                refined labels (training rounds)

``k`` is the crop key. Files of one crop are paired by key, never by sorted position.

Raw layout (preprocessing and transcript-mapping input): ``images/``, ``labels/`` and
``spots/`` folders whose files pair by sample name once the role's affixes below are
removed (``label_<name>.png`` as written by the inference script, ``<name>_masks.tif``,
``<name>_spots.csv``...).

This module imports only the standard library.
"""

from __future__ import annotations

from pathlib import Path

# ---- crop layout: folders (relative to a sample folder)
IMAGES_DIR = "images"
LABELS_DIR = "labels"
SPOTS_DIR = "spots"
HEATMAPS_DIR = "HeatMaps"
HEATMAP_ALL_DIR = Path(HEATMAPS_DIR) / "HeatMap_all"  # the network's heatmap input
HEATMAP_IN_CELL_DIR = Path(HEATMAPS_DIR) / "HeatMap"  # spots on labelled pixels only
REFINED_LABELS_DIR = "newlabels"  # default name of the refined-label folder
TRANSCRIPTS_DIR = Path(HEATMAPS_DIR) / "Transcripts"  # density-mode transcript channels
CROPS_TABLE = "crops.csv"
SAMPLE_INFO = "sample.json"  # per-sample info file (pixel size, transcript input...)
# names inside a sample folder that hold inputs (outputs must never go there)
INPUT_FOLDERS = frozenset({IMAGES_DIR, LABELS_DIR, SPOTS_DIR, HEATMAPS_DIR, REFINED_LABELS_DIR})

# ---- crop layout: file-name suffixes (the stem is "{k}{suffix}")
IMAGE_SUFFIX = "_image"
LABEL_SUFFIX = "_label"
SPOT_SUFFIX = "_spot"
HEATMAP_ALL_SUFFIX = "_gaumap_all"
HEATMAP_IN_CELL_SUFFIX = "_gaumap"
TRANSCRIPTS_SUFFIX = "_transcripts"
TRANSCRIPTS_EXT = ".tif"
CROP_SPOT_SUFFIXES = (SPOT_SUFFIX, "_spots")  # accepted when reading crop spot tables
SPOT_TABLE_EXT = ".csv"
LABEL_FLOWS_ENDING = "_flows.tif"  # upstream's flow files next to labels: not label images

# ---- raw layout: affixes removed from a raw file's stem to get its sample name
RAW_IMAGE_SUFFIXES = (IMAGE_SUFFIX,)
RAW_LABEL_PREFIXES = ("label_",)
# the first matching affix is removed: a suffix comes before any suffix that ends it
# ("_cp_masks" before "_masks", else "x_cp_masks" would be sample "x_cp")
RAW_LABEL_SUFFIXES = ("_cp_masks", "_labels", LABEL_SUFFIX, "_masks", "_mask")
RAW_SPOT_SUFFIXES = ("_spots", SPOT_SUFFIX)


def image_name(key: str | int, ext: str = "png") -> str:
    """``{k}_image.{ext}``: file name of crop ``key``'s image."""
    return f"{key}{IMAGE_SUFFIX}.{ext.lstrip('.')}"


def label_name(key: str | int, ext: str = "png") -> str:
    """``{k}_label.{ext}``: file name of crop ``key``'s label image."""
    return f"{key}{LABEL_SUFFIX}.{ext.lstrip('.')}"


def spot_name(key: str | int) -> str:
    """``{k}_spot.csv``: file name of crop ``key``'s spot table."""
    return f"{key}{SPOT_SUFFIX}{SPOT_TABLE_EXT}"


def heatmap_name(key: str | int, ext: str = "png") -> str:
    """``{k}_gaumap_all.{ext}``: file name of crop ``key``'s network heatmap."""
    return f"{key}{HEATMAP_ALL_SUFFIX}.{ext.lstrip('.')}"


def in_cell_heatmap_name(key: str | int, ext: str = "png") -> str:
    """``{k}_gaumap.{ext}``: file name of crop ``key``'s in-cell heatmap."""
    return f"{key}{HEATMAP_IN_CELL_SUFFIX}.{ext.lstrip('.')}"


def transcripts_name(key: str | int) -> str:
    """``{k}_transcripts.tif``: file name of crop ``key``'s transcript channels."""
    return f"{key}{TRANSCRIPTS_SUFFIX}{TRANSCRIPTS_EXT}"


def label_folder_for_round(
    sample_dir: str | Path, round_index: int, refined_name: str = REFINED_LABELS_DIR
) -> str:
    """Folder name (in ``sample_dir``) that round ``round_index`` (1-based) reads labels
    from: ``labels`` in round 1, the previous round's refined labels afterwards when that
    folder exists."""
    if round_index >= 2 and (Path(sample_dir) / refined_name).is_dir():
        return refined_name
    return LABELS_DIR


def channels_for(chan: int) -> str:
    """Image read mode for the ``--chan`` setting: 2 = grey + heatmap (``"gray"``),
    4 = BGR + heatmap (``"color"``). Raises ValueError otherwise."""
    if chan == 2:
        return "gray"
    if chan == 4:
        return "color"
    raise ValueError(f"--chan must be 2 (grey + heatmap) or 4 (BGR + heatmap), got {chan}")
