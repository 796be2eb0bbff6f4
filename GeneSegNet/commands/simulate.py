"""Write a simulated raw dataset (images/, labels/, spots/ and truth/) for demos and tests.

Entry point of the ``genesegnet-simulate`` console script and of
``preprocess/simulate_tissue.py``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from GeneSegNet.cli import add_verbose_arg, run_reporting_errors
from GeneSegNet.cli.types import int_range, nonnegative_float, positive_float, positive_int
from GeneSegNet.data.sim_config import PRESET_NAMES
from GeneSegNet.log import setup_logging

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out_dir", type=Path, default=Path("raw_data"), help="output folder")
    parser.add_argument("--n_samples", type=positive_int, default=4, help="number of images")
    parser.add_argument("--preset", choices=PRESET_NAMES, default="demo",
                        help="tissue kind: demo (small, quick), dense (Xenium-like, "
                        "0.2125 µm/px), sparse (ISS-like, 0.325 µm/px)")
    parser.add_argument("--height", type=int_range(32, 32768), default=None,
                        help="image height (px); default: the preset's")
    parser.add_argument("--width", type=int_range(32, 32768), default=None,
                        help="image width (px); default: the preset's")
    parser.add_argument("--pixel_size", type=positive_float, default=None,
                        help="pixel size (µm/px); default: the preset's. Cell sizes stay in µm")
    parser.add_argument("--label_expansion_um", type=nonnegative_float, default=None,
                        help="starting labels = detectable nuclei expanded by this (µm); "
                        "default: the preset's")
    parser.add_argument("--transcripts_per_um2", type=nonnegative_float, default=None,
                        help="transcript density inside cells; default: the preset's")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    add_verbose_arg(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def run() -> int:
        from GeneSegNet.data.simulate import preset_config, write_simulated_dataset
        from GeneSegNet.errors import InputError

        if args.out_dir.exists() and not args.overwrite:
            raise InputError("output folder already exists (use --overwrite)", args.out_dir)
        out_dir = args.out_dir
        if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "truth").is_dir():
            raise InputError("--overwrite replaces only a folder written by the simulator "
                             "(with truth/); this one is not, so it is left alone", out_dir)
        config = preset_config(args.preset, height=args.height, width=args.width,
                               pixel_size_um=args.pixel_size,
                               label_expansion_um=args.label_expansion_um,
                               transcripts_per_um2=args.transcripts_per_um2)
        out = write_simulated_dataset(args.out_dir, args.n_samples, config, seed=args.seed,
                                      overwrite=args.overwrite)
        logger.info("simulated dataset written to %s "
                    "(images/, labels/, spots/, metadata/, truth/)", out)
        return 0

    return run_reporting_errors(run)


if __name__ == "__main__":
    sys.exit(main())
