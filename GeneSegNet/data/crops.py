"""Cut raw images, labels and spot tables into training crops with spot heatmaps.

Output layout per raw sample ``<name>`` (upstream's, spec §1.4; names from
:mod:`GeneSegNet.io.layout`, which the reader :mod:`GeneSegNet.data.dataset` uses too)::

    <out>/<name>/images/{i}_image.png          image crop (stored bit depth, lossless)
    <out>/<name>/labels/{i}_label.png          label crop (8/16-bit PNG, 32-bit TIFF if needed)
    <out>/<name>/spots/{i}_spot.csv            spotX,spotY,gene in crop pixels (integers)
    <out>/<name>/HeatMaps/HeatMap_all/{i}_gaumap_all.png   network input: all spots
    <out>/<name>/HeatMaps/HeatMap/{i}_gaumap.png           spots on labelled pixels only
    <out>/<name>/crops.csv                     crop index and (row, col) offsets
    <out>/<name>/HeatMaps/Transcripts/{i}_transcripts.tif  density mode: [C, H, W] float32
    <out>/<name>/sample.json                   pixel size, transcript input, slide scale,
                                               gene embedding (:mod:`GeneSegNet.data.sample_info`)

Transcript input (one mode per run, :func:`choose_transcript_input`): "density" renders
:func:`GeneSegNet.data.transcripts.transcript_channels` of each crop from the raw sample's
whole spot table at the crop's origin (spots just outside count), on the sample's slide
scale (one per raw sample, from its whole table), with gene channels from one embedding
learnt on the train-split samples of the run; "heatmap" is upstream's input only. The
upstream ``HeatMap_all`` PNGs are written in both modes.

Crop offsets reproduce upstream's draws: for every image a fresh ``random.Random(seed)``
draws ``row = randint(0, H - size)`` then ``col = randint(0, W - size)`` per crop.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from GeneSegNet.data.gene_embedding import GeneEmbedding, learn_gene_embedding
from GeneSegNet.data.heatmap import DEFAULT_SIGMA, heatmap_to_uint8, render_heatmap
from GeneSegNet.data.resample import (
    require_pixel_sizes,
    resample_image,
    resample_labels,
    scale_spots,
    working_shape,
)
from GeneSegNet.data.sample_info import (
    UPSTREAM_TRANSCRIPTS,
    SampleInfo,
    write_sample_info,
)
from GeneSegNet.data.transcripts import (
    DEFAULT_SIGMA_UM,
    TranscriptInput,
    check_sigma,
    slide_density_scale,
    transcript_channels,
    write_transcript_channels,
)
from GeneSegNet.errors import InputError
from GeneSegNet.io import (
    IMAGE_EXTENSIONS,
    LABEL_EXTENSIONS,
    SPOT_EXTENSIONS,
    index_by_sample,
    list_files,
    pair_samples,
    read_image,
    read_label,
    read_spots,
    spot_pixels,
    staged_directory,
    write_image,
    write_label,
    write_spots,
)
from GeneSegNet.io import layout as lay
from GeneSegNet.io.atomic import atomic_path
from GeneSegNet.io.image_limits import to_png_storable
from GeneSegNet.io.metadata import check_pixel_size, metadata_path, resolve_pixel_size
from GeneSegNet.io.paths import check_output_not_input, raw_input_folders

logger = logging.getLogger(__name__)

HEATMAP_CONTEXTS = ("global", "crop")
TRANSCRIPT_CHOICES = ("auto", "density", "heatmap")  # --transcript_input
DEFAULT_GENE_CHANNELS = 3  # --gene_channels


@dataclass(frozen=True)
class CropConfig:
    """How to cut one raw sample into crops.

    heatmap_context: "global" renders each crop's heatmap from every spot of the image
    (spots just outside the crop still count, as in whole-image inference); "crop" uses
    only the spots inside the crop (upstream).
    """

    n_crops: int = 100
    crop_size: int = 256
    sigma: float = DEFAULT_SIGMA
    seed: int = 1
    image_format: str = "png"
    heatmap_format: str = "png"
    heatmap_context: str = "global"
    write_incell_heatmap: bool = True


@dataclass
class RawSample:
    """One raw sample: a whole image, its label image (optional) and its spots."""

    name: str
    image: np.ndarray  # (H, W) or (H, W, C), stored dtype
    labels: np.ndarray | None  # (H, W) integer ids
    spots: pd.DataFrame  # columns x (col), y (row), gene
    paths: dict[str, Path]


def discover_raw_samples(base_dir: str | Path, require_labels: bool = True
                         ) -> list[tuple[str, dict[str, Path]]]:
    """Pair ``images/``, ``labels/`` and ``spots/`` of a raw dataset by sample name.

    A missing ``labels/`` folder is allowed when ``require_labels`` is false.
    """
    base_dir = Path(base_dir)
    if not base_dir.is_dir():
        raise InputError("dataset folder not found", base_dir)
    groups = {
        "images": index_by_sample(list_files(base_dir / lay.IMAGES_DIR, IMAGE_EXTENSIONS),
                                  suffixes=lay.RAW_IMAGE_SUFFIXES),
        "spots": index_by_sample(list_files(base_dir / lay.SPOTS_DIR, SPOT_EXTENSIONS),
                                 suffixes=lay.RAW_SPOT_SUFFIXES),
    }
    if (base_dir / lay.LABELS_DIR).is_dir() or require_labels:
        groups["labels"] = index_by_sample(
            list_files(base_dir / lay.LABELS_DIR, LABEL_EXTENSIONS),
            prefixes=lay.RAW_LABEL_PREFIXES, suffixes=lay.RAW_LABEL_SUFFIXES,
            prefer=LABEL_EXTENSIONS)
    if not groups["images"]:
        raise InputError("no images found (expected png, jpg, jpeg, tif or tiff files)",
                         base_dir / lay.IMAGES_DIR)
    return pair_samples(groups)


def load_raw_sample(name: str, paths: dict[str, Path], min_size: int = 0,
                    spot_scale: float = 1.0) -> RawSample:
    """Read and check one raw sample; each file is read once.

    ``spot_scale`` converts spot coordinates to pixels (pixels per stored unit).
    """
    image = read_image(paths["images"], mode="unchanged")
    height, width = image.shape[:2]
    if min(height, width) < min_size:
        raise InputError(f"image is {height}×{width} px, smaller than the {min_size} px crop",
                         paths["images"])
    labels = None
    if "labels" in paths:
        labels = read_label(paths["labels"])
        if labels.shape != (height, width):
            raise InputError(f"label shape {labels.shape} differs from its image's "
                             f"{(height, width)} ({paths['images'].name})", paths["labels"])
    spots = read_spots(paths["spots"], scale=spot_scale, strict=True)
    return RawSample(name, image, labels, spots, dict(paths))


def resample_sample(sample: RawSample, pixel_size_um: float, working_pixel_size_um: float,
                    min_size: int = 0) -> RawSample:
    """``sample`` at ``working_pixel_size_um`` (µm/px): image linearly (area-averaged when
    shrinking), labels by nearest pixel centre, spot coordinates scaled
    (:mod:`GeneSegNet.data.resample`)."""
    shape = sample.image.shape[:2]
    new_shape = working_shape(shape, pixel_size_um, working_pixel_size_um)
    if min(new_shape) < min_size:
        raise InputError(f"image is {new_shape[0]}×{new_shape[1]} px at {working_pixel_size_um} "
                         f"µm/px, smaller than the {min_size} px crop", sample.paths["images"])
    x, y = scale_spots(sample.spots["x"], sample.spots["y"], shape, new_shape)
    labels = None if sample.labels is None else resample_labels(sample.labels, new_shape)
    logger.info("%s: resampled %d×%d px at %.4g µm/px to %d×%d px at %.4g µm/px", sample.name,
                shape[1], shape[0], pixel_size_um, new_shape[1], new_shape[0],
                working_pixel_size_um)
    return RawSample(sample.name, resample_image(sample.image, new_shape), labels,
                     sample.spots.assign(x=x, y=y), sample.paths)


def crop_offsets(height: int, width: int, crop_size: int, n_crops: int, seed: int
                 ) -> list[tuple[int, int]]:
    """Upstream's crop offsets: (row, col) pairs drawn from ``random.Random(seed)``."""
    draw = random.Random(seed)
    offsets = []
    for _ in range(n_crops):
        row = draw.randint(0, height - crop_size)
        col = draw.randint(0, width - crop_size)
        offsets.append((row, col))
    return offsets


