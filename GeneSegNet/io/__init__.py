"""File I/O: images, label images, spot tables, sample pairing and atomic writes."""

from GeneSegNet.io.atomic import atomic_path, staged_directory
from GeneSegNet.io.images import (
    IMAGE_EXTENSIONS,
    LABEL_EXTENSIONS,
    read_image,
    read_label,
    write_image,
    write_label,
)
from GeneSegNet.io.pairing import (
    index_by_sample,
    list_files,
    pair_samples,
    sample_name,
    strip_extension,
)
from GeneSegNet.io.spots import SPOT_EXTENSIONS, read_spots, spot_pixels, write_spots

__all__ = [
    "IMAGE_EXTENSIONS",
    "LABEL_EXTENSIONS",
    "SPOT_EXTENSIONS",
    "atomic_path",
    "index_by_sample",
    "list_files",
    "pair_samples",
    "read_image",
    "read_label",
    "read_spots",
    "sample_name",
    "spot_pixels",
    "staged_directory",
    "strip_extension",
    "write_image",
    "write_label",
    "write_spots",
]
