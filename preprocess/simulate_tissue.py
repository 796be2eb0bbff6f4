"""Write a simulated raw dataset (images/, labels/, spots/ and truth/); the options and
the logic live in GeneSegNet/commands/simulate.py (also the ``genesegnet-simulate`` command)."""

from __future__ import annotations

import argparse
import sys

from GeneSegNet.commands import simulate


def build_parser() -> argparse.ArgumentParser:
    return simulate.build_parser()


def main(argv: list[str] | None = None) -> int:
    return simulate.main(argv)


if __name__ == "__main__":
    sys.exit(main())
