"""Benchmark: transcript-guided label growth vs plain nuclei expansion, on simulated tissue.

For each preset, simulates tissue with known cells, then compares
``grow_labels(sample.labels)`` with ``expand_labels(sample.labels, d)`` for d = 0..10 µm
(the best d by AP@0.5 is reported): AP@0.5 / AP@0.75 (``evaluation.metrics``), mean
best IoU of the true cells, the fraction of cell transcripts inside the right cell
(each predicted cell stands for the true cell it overlaps most), cells found, and the
wall time of ``grow_labels``.

Presets: ``data.sim_config`` (``demo`` 0.5 µm/px, ``dense`` Xenium-like 0.2125 µm/px at
~1 transcript/µm², ``sparse`` ISS-like 0.325 µm/px at ~0.05 /µm²), at their own image
size unless ``--size`` is given.
Run: ``.venv/bin/python bench/bench_grow.py [--size 512] [--seeds 2]``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
from skimage.segmentation import expand_labels

sys.path.insert(0, str(Path(__file__).resolve().parent))

from GeneSegNet.data import simulate  # noqa: E402
from GeneSegNet.evaluation.metrics import average_precision, per_cell_best_iou  # noqa: E402
from GeneSegNet.growth.grow import grow_labels  # noqa: E402
from GeneSegNet.growth.merge import label_stats  # noqa: E402
from GeneSegNet.growth.params import GrowParams  # noqa: E402


def preset(name: str, size: int | None) -> tuple[simulate.TissueConfig, float]:
    """(config, µm per pixel) of a simulator preset, optionally at ``size`` x ``size`` px."""
    cfg = simulate.preset_config(name, height=size, width=size)
    return cfg, cfg.pixel_size_um


def right_cell_fraction(pred: np.ndarray, true: np.ndarray, rows: np.ndarray, cols: np.ndarray,
                        true_id: np.ndarray) -> float:
    """Fraction of cell transcripts whose predicted cell overlaps their true cell most."""
    n_p, n_t = int(pred.max()) + 1, int(true.max()) + 1
    table = np.bincount(pred.ravel() * n_t + true.ravel(), minlength=n_p * n_t)
    table = table.reshape(n_p, n_t)
    table[:, 0] = 0
    best = table.argmax(axis=1)
    best[0] = 0
    r, c = np.floor(rows).astype(int), np.floor(cols).astype(int)
    ok = (r >= 0) & (c >= 0) & (r < pred.shape[0]) & (c < pred.shape[1])
    in_cell = ok & (true_id > 0)
    return float(np.mean(best[pred[r[in_cell], c[in_cell]]] == true_id[in_cell]))


def score(pred: np.ndarray, sample: simulate.SimulatedSample) -> dict[str, float]:
    ap = average_precision(sample.cells, pred, thresholds=(0.5, 0.75))
    spots = sample.spots
    return {"AP@0.5": ap["AP@0.5"], "AP@0.75": ap["AP@0.75"],
            "mIoU": float(per_cell_best_iou(sample.cells, pred).mean()),
            "right": right_cell_fraction(pred, sample.cells, spots["y"].to_numpy(),
                                         spots["x"].to_numpy(), spots["cell_id"].to_numpy()),
            "cells": float(len(np.unique(pred)) - 1)}


def run(name: str, size: int, seeds: int) -> None:
    cfg, px = preset(name, size)
    rows = {"grow": [], **{f"expand {d} um": [] for d in range(11)}}
    times, n_true = [], []
    for seed in range(seeds):
        sample = simulate.simulate_tissue(cfg, seed)
        n_true.append(int(sample.cells.max()))
        spots = sample.spots
        genes = np.unique(spots["gene"].to_numpy(), return_inverse=True)[1]
        r, c = spots["y"].to_numpy(), spots["x"].to_numpy()
        start = time.perf_counter()
        grown = grow_labels(sample.labels, r, c, genes, pixel_size_um=px, params=GrowParams())
        times.append(time.perf_counter() - start)
        rows["grow"].append(score(grown, sample))
        for d in range(11):
            rows[f"expand {d} um"].append(score(expand_labels(sample.labels, d / px), sample))
        stats = label_stats(grown, r, c, px)
        print(f"  seed {seed}: true cells {n_true[-1]}, input {len(np.unique(sample.labels)) - 1}"
              f", grown stats {stats}")
    mean = {k: {m: float(np.mean([v[m] for v in vals])) for m in vals[0]}
            for k, vals in rows.items()}
    best = max((k for k in mean if k.startswith("expand")), key=lambda k: mean[k]["AP@0.5"])
    print(f"{name}: {cfg.height}x{cfg.width} px at {px} um/px, {seeds} seeds, true cells "
          f"{np.mean(n_true):.0f}/image, grow_labels {np.median(times):.2f} s (median)")
    for k in ("grow", best, "expand 0 um", "expand 5 um"):
        m = mean[k]
        print(f"  {k:14s} AP@0.5 {m['AP@0.5']:.3f}  AP@0.75 {m['AP@0.75']:.3f}  "
              f"mIoU {m['mIoU']:.3f}  right-cell {m['right']:.3f}  cells {m['cells']:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--presets", nargs="+", default=list(simulate.PRESET_NAMES))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for name in args.presets:
        run(name, args.size, args.seeds)


if __name__ == "__main__":
    main()
