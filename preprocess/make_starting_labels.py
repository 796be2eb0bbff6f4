"""Write starting labels (vendor nuclei or a classical segmentation); the options and the
logic live in GeneSegNet/commands/starting_labels.py and GeneSegNet/data/nuclei.py."""

from __future__ import annotations

import argparse
import sys

from GeneSegNet.commands import starting_labels


def build_parser() -> argparse.ArgumentParser:
    return starting_labels.build_parser()


def main(argv: list[str] | None = None) -> int:
    return starting_labels.main(argv)


if __name__ == "__main__":
    sys.exit(main())
