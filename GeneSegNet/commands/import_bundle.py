"""Import a vendor's output folder (Xenium, MERSCOPE, CosMx) or any image + transcript
table into the raw layout: images/, spots/, controls/, metadata/ (and labels/ from the
vendor's nuclei with --labels)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from GeneSegNet.cli import add_verbose_arg, run_reporting_errors
from GeneSegNet.cli.types import (
    finite_float,
    fraction,
    nonnegative_float,
    nonnegative_int,
    positive_float,
)
from GeneSegNet.log import setup_logging

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("platform", choices=("xenium", "merscope", "cosmx", "generic"))
    p.add_argument("bundle", type=Path, nargs="?", default=None,
                   help="the vendor's output folder (not used by 'generic')")
    p.add_argument("--base_dir", type=Path, required=True, help="raw layout to write into")
    p.add_argument("--sample", required=True, help="sample name of the written files")
    p.add_argument("--labels", action="store_true",
                   help="also write labels/<sample>.tif from the vendor's nuclei / cells")
    p.add_argument("--expand_um", type=nonnegative_float, default=0.0,
                   help="with --labels: grow each label by this many µm")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--max_outside_fraction", type=fraction, default=0.05,
                   help="fail if more than this fraction of transcripts maps outside the image")
    p.add_argument("--compression", default="zlib", choices=("zlib", "none"),
                   help="compression of the written image tiles")
    p.add_argument("--transcripts", type=Path, default=None,
                   help="transcript table (default: the vendor's file in the bundle)")
    p.add_argument("--image", type=Path, default=None,
                   help="DAPI image (generic: required; Xenium: overrides the search)")
    x = p.add_argument_group("Xenium")
    x.add_argument("--level", type=nonnegative_int, default=0,
                   help="pyramid level of the image (Xenium, "
                   "generic); µm -> px then divides by pixel size x 2^level")
    x.add_argument("--min_qv", type=finite_float, default=20.0,
                   help="Xenium: drop transcripts with qv below this (Q20 = 1%% error); "
                   "negative: keep all")
    m = p.add_argument_group("MERSCOPE / Xenium Z stack")
    m.add_argument("--z", type=nonnegative_int, default=None,
                   help="DAPI z plane (default: the middle)")
    c = p.add_argument_group("CosMx")
    c.add_argument("--fov", type=nonnegative_int, default=None,
                   help="import one FOV in its local px (default: stitch all FOVs)")
    c.add_argument("--channel", type=nonnegative_int, default=None,
                   help="DAPI channel of the morphology stack (default: CosMx 4, generic 0)")
    c.add_argument("--positions", type=Path, default=None, help="FOV positions file")
    g = p.add_argument_group("generic (and CosMx pixel size)")
    g.add_argument("--x_col", default="x")
    g.add_argument("--y_col", default="y")
    g.add_argument("--gene_col", default="gene")
    g.add_argument("--um_to_px", type=finite_float, nargs=6, default=None,
                   metavar=("A", "B", "C", "D", "E", "F"),
                   help="x_px = A x + B y + C, y_px = D x + E y + F")
    g.add_argument("--pixel_size", type=positive_float, default=None, help="µm/px")
    g.add_argument("--origin_um", type=finite_float, nargs=2, default=(0.0, 0.0),
                   metavar=("X", "Y"), help="µm position of the image's top-left corner")
    add_verbose_arg(p)
    return p


def bundle_options(args: argparse.Namespace) -> dict:
    """Keyword options of ``open_bundle`` from parsed arguments (shared with
    make_starting_labels)."""
    opts = {"bundle": args.bundle, "level": args.level, "z": args.z,
            "transcripts": args.transcripts, "image": args.image}
    if args.platform == "xenium":
        opts["min_qv"] = None if args.min_qv < 0 else args.min_qv
    if args.platform == "cosmx":
        opts.update(fov=args.fov, pixel_size=args.pixel_size, positions=args.positions)
        if args.channel is not None:
            opts["channel"] = args.channel
    if args.platform == "generic":
        opts.update(x_col=args.x_col, y_col=args.y_col, gene_col=args.gene_col,
                    um_to_px=args.um_to_px, pixel_size=args.pixel_size,
                    origin_um=args.origin_um, channel=args.channel or 0)
    return opts


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def run() -> int:
        from GeneSegNet.errors import InputError
        from GeneSegNet.io.paths import check_output_not_input, check_sample_name, raw_input_folders
        from GeneSegNet.vendors import import_bundle, open_bundle

        if args.platform != "generic" and args.bundle is None:
            raise InputError(f"{args.platform}: give the vendor's output folder")
        check_sample_name(args.sample)
        check_output_not_input(
            {f"--base_dir {p.name}/": p for p in raw_input_folders(args.base_dir)},
            {"bundle": args.bundle, "--transcripts": args.transcripts, "--image": args.image,
             "--positions": getattr(args, "positions", None)},
            replaced=True,
        )
        bundle = open_bundle(args.platform, **bundle_options(args))
        result = import_bundle(bundle, args.base_dir, args.sample, with_labels=args.labels,
                               expand_um=args.expand_um, overwrite=args.overwrite,
                               max_outside_fraction=args.max_outside_fraction,
                               compression=None if args.compression == "none" else "zlib")
        c = result.counts
        logger.info("wrote %s", ", ".join(str(p) for p in result.outputs))
        logger.info("%d spots; controls (kept out of spots) %s; dropped: %d low qv, %d "
                    "outside the image, %d invalid", c.spots, c.controls, c.low_qv,
                    c.outside, c.invalid)
        return 0

    return run_reporting_errors(run)
