"""Summarise several quality reports of the same settings on different simulated images.

Runs of ``bench/quality_report.py`` at the sizes a CPU allows vary by several points
between image sets (other ``--seed``), above all on the sparse preset. This script reads
the ``quality_report.json`` of each run and prints, for every segmentation they share,
the median of each measure over the runs and its range; and, per run, which measures
GeneSegNet's last round (each variant: with and without ``--augment``) wins against nuclei
expansion (at the distance with the best AP@0.5, and at each measure's own best distance).

Run: python bench/quality_summary.py RUN_DIR [RUN_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

MEASURES = ("AP@0.5", "AP@0.75", "AP@0.9", "right_cell", "background_in_cells",
            "assignment_accuracy")
LOWER_IS_BETTER = {"background_in_cells"}
EXPANSION_BEST = "nuclei expanded by d µm (best AP@0.5)"
EXPANSION_PER_MEASURE = "nuclei expansion, best distance per measure"


def row_key(name: str) -> str:
    """A row name without what varies between runs (training minutes, chosen distances)."""
    name = re.sub(r" \(\d+(\.\d+)? min training in all\)", "", name)
    if name.startswith("nuclei expanded by "):
        return EXPANSION_BEST
    if name.startswith(EXPANSION_PER_MEASURE):
        return EXPANSION_PER_MEASURE
    return name


def read_report(run_dir: Path) -> dict[str, dict[str, float]]:
    """{row key: {measure: value}} of one run's quality_report.json."""
    path = Path(run_dir) / "quality_report.json"
    try:
        rows = json.loads(path.read_text())["rows"]
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"{path}: not a quality report ({exc})") from None
    return {row_key(r["segmentation"]): r for r in rows}


def last_rounds(report: dict[str, dict[str, float]]) -> list[str]:
    """The keys of GeneSegNet's last round (with and without ``--augment``; not its
    network-only rows), in report order."""
    rounds = {k: int(m.group(1)) for k in report
              if (m := re.match(r"genesegnet, round (\d+)", k)) and "network cells" not in k}
    last = max(rounds.values(), default=None)
    return [k for k, n in rounds.items() if n == last]


def wins(ours: dict[str, float], other: dict[str, float]) -> list[str]:
    """The measures on which ``ours`` is strictly better than ``other``."""
    return [m for m in MEASURES if m in ours and m in other and (
        ours[m] < other[m] if m in LOWER_IS_BETTER else ours[m] > other[m])]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, nargs="+", help="--out_dir of each quality report")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    reports = [read_report(r) for r in args.runs]
    keys = [k for k in reports[0] if all(k in r for r in reports[1:])]
    print(f"{len(reports)} runs: {', '.join(str(r) for r in args.runs)}")
    print(f"median [min, max] over the runs\n{'segmentation':<62}"
          + "".join(f"{m:>22}" for m in MEASURES))
    for key in keys:
        cells = []
        for m in MEASURES:
            values = np.array([r[key][m] for r in reports if m in r[key]], dtype=float)
            cells.append(f"{np.median(values):.3f} [{values.min():.3f}, {values.max():.3f}]"
                         if values.size else "-")
        print(f"{key[:62]:<62}" + "".join(f"{c:>22}" for c in cells))
    for run, report in zip(args.runs, reports, strict=True):
        for ours in last_rounds(report):
            for baseline in (EXPANSION_BEST, EXPANSION_PER_MEASURE):
                if baseline in report:
                    won = wins(report[ours], report[baseline])
                    lost = [m for m in MEASURES if m not in won]
                    print(f"{run}: {ours} beats {baseline} on {len(won)} of "
                          f"{len(MEASURES)} measures; not on: {', '.join(lost) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
