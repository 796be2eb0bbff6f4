"""Score label images against simulated truth: cells found, transcripts in cells, AP at
IoU 0.5/0.75/0.9 against the true cells, transcripts in the right cell, background
transcripts put in cells and transcript assignment accuracy."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from GeneSegNet.cli import add_verbose_arg, run_reporting_errors
from GeneSegNet.log import setup_logging

logger = logging.getLogger("GeneSegNet.scripts.compare_to_truth")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--label_dir", type=Path, required=True,
                        help="label images to score (e.g. raw labels/ or inference output)")
    parser.add_argument("--truth_dir", type=Path, required=True,
                        help="the simulator's truth/ folder")
    parser.add_argument("--out_csv", type=Path, help="also write the table to this CSV")
    parser.add_argument("--expand_um", type=float, default=0.0,
                        help="score the labels expanded by this many µm (the vendors' "
                             "nuclei-expansion baseline); pixel sizes from the metadata")
    parser.add_argument("--metadata_base", type=Path, default=None,
                        help="folder holding metadata/<sample>.json (default: the folder "
                             "above --truth_dir)")
    add_verbose_arg(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def run() -> int:
        from GeneSegNet.evaluation.truth import score_folder
        from GeneSegNet.io import atomic_path
        from GeneSegNet.io.paths import check_output_not_input

        check_output_not_input({"--out_csv": args.out_csv},
                               {"--label_dir": args.label_dir, "--truth_dir": args.truth_dir})
        table = score_folder(args.label_dir, args.truth_dir, expand_um=args.expand_um,
                             metadata_base=args.metadata_base)
        text = table.to_string(index=False, float_format=lambda v: f"{v:.3f}")
        logger.info("%s against %s:\n%s", args.label_dir, args.truth_dir, text)
        if args.out_csv:
            with atomic_path(args.out_csv) as tmp:
                table.to_csv(tmp, index=False)
        return 0

    return run_reporting_errors(run)


if __name__ == "__main__":
    sys.exit(main())
