"""Benchmark: how much of "background transcripts in cells" is self-inclusion?

A border drawn where the transcripts are dense is pulled towards every spot near it,
background ones included, so a spot-driven segmentation puts more of the very spots it
was drawn from into cells than its area alone would. This script separates the two on a
finished ``bench/quality_report.py`` run: the whole inference (network and transcript
refinement, the model of round ``--round``) runs on the held-out images with a random half
of their spots, and the share of background transcripts inside the cells is counted for
the half it saw and for the half it did not. Background spots are uniform in the
simulator, so the held-out half measures the cells' area alone; the difference is the
self-inclusion. Also printed: the area fractions of the true cells and of the cells, and
the run's own figures with all spots.

Run: ``python bench/self_inclusion.py --out_dir quality_dense [--model genesegnet]
[--round 2] [--seeds 0,1] [--threads 1]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.quality_report import _truth  # noqa: E402
from GeneSegNet.io import read_label, spot_pixels, write_spots  # noqa: E402
from Inference import slidingwindows_gradient  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", type=Path, required=True,
                        help="a finished bench/quality_report.py output folder")
    parser.add_argument("--model", default="genesegnet")
    parser.add_argument("--round", type=int, default=2)
    parser.add_argument("--seeds", default="0,1", help="random halves, comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (set, stated)")
    return parser


def _half_root(test_root: Path, out: Path, halves: dict[str, np.ndarray], raw: Path) -> Path:
    """A copy of the run's test root whose spot tables hold only the chosen spots."""
    for sub in ("images", "metadata"):
        shutil.copytree(test_root / sub, out / sub)
    (out / "spots").mkdir()
    for name, keep in halves.items():
        spots = _truth(raw, name)[1][keep]
        write_spots(out / "spots" / f"{name}.csv", spots["spotX"], spots["spotY"], spots["gene"])
    return out


def measure(out_dir: Path, model: str, n_round: int, seeds: list[int]) -> dict[str, dict]:
    """Per held-out image: the run's all-spot figures and, as medians over ``seeds``, those
    of inference with a random half of the spots (used and held-out background shares)."""
    raw, test_root = out_dir / "raw", out_dir / f"test_{model}"
    manifest = json.loads(max((out_dir / f"run_{model}").glob("run_*.json")).read_text())
    model_file = manifest["rounds"][n_round - 1]["model_used"]
    names = sorted(p.name for p in (out_dir / "crops" / "test").iterdir() if p.is_dir())
    truth = {name: _truth(raw, name) for name in names}
    results: dict[str, dict] = {}
    for name, (cells, spots) in truth.items():
        rows, cols, _ = spot_pixels(spots["spotX"], spots["spotY"], cells.shape)
        full = read_label(out_dir / f"pred_{model}_round{n_round}" / f"label_{name}.png")
        bg = spots["cell_id"].to_numpy() == 0
        results[name] = {"truth area": float((cells > 0).mean()),
                         "all spots: area": float((full > 0).mean()),
                         "all spots: bg in cells": float((full[rows[bg], cols[bg]] > 0).mean()),
                         "used": [], "held_out": [], "area": []}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        halves = {name: rng.random(len(spots)) < 0.5 for name, (_, spots) in truth.items()}
        with tempfile.TemporaryDirectory() as tmp:
            root = _half_root(test_root, Path(tmp) / "root", halves, raw)
            save = Path(tmp) / "pred"
            code = slidingwindows_gradient.main(["--root_dir", str(root), "--save_dir",
                                                 str(save), "--model_file", model_file,
                                                 "--diameter", "0"])
            if code != 0:
                raise SystemExit(f"inference failed with exit code {code}")
            for name, (cells, spots) in truth.items():
                labels = read_label(save / f"label_{name}.png")
                rows, cols, _ = spot_pixels(spots["spotX"], spots["spotY"], cells.shape)
                bg = spots["cell_id"].to_numpy() == 0
                half = halves[name]
                r = results[name]
                r["used"].append(float((labels[rows[bg & half], cols[bg & half]] > 0).mean()))
                r["held_out"].append(float((labels[rows[bg & ~half], cols[bg & ~half]] > 0)
                                           .mean()))
                r["area"].append(float((labels > 0).mean()))
    for r in results.values():
        r["half: area"] = float(np.median(r.pop("area")))
        r["half: bg in cells, used half"] = float(np.median(r.pop("used")))
        r["half: bg in cells, held-out half"] = float(np.median(r.pop("held_out")))
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"{args.out_dir}: {args.model} round {args.round}, random halves {seeds}, "
          f"{args.threads} torch thread(s)", flush=True)
    results = measure(args.out_dir, args.model, args.round, seeds)
    for name, r in results.items():
        print(name, "  ".join(f"{k} {v:.3f}" for k, v in r.items()))
    mean = {k: float(np.mean([r[k] for r in results.values()])) for k in next(iter(
        results.values()))}
    print("mean", "  ".join(f"{k} {v:.3f}" for k, v in mean.items()))
    print(f"self-inclusion (used half - held-out half): "
          f"{mean['half: bg in cells, used half'] - mean['half: bg in cells, held-out half']:+.3f}"
          f"; area excess over the truth (half): {mean['half: area'] - mean['truth area']:+.3f}")
    (args.out_dir / "self_inclusion.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