def _to_8bit(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.uint16:
        return (image >> 8).astype(np.uint8)
    # floats in [0, 1] and wide integers are scaled (non-finite pixels become 0)
    return (to_png_storable(image) >> 8).astype(np.uint8)


def write_sample_crops(sample: RawSample, out_dir: str | Path, config: CropConfig,
                       overwrite: bool = False, *, transcripts: TranscriptInput | None = None,
                       pixel_size_um: float | None = None,
                       embedding: GeneEmbedding | None = None) -> Path:
    """Write all crops of ``sample`` into ``out_dir/<name>``, with its ``sample.json``.

    ``transcripts``: the run's transcript input (None: upstream heatmap only); in density
    mode ``pixel_size_um`` (µm/px) is required and the slide scale is computed here from
    the sample's whole spot table. ``embedding``: the run's gene embedding (needed for
    gene channels).

    The folder is built under a temporary name and renamed when complete, so a failure
    never leaves a half-written sample folder. An existing folder is replaced only with
    ``overwrite``.
    """
    final = Path(out_dir) / sample.name
    if final.exists() and not overwrite:
        raise InputError("output folder already exists (use --overwrite to replace it)", final)
    info = sample_info_for(sample, transcripts or UPSTREAM_TRANSCRIPTS, pixel_size_um,
                           embedding)
    with staged_directory(final, overwrite=overwrite) as stage:
        _write_crops(sample, stage, config, info)
        write_sample_info(stage, info)
    return final


def sample_info_for(sample: RawSample, transcripts: TranscriptInput,
                    pixel_size_um: float | None, embedding: GeneEmbedding | None
                    ) -> SampleInfo:
    """The info of one raw sample: its slide scale (transcripts per µm², from every spot
    inside its image, as whole-slide inference computes it) when the input needs one."""
    scale = None
    if transcripts.needs_slide_scale:
        if pixel_size_um is None:
            raise InputError(f"transcript input {transcripts.mode!r} needs the pixel size of "
                             f"{sample.name!r} (--pixel_size or "
                             f"{metadata_path('<base_dir>', sample.name)})",
                             sample.paths.get("images"))
        height, width = sample.image.shape[:2]
        rows, cols, _ = spot_pixels(sample.spots["x"], sample.spots["y"], (height, width))
        scale = slide_density_scale(rows, cols, pixel_size_um=pixel_size_um,
                                    sigma_um=transcripts.sigma_um)
    return SampleInfo(pixel_size_um, transcripts, scale,
                      embedding if transcripts.n_gene_channels > 0 else None)


def choose_transcript_input(pixel_sizes: dict[str, float | None], choice: str = "auto", *,
                            sigma_um: float = DEFAULT_SIGMA_UM,
                            gene_channels: int = DEFAULT_GENE_CHANNELS,
                            base_dir: str | Path | None = None) -> TranscriptInput:
    """The one transcript input of a preprocessing run (``--transcript_input``).

    ``choice`` "auto": density when every sample's pixel size is known, else upstream's
    heatmap (with a warning); "density": every pixel size must be known (else InputError
    naming the metadata file and ``--pixel_size``); "heatmap": upstream's input, without
    gene channels. ``gene_channels`` (``--gene_channels``): gene-embedding channels in
    density mode (0 = density only).
    """
    if choice not in TRANSCRIPT_CHOICES:
        raise InputError(f"--transcript_input must be one of {TRANSCRIPT_CHOICES}, "
                         f"got {choice!r}")
    if int(gene_channels) != gene_channels or gene_channels < 0:
        raise InputError(f"--gene_channels must be an integer >= 0, got {gene_channels!r}")
    sigma_um = check_sigma(sigma_um, "--transcript_sigma_um")
    unknown = sorted(name for name, pixel in pixel_sizes.items() if pixel is None)
    if choice == "auto":
        choice = "heatmap" if unknown else "density"
        if unknown:
            logger.warning(
                "no pixel size for sample(s) %s (give --pixel_size or write %s): using "
                "upstream's heatmap transcript input for the whole run", ", ".join(unknown[:5]),
                metadata_path(base_dir or "<base_dir>", unknown[0]))
    if choice == "heatmap":
        if gene_channels:
            logger.info("heatmap transcript input: no gene channels (they need density mode)")
        return UPSTREAM_TRANSCRIPTS
    if unknown:
        raise InputError(f"--transcript_input density needs the pixel size of every sample; "
                         f"none for {', '.join(unknown[:5])}: give --pixel_size (µm/px) or "
                         "write a metadata file",
                         metadata_path(base_dir or "<base_dir>", unknown[0]))
    return TranscriptInput(mode="density", sigma_um=sigma_um,
                           n_gene_channels=int(gene_channels))


def learn_run_embedding(samples: list[tuple[str, dict[str, Path]]],
                        pixel_sizes: dict[str, float | None], n_components: int, *,
                        spot_scale: float = 1.0) -> GeneEmbedding:
    """The run's gene embedding from the spot tables of ``samples`` (positions in µm, so
    samples of different pixel sizes pool correctly)."""
    tables = []
    for name, paths in samples:
        table = read_spots(paths["spots"], scale=spot_scale, strict=True)
        pixel = check_pixel_size(pixel_sizes[name], f"pixel size of {name}")
        tables.append(table.assign(x=table["x"] * pixel, y=table["y"] * pixel))
    try:
        embedding = learn_gene_embedding(tables, 1.0, n_components=n_components)
    except InputError as exc:
        raise InputError(f"--gene_channels {n_components}: {exc}") from None
    logger.info("gene embedding learnt on %d sample(s): %s", len(samples),
                ", ".join(name for name, _ in samples[:5]))
    return embedding


def _write_crops(sample: RawSample, folder: Path, config: CropConfig,
                 info: SampleInfo) -> None:
    height, width = sample.image.shape[:2]
    size = config.crop_size
    offsets = crop_offsets(height, width, size, config.n_crops, config.seed)
    rows, cols, in_image = spot_pixels(sample.spots["x"], sample.spots["y"], (height, width))
    genes = sample.spots["gene"].to_numpy()[in_image]
    density = info.transcripts.mode == "density"
    codes = None if info.embedding is None else info.embedding.encode(genes)
    if density:
        (folder / lay.TRANSCRIPTS_DIR).mkdir(parents=True)
    image = sample.image if config.image_format == "png" else _to_8bit(sample.image)
    heat_ext = config.heatmap_format
    for sub in (lay.IMAGES_DIR, lay.LABELS_DIR, lay.SPOTS_DIR, lay.HEATMAP_ALL_DIR,
                lay.HEATMAP_IN_CELL_DIR):
        (folder / sub).mkdir(parents=True)
    for i, (r0, c0) in enumerate(offsets):
        inside = (rows >= r0) & (rows < r0 + size) & (cols >= c0) & (cols < c0 + size)
        cr, cc = rows[inside] - r0, cols[inside] - c0
        write_image(folder / lay.IMAGES_DIR / lay.image_name(i, config.image_format),
                    image[r0: r0 + size, c0: c0 + size])
        write_spots(folder / lay.SPOTS_DIR / lay.spot_name(i), cc, cr, genes[inside])
        if config.heatmap_context == "global":
            heat = render_heatmap(rows, cols, (size, size), config.sigma, origin=(r0, c0))
        else:
            heat = render_heatmap(cr, cc, (size, size), config.sigma)
        write_image(folder / lay.HEATMAP_ALL_DIR / lay.heatmap_name(i, heat_ext),
                    heatmap_to_uint8(heat))
        if density:
            channels = transcript_channels(
                rows, cols, codes, (size, size), info.transcripts,
                pixel_size_um=info.pixel_size_um, slide_scale=info.slide_scale,
                embedding=info.embedding, origin=(r0, c0))
            write_transcript_channels(folder / lay.TRANSCRIPTS_DIR / lay.transcripts_name(i),
                                      channels)
        if sample.labels is None:
            continue
        label_crop = sample.labels[r0: r0 + size, c0: c0 + size]
        write_label(folder / lay.LABELS_DIR / lay.label_name(i, "png"), label_crop)
        if config.write_incell_heatmap:
            in_cell = label_crop[cr, cc] != 0
            heat = render_heatmap(cr[in_cell], cc[in_cell], (size, size), config.sigma)
            write_image(folder / lay.HEATMAP_IN_CELL_DIR / lay.in_cell_heatmap_name(i, heat_ext),
                        heatmap_to_uint8(heat))
    with atomic_path(folder / lay.CROPS_TABLE) as tmp:
        pd.DataFrame({"crop": range(len(offsets)), "row_offset": [o[0] for o in offsets],
                      "col_offset": [o[1] for o in offsets]}).to_csv(tmp, index=False)


def split_samples(names: list[str], fractions: tuple[float, float, float], seed: int = 1
                  ) -> dict[str, str]:
    """Assign whole samples to "train", "val" and "test" by the given fractions.

    Counts are the largest-remainder rounding of ``fractions × len(names)``; every split
    with a non-zero fraction gets at least one sample when there are enough samples. The
    assignment is a seeded shuffle, so it is reproducible.
    """
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.shape != (3,) or np.any(fr < 0) or fr.sum() <= 0:
        raise ValueError(f"split fractions must be three non-negative numbers, got {fractions}")
    fr = fr / fr.sum()
    n = len(names)
    exact = fr * n
    counts = np.floor(exact).astype(int)
    for k in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[k] += 1
    if n >= int((fr > 0).sum()):
        for k in np.flatnonzero((fr > 0) & (counts == 0)):
            donor = int(np.argmax(counts))
            counts[donor] -= 1
            counts[k] += 1
    order = sorted(names)
    random.Random(seed).shuffle(order)
    splits = ["train"] * counts[0] + ["val"] * counts[1] + ["test"] * counts[2]
    return dict(zip(order, splits, strict=True))


def prepare_dataset(base_dir: str | Path, save_dir: str | Path, config: CropConfig, *,
                    split: tuple[float, float, float] | None = None, split_seed: int = 0,
                    spot_scale: float = 1.0, require_labels: bool = True,
                    overwrite: bool = False, progress: bool = False,
                    pixel_size: float | None = None, transcript_input: str = "auto",
                    transcript_sigma_um: float = DEFAULT_SIGMA_UM,
                    gene_channels: int = DEFAULT_GENE_CHANNELS,
                    working_pixel_size: float | None = None) -> list[Path]:
    """Crop every raw sample of ``base_dir`` into ``save_dir`` (optionally split).

    ``pixel_size`` (µm/px, ``--pixel_size``) must agree with a sample's metadata file
    ``<base_dir>/metadata/<sample>.json`` when both exist; ``transcript_input``,
    ``transcript_sigma_um`` and ``gene_channels``: see :func:`choose_transcript_input`.
    The gene embedding is learnt once, from the train-split samples (all without a split).
    ``working_pixel_size`` (µm/px): every sample is resampled to it before cropping
    (:func:`resample_sample`), and its crops record that pixel size.

    All pairing, pixel-size and output-collision checks run before anything is written;
    each sample folder is then written completely or not at all. Returns the sample
    folders written.
    """
    from tqdm import tqdm

    if config.heatmap_context not in HEATMAP_CONTEXTS:
        raise ValueError(f"heatmap_context must be one of {HEATMAP_CONTEXTS}")
    if config.n_crops < 1 or config.crop_size < 8:
        raise ValueError("n_crops must be ≥ 1 and crop_size ≥ 8")
    samples = discover_raw_samples(base_dir, require_labels=require_labels)
    names = [name for name, _ in samples]
    assignment = split_samples(names, split, split_seed) if split else {}
    save_dir = Path(save_dir)
    targets = {name: save_dir / assignment.get(name, "") for name in names}
    if not overwrite:
        taken = [str(targets[n] / n) for n in names if (targets[n] / n).exists()]
        if taken:
            raise InputError(f"output sample folder(s) already exist: {', '.join(taken[:5])} "
                             "(use --overwrite to replace them)")
    for name in names:  # a sample folder that is replaced must not be or hold raw inputs
        check_output_not_input({"sample folder": targets[name] / name},
                               raw_input_folders(base_dir), replaced=True)
    pixel_sizes = {name: resolve_pixel_size(base_dir, name, pixel_size) for name in names}
    if working_pixel_size is not None:
        require_pixel_sizes(pixel_sizes, Path(base_dir))
    transcripts = choose_transcript_input(pixel_sizes, transcript_input,
                                          sigma_um=transcript_sigma_um,
                                          gene_channels=gene_channels, base_dir=base_dir)
    embedding = None
    if transcripts.n_gene_channels > 0:
        train = [(n, p) for n, p in samples if assignment.get(n, "train") == "train"]
        embedding = learn_run_embedding(train or samples, pixel_sizes,
                                        transcripts.n_gene_channels, spot_scale=spot_scale)
    logger.info("transcript input: %s", transcripts)
    written = []
    for name, paths in tqdm(samples, desc="samples", disable=not progress):
        pixel = pixel_sizes[name]
        if working_pixel_size is None:
            sample = load_raw_sample(name, paths, min_size=config.crop_size,
                                     spot_scale=spot_scale)
        else:
            sample = resample_sample(load_raw_sample(name, paths, spot_scale=spot_scale),
                                     pixel, working_pixel_size, min_size=config.crop_size)
            pixel = working_pixel_size
        written.append(write_sample_crops(sample, targets[name], config, overwrite=overwrite,
                                          transcripts=transcripts,
                                          pixel_size_um=pixel, embedding=embedding))
        logger.debug("%s: %d spots, %d crops -> %s", name, len(sample.spots), config.n_crops,
                     written[-1])
    return written
