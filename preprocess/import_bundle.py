"""Import a vendor's output folder into the raw layout; the options and the logic live in
GeneSegNet/commands/import_bundle.py and GeneSegNet/vendors/."""

from __future__ import annotations

import argparse
import sys

from GeneSegNet.commands import import_bundle


def build_parser() -> argparse.ArgumentParser:
    return import_bundle.build_parser()


def main(argv: list[str] | None = None) -> int:
    return import_bundle.main(argv)


if __name__ == "__main__":
    sys.exit(main())
