"""Cut raw images, labels and spot tables into training crops with spot heatmaps.

Reads ``<base_dir>/images``, ``labels`` and ``spots`` (paired by sample name) and writes
upstream's crop layout under ``<save_crop_dir>/<sample>/`` (or under ``train/``, ``val/``
and ``test/`` with ``--split``). Run from anywhere, e.g.::

    python preprocess/Generate_Image_Label_locationMap.py --base_dir raw --save_crop_dir crops
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from GeneSegNet.cli import add_verbose_arg, run_reporting_errors
from GeneSegNet.cli.types import (
    check_split,
    int_range,
    nonnegative_float,
    positive_float,
    positive_int,
)
from GeneSegNet.log import setup_logging

logger = logging.getLogger("GeneSegNet.scripts.Generate_Image_Label_locationMap")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--base_dir", type=Path, default=Path("raw_data"),
                        help="raw dataset with images/, labels/ and spots/")
    parser.add_argument("--save_crop_dir", type=Path, default=Path("preprocessed"),
                        help="output folder for the crops")
    parser.add_argument("--n_crops", type=positive_int, default=100, help="crops per image")
    parser.add_argument("--crop_size", type=int_range(8, 65536), default=256,
                        help="crop side in pixels")
    parser.add_argument("--sigma", type=positive_float, default=7.0,
                        help="heatmap Gaussian sigma (px)")
    parser.add_argument("--seed", type=int, default=1,
                        help="seed of each image's random.Random for crop offsets")
    parser.add_argument("--split", type=nonnegative_float, nargs=3, metavar=("TRAIN", "VAL",
                        "TEST"),
                        help="split whole samples into train/, val/ and test/ by these fractions")
    parser.add_argument("--split_seed", type=int, default=0, help="seed of the split shuffle")
    parser.add_argument("--image_format", choices=("png", "jpg"), default="png",
                        help="crop image format (jpg: upstream's lossy 8-bit JPEG)")
    parser.add_argument("--heatmap_format", choices=("png", "jpg"), default="png",
                        help="heatmap format (jpg: upstream's lossy JPEG)")
    parser.add_argument("--heatmap_context", choices=("global", "crop"), default="global",
                        help="global: spots just outside a crop still count (as in whole-image "
                             "inference); crop: only spots inside the crop (upstream)")
    parser.add_argument("--spot_scale", type=positive_float, default=1.0,
                        help="pixels per spot-coordinate unit (e.g. 4.706 for Xenium microns)")
    parser.add_argument("--no_labels", action="store_true",
                        help="allow a dataset without labels/ (crops without label files)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace sample folders that already exist")
    parser.add_argument("--pixel_size", type=positive_float, default=None,
                        help="µm per image pixel of every sample; must agree with a sample's "
                             "<base_dir>/metadata/<sample>.json when both exist")
    parser.add_argument("--working_pixel_size", type=positive_float, default=None,
                        help="µm/px of the crops (e.g. 0.5 for Xenium's 0.2125): each image, "
                             "its labels and spots are resampled to it before cropping, so "
                             "training runs at it; needs every pixel size")
    parser.add_argument("--transcript_input", choices=("auto", "density", "heatmap"),
                        default="auto",
                        help="network transcript input: density (per-slide scaled transcript "
                             "density + gene channels; needs pixel sizes), heatmap (upstream), "
                             "auto = density when every pixel size is known, else heatmap")
    parser.add_argument("--transcript_sigma_um", type=positive_float, default=None,
                        help="density kernel sigma in µm (default 2.0)")
    parser.add_argument("--gene_channels", type=int_range(0, 64), default=3,
                        help="gene-embedding channels in density mode (0 = density only)")
    add_verbose_arg(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_split(parser, args.split)
    setup_logging(args.verbose)

    def run() -> int:
        from GeneSegNet.data.crops import CropConfig, prepare_dataset
        from GeneSegNet.data.transcripts import DEFAULT_SIGMA_UM
        from GeneSegNet.io.paths import check_output_not_input, raw_input_folders

        check_output_not_input({"--save_crop_dir": args.save_crop_dir},
                               raw_input_folders(args.base_dir))
        config = CropConfig(n_crops=args.n_crops, crop_size=args.crop_size, sigma=args.sigma,
                            seed=args.seed, image_format=args.image_format,
                            heatmap_format=args.heatmap_format,
                            heatmap_context=args.heatmap_context)
        written = prepare_dataset(args.base_dir, args.save_crop_dir, config, split=args.split,
                                  split_seed=args.split_seed, spot_scale=args.spot_scale,
                                  require_labels=not args.no_labels, overwrite=args.overwrite,
                                  progress=True, pixel_size=args.pixel_size,
                                  transcript_input=args.transcript_input,
                                  transcript_sigma_um=(DEFAULT_SIGMA_UM
                                                       if args.transcript_sigma_um is None
                                                       else args.transcript_sigma_um),
                                  gene_channels=args.gene_channels,
                                  working_pixel_size=args.working_pixel_size)
        for folder in written:
            logger.info("wrote %s", folder)
        logger.info("%d sample folder(s) written under %s", len(written), args.save_crop_dir)
        return 0

    return run_reporting_errors(run)


if __name__ == "__main__":
    sys.exit(main())
