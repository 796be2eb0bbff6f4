"""Write a simulated raw dataset (images/, labels/, spots/ and truth/) for demos and tests."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from GeneSegNet.cli import add_verbose_arg, run_reporting_errors
from GeneSegNet.log import setup_logging

logger = logging.getLogger("GeneSegNet.data.simulate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out_dir", type=Path, default=Path("raw_data"), help="output folder")
    parser.add_argument("--n_samples", type=int, default=4, help="number of images")
    parser.add_argument("--height", type=int, default=512, help="image height (px)")
    parser.add_argument("--width", type=int, default=512, help="image width (px)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    add_verbose_arg(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def run() -> int:
        from GeneSegNet.data.simulate import TissueConfig, write_simulated_dataset
        from GeneSegNet.errors import InputError

        if args.out_dir.exists() and not args.overwrite:
            raise InputError("output folder already exists (use --overwrite)", args.out_dir)
        config = TissueConfig(height=args.height, width=args.width)
        out = write_simulated_dataset(args.out_dir, args.n_samples, config, seed=args.seed,
                                      overwrite=args.overwrite)
        logger.info("simulated dataset written to %s (images/, labels/, spots/, truth/)", out)
        return 0

    return run_reporting_errors(run)


if __name__ == "__main__":
    sys.exit(main())
