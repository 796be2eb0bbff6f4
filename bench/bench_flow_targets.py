"""Benchmark: flow-target time per 256x256 crop, vectorised vs a per-cell reference.

Run from the repo root: ``.venv/bin/python bench/bench_flow_targets.py [--crops 3]``.

Ours: ``GeneSegNet.dynamics.flow_targets.masks_to_flows`` (all cells diffused at once in torch).
Reference: the same spec 4.1 semantics computed the straightforward way, one cell at a
time on its own bounding-box crop with numpy (the structure of upstream's CPU variant,
but with the GPU variant's shared n_iter and centers, and the gradients of ``--mode``:
leak-free "isolated", the default, or upstream's leaky ones, so that both give the same
answer). Crops hold ~25-40 touching Voronoi-like cells. Timings are medians of
several repeats with ``torch.set_num_threads(1)``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_time  # noqa: E402

from GeneSegNet.dynamics.flow_targets import (
    FLOW_TARGET_MODES,
    STENCIL,
    cell_geometry,
    masks_to_flows,
)


def voronoi_crop(rng: np.random.Generator, size: int = 256, n_cells: int = 32) -> np.ndarray:
    """int32 [size,size]: Voronoi cells of random seeds, cut off 30 px from their seed."""
    seeds = rng.uniform(0, size, (n_cells, 2))
    yy, xx = np.mgrid[:size, :size]
    points = np.stack([yy.ravel(), xx.ravel()], 1)
    d2 = ((points[:, None, :] - seeds[None]) ** 2).sum(-1)
    labels = (d2.argmin(1) + 1).astype(np.int32)
    labels[d2.min(1) > 30.0**2] = 0
    return labels.reshape(size, size)


def per_cell_flows(masks: np.ndarray, mode: str = "isolated") -> np.ndarray:
    """Reference: spec 4.1 GPU semantics, cell by cell on bbox crops (numpy, float64).

    ``mode="isolated"`` takes each cell's gradient on its own field (0 off the cell);
    ``"upstream"`` on the field shared by all cells.
    """
    height, width = masks.shape
    pad = np.pad(masks, 1)
    objects = [(i + 1, s) for i, s in enumerate(ndimage.find_objects(pad)) if s is not None]
    flows = np.zeros((2, height, width), np.float32)
    if not objects:
        return flows
    n_iter = 2 * max(sy.stop - sy.start + sx.stop - sx.start + 2 for _, (sy, sx) in objects)
    field = np.zeros(pad.shape)
    cells = masks > 0
    for cell, (sy, sx) in objects:
        y0, x0 = sy.start - 1, sx.start - 1  # crop with a 1-px margin (pad has a zero ring)
        region = (slice(y0, sy.stop + 1), slice(x0, sx.stop + 1))
        inside = pad[region] == cell
        ys, xs = np.nonzero(inside)
        ymed, xmed = np.median(ys), np.median(xs)
        k = np.argmin((ys - ymed) ** 2 + (xs - xmed) ** 2)
        h, w = inside.shape
        core = inside[1:-1, 1:-1]
        valid = [inside[1 + dy : h - 1 + dy, 1 + dx : w - 1 + dx] & core for dy, dx in STENCIL]
        t = np.zeros(inside.shape)
        for _ in range(n_iter):
            t[ys[k], xs[k]] += 1.0
            acc = t[1:-1, 1:-1].copy()
            for (dy, dx), ok in zip(STENCIL[1:], valid[1:], strict=True):
                acc += np.where(ok, t[1 + dy : h - 1 + dy, 1 + dx : w - 1 + dx], 0.0)
            t[1:-1, 1:-1] = acc / 9
        field[region][inside] = t[inside]
        if mode == "isolated":  # t is 0 off the cell: its gradient ignores the others
            own = np.log(1.0 + t)
            d_y = own[2:, 1:-1] - own[:-2, 1:-1]
            d_x = own[1:-1, 2:] - own[1:-1, :-2]
            norm = np.sqrt(d_y * d_y + d_x * d_x) + 1e-20
            out = (slice(y0, y0 + h - 2), slice(x0, x0 + w - 2))  # region in unpadded coords
            flows[0][out][core] = (d_y / norm)[core]
            flows[1][out][core] = (d_x / norm)[core]
    if mode == "isolated":
        return flows
    logt = np.log(1.0 + field)
    d_y = logt[2:, 1:-1] - logt[:-2, 1:-1]
    d_x = logt[1:-1, 2:] - logt[1:-1, :-2]
    norm = np.sqrt(d_y * d_y + d_x * d_x) + 1e-20
    flows[0][cells] = (d_y / norm)[cells]
    flows[1][cells] = (d_x / norm)[cells]
    return flows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=int, default=3, help="number of random crops")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per crop")
    parser.add_argument("--ref-repeats", type=int, default=3, help="repeats of the reference")
    parser.add_argument("--device", default="cpu", help="torch device for ours")
    parser.add_argument("--mode", default="isolated", choices=FLOW_TARGET_MODES,
                        help="flow target mode (gradient neighbours)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, torch.set_num_threads(1); device for ours: "
        f"{args.device}; mode {args.mode}"
    )
    rng = np.random.default_rng(args.seed)
    ours_t, ref_t = [], []
    for i in range(args.crops):
        masks = voronoi_crop(rng, n_cells=int(rng.integers(25, 41)))
        n_cells = len(np.unique(masks)) - 1
        n_iter = cell_geometry(masks)[2]
        ours = masks_to_flows(masks, device=args.device, mode=args.mode)  # warm-up, check
        ref = per_cell_flows(masks, args.mode)
        t_ours = median_time(
            lambda m=masks: masks_to_flows(m, device=args.device, mode=args.mode),
            args.repeats,
            warmup=False,
        )
        t_ref = median_time(
            lambda m=masks: per_cell_flows(m, args.mode), args.ref_repeats, warmup=False
        )
        ours_t.append(t_ours)
        ref_t.append(t_ref)
        print(
            f"crop {i}: {n_cells} cells, {(masks > 0).mean():.0%} foreground, n_iter {n_iter} | "
            f"ours {t_ours * 1e3:.1f} ms, per-cell reference {t_ref * 1e3:.1f} ms, "
            f"ratio {t_ref / t_ours:.1f}x | max |ours - ref| {np.abs(ours - ref).max():.2e}"
        )
    med_ours, med_ref = statistics.median(ours_t), statistics.median(ref_t)
    print(
        f"median per 256x256 crop: ours {med_ours * 1e3:.1f} ms, per-cell reference "
        f"{med_ref * 1e3:.1f} ms, speed-up {med_ref / med_ours:.1f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
