"""Export every sample of a folder of label images (``Analysis/generate_MappingRelationships.py
--outputs``): pairs labels, spot tables and (optionally) images by sample name, as
:func:`GeneSegNet.mapping.map_dataset` does, and writes the requested outputs."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from GeneSegNet.errors import InputError

logger = logging.getLogger(__name__)


def export_dataset(label_dir: str | Path, spot_dir: str | Path, save_dir: str | Path,
                   outputs: Iterable[str] | str, *, image_dir: str | Path | None = None,
                   pixel_size_um: float | None = None, metadata_dir: str | Path | None = None,
                   out_of_bounds: str = "background", spot_scale: float = 1.0,
                   progress: bool = False) -> list[tuple[str, dict[str, list[Path]]]]:
    """For each sample: read ``label_<name>``, ``<name>.csv`` and, with ``image_dir``, the
    image ``<name>.*`` (mean DAPI and chromatin features), then
    :func:`GeneSegNet.export.sample.write_sample_outputs` into ``save_dir``.

    The pixel size comes from ``<metadata_dir>/metadata/<name>.json`` and/or
    ``pixel_size_um`` (they must agree). Without a probability map the CSV carries the
    distance and nearest-cell columns only.
    """
    from tqdm import tqdm

    from GeneSegNet.export.sample import SampleOutput, check_export_settings, write_sample_outputs
    from GeneSegNet.io import (
        IMAGE_EXTENSIONS,
        index_by_sample,
        list_files,
        read_image,
        read_label,
        read_spots,
    )
    from GeneSegNet.io.metadata import resolve_pixel_size
    from GeneSegNet.mapping import label_spot_pairs

    pairs = label_spot_pairs(label_dir, spot_dir)
    images = {} if image_dir is None else index_by_sample(list_files(image_dir,
                                                                     IMAGE_EXTENSIONS))
    pixel_sizes = {name: resolve_pixel_size(metadata_dir, name, pixel_size_um)
                   for name, _ in pairs}
    kinds = check_export_settings(outputs, pixel_sizes)
    done = []
    for name, paths in tqdm(pairs, desc="samples", disable=not progress):
        labels = read_label(paths["labels"])
        image = None
        if name in images:
            image = read_image(images[name], "gray")
            if image.shape[:2] != labels.shape:
                raise InputError(f"image is {image.shape[:2]} px but its label image "
                                 f"{paths['labels']} is {labels.shape}", images[name])
        elif image_dir is not None:
            logger.warning("%s: no image in %s; mean_dapi and chromatin features are NaN",
                           name, image_dir)
        spots = read_spots(paths["spots"], scale=spot_scale, strict=False)
        sample = SampleOutput(labels, image, pixel_sizes[name],
                              settings={"label_file": str(paths["labels"]),
                                        "spot_file": str(paths["spots"]),
                                        "spot_scale": spot_scale})
        done.append((name, write_sample_outputs(sample, spots, save_dir, name, kinds,
                                                out_of_bounds=out_of_bounds)))
    return done
