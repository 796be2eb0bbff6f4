"""Write starting labels for a raw-layout sample: the vendor's nuclei rasterised onto the
image grid (--bundle), or a classical nucleus segmentation of the DAPI image (--segment);
optionally expanded by --expand_um µm."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np

from GeneSegNet.cli import add_verbose_arg, run_reporting_errors
from GeneSegNet.cli.types import nonnegative_float, nonnegative_int, positive_float
from GeneSegNet.log import setup_logging

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base_dir", type=Path, required=True, help="raw layout")
    p.add_argument("--sample", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundle", type=Path, help="the vendor's output folder (its nuclei)")
    src.add_argument("--segment", action="store_true",
                     help="segment nuclei in images/<sample>.tif")
    p.add_argument("--platform", choices=("xenium", "merscope", "cosmx"),
                   help="with --bundle (default: the metadata's platform)")
    p.add_argument("--level", type=nonnegative_int, default=None, help="default: as imported")
    p.add_argument("--z", type=nonnegative_int, default=None, help="default: as imported")
    p.add_argument("--fov", type=nonnegative_int, default=None, help="default: as imported")
    p.add_argument("--diameter_um", type=positive_float, default=8.0,
                   help="--segment: typical nucleus diameter (µm)")
    p.add_argument("--expand_um", type=nonnegative_float, default=0.0,
                   help="grow each nucleus by this many µm (into background only)")
    p.add_argument("--tiled", choices=("auto", "yes", "no"), default="auto",
                   help="build the labels tile by tile without the whole label image in "
                   "memory (auto: images above 2^26 px)")
    p.add_argument("--overwrite", action="store_true")
    add_verbose_arg(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def run() -> int:
        import json

        import tifffile

        from GeneSegNet.data.nuclei import expand_labels_um, segment_nuclei
        from GeneSegNet.errors import InputError
        from GeneSegNet.io.images import write_label
        from GeneSegNet.io.metadata import metadata_path, read_metadata
        from GeneSegNet.io.paths import check_output_not_input, check_sample_name
        from GeneSegNet.vendors import NUCLEI_DIR, write_ids
        from GeneSegNet.vendors.common import Staging
        from GeneSegNet.vendors.tiled_labels import (
            segment_tiled,
            use_tiles,
            write_vendor_labels,
        )

        check_sample_name(args.sample)
        check_output_not_input({"--base_dir labels/": args.base_dir / "labels"},
                               {"--bundle": args.bundle})
        meta_file = metadata_path(args.base_dir, args.sample)
        meta = read_metadata(meta_file)
        extra = json.loads(meta_file.read_text(encoding="utf-8"))
        image = args.base_dir / "images" / f"{args.sample}.tif"
        if not image.is_file():
            raise InputError("image not found", image)
        with tifffile.TiffFile(image) as tif:
            shape = tuple(tif.series[0].shape[-2:])
        tiled = {"auto": None, "yes": True, "no": False}[args.tiled]
        out = args.base_dir / "labels" / f"{args.sample}.tif"
        with Staging(overwrite=args.overwrite) as stage:
            labels_tmp = stage.path(out)
            if args.bundle is not None:
                platform = args.platform or meta.platform
                bundle = _open_matching_bundle(args, platform, meta, extra, shape)
                try:
                    ids = write_vendor_labels(bundle, labels_tmp, args.expand_um, tiled)
                finally:
                    bundle.close()
                write_ids(stage.path(args.base_dir / NUCLEI_DIR / f"{args.sample}_ids.csv"),
                          ids)
                source, count = f"{platform} nuclei", len(ids)
            elif use_tiles(shape, tiled):
                count = segment_tiled(image, labels_tmp, meta.pixel_size_um,
                                      args.diameter_um, args.expand_um)
                source = "classical segmentation, tile by tile"
            else:
                labels = segment_nuclei(tifffile.imread(image), meta.pixel_size_um,
                                        args.diameter_um)
                labels = expand_labels_um(labels, args.expand_um, meta.pixel_size_um)
                write_label(labels_tmp, labels)
                source, count = "classical segmentation", int(labels.max(initial=0))
        logger.info("%s: %d labels from %s, expanded by %g µm", out, count, source,
                    args.expand_um)
        return 0

    return run_reporting_errors(run)


def _open_matching_bundle(args: argparse.Namespace, platform: str, meta: Any,
                          extra: dict, shape: tuple[int, ...]) -> Any:
    """Open ``args.bundle`` as imported (level, z, fov of the metadata unless given);
    InputError if its image grid or affine differs from the imported sample's."""
    from GeneSegNet.errors import InputError
    from GeneSegNet.vendors import open_bundle

    done = extra.get("import") or {}
    opts = {"bundle": args.bundle,
            "level": done.get("level", 0) if args.level is None else args.level,
            "z": done.get("z") if args.z is None else args.z,
            "fov": done.get("fov") if args.fov is None else args.fov,
            "pixel_size": meta.pixel_size_um if platform == "cosmx" else None,
            "min_qv": None}
    bundle = open_bundle(platform, **opts)
    try:
        if bundle.nuclei is None:
            raise InputError("the bundle has no nuclei/cell boundaries or masks; use "
                             "--segment", args.bundle)
        if tuple(bundle.image_shape) != tuple(shape) or (
                meta.um_to_px is not None
                and not np.allclose(bundle.affine, np.asarray(meta.um_to_px))):
            raise InputError(f"bundle (image {bundle.image_shape}, affine "
                             f"{bundle.affine.tolist()}) does not match the imported "
                             f"sample ({shape}, {meta.um_to_px}): same --level/--z/"
                             "--fov as at import?", args.bundle)
    except BaseException:
        bundle.close()
        raise
    return bundle
