"""Benchmark: mask reconstruction (spec 7.2) time per megapixel on the CPU.

A ~1 megapixel label image with ~1,000 touching cells (jittered hexagonal Voronoi cells
inside an elliptical tissue region) gives ideal flows ``dP = 5 * masks_to_flows(masks)``
and logits +5 / -5. We time ``compute_masks`` on the whole image (median of repeats, with
a per-stage breakdown), and a direct per-pixel reference of the same algorithm (a plain
Python loop per moving pixel for flow following, upstream's duplicate-keeping lists for
the clustering) on a central crop, extrapolated to a megapixel by the number of moving
pixels. Our flow following and clustering also run on the crop, to check that both give
the same answer. The vectorised torch code of the two heaviest stages (the CUDA
implementation) is also timed on the CPU against the compiled kernels that replace it
there. If CUDA is available, ``compute_masks`` is timed there too.

torch and the kernels' thread pool use ``torch.set_num_threads``: 1 for every figure,
then ``compute_masks`` again for each extra count given with ``--threads``.

Run: ``.venv/bin/python bench/bench_reconstruct.py [--size 1024] [--crop 128] [--threads 2]``
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch
from scipy import ndimage

from GeneSegNet.dynamics import flow_targets, follow
from GeneSegNet.dynamics.flow_targets import masks_to_flows
from GeneSegNet.dynamics.follow import follow_flows
from GeneSegNet.dynamics.masks import compact_labels, fill_holes_and_remove_small_masks
from GeneSegNet.dynamics.reconstruct import (
    compute_masks,
    get_masks,
    remove_bad_flow_masks,
)

THREADS = 1  # for every figure but the --threads ones


def tissue_masks(size: int, spacing: float, rng: np.random.Generator) -> np.ndarray:
    """Touching Voronoi cells (radius <= 0.66 * spacing) on a jittered hexagonal grid."""
    rows, cols = np.mgrid[:size, :size]
    centre = size / 2
    tissue = ((rows - centre) / (0.47 * size)) ** 2 + ((cols - centre) / (0.47 * size)) ** 2 <= 1
    grid_r, grid_c = np.mgrid[spacing / 2 : size : spacing * 0.866, spacing / 2 : size : spacing]
    grid_c = grid_c + (np.arange(grid_r.shape[0])[:, None] % 2) * spacing / 2
    points = np.stack([grid_r.ravel(), grid_c.ravel()], axis=1)
    points = np.round(points + rng.uniform(-5, 5, points.shape)).astype(int)
    points = points[((points >= 0) & (points < size)).all(axis=1)]
    points = points[tissue[points[:, 0], points[:, 1]]]
    seeds = np.zeros((size, size), bool)
    seeds[points[:, 0], points[:, 1]] = True
    distance, (near_r, near_c) = ndimage.distance_transform_edt(~seeds, return_indices=True)
    ids = np.zeros((size, size), np.int32)
    ids[points[:, 0], points[:, 1]] = np.arange(1, len(points) + 1)
    masks = ids[near_r, near_c]
    masks[(distance > 0.66 * spacing) | ~tissue] = 0
    return masks


def direct_follow_flows(dP: np.ndarray, iscell: np.ndarray, niter: int = 200) -> np.ndarray:
    """Per-pixel loop of the flow following (floor bilinear, +1 clamped, clamp to image);
    pixels move when either flow component exceeds 1e-3 (our default rule)."""
    height, width = iscell.shape
    field = dP * iscell / 5.0
    fy, fx = field[0].tolist(), field[1].tolist()
    out = np.stack(np.meshgrid(np.arange(height), np.arange(width), indexing="ij")).astype(
        np.float32
    )
    movers = np.argwhere((np.abs(field[0]) > 1e-3) | (np.abs(field[1]) > 1e-3)).tolist()
    if len(movers) < 5:
        return out
    for row, col in movers:
        y, x = float(row), float(col)
        for _ in range(niter):
            y0, x0 = int(y), int(x)
            y1, x1 = min(y0 + 1, height - 1), min(x0 + 1, width - 1)
            wy, wx = y - y0, x - x0
            w00, w01, w10, w11 = (1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx
            dy = w00 * fy[y0][x0] + w01 * fy[y0][x1] + w10 * fy[y1][x0] + w11 * fy[y1][x1]
            dx = w00 * fx[y0][x0] + w01 * fx[y0][x1] + w10 * fx[y1][x0] + w11 * fx[y1][x1]
            y = min(max(y + dy, 0.0), height - 1.0)
            x = min(max(x + dx, 0.0), width - 1.0)
        out[0, row, col], out[1, row, col] = y, x
    return out


def direct_get_masks(positions: np.ndarray, iscell: np.ndarray, rpad: int = 20) -> np.ndarray:
    """Upstream-style clustering: per-seed index arrays that keep duplicates."""
    height, width = iscell.shape
    rows, cols = np.indices((height, width))
    pr = np.where(iscell, positions[0].astype(int), rows).ravel() + rpad
    pc = np.where(iscell, positions[1].astype(int), cols).ravel() + rpad
    hist = np.zeros((height + 2 * rpad, width + 2 * rpad))
    for r, c in zip(pr.tolist(), pc.tolist(), strict=True):
        hist[r, c] += 1
    hmax = ndimage.maximum_filter1d(ndimage.maximum_filter1d(hist, 5, axis=0), 5, axis=1)
    seed_r, seed_c = np.nonzero((hist - hmax > -1e-6) & (hist > 10))
    shifts = np.array([(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    label_hist = np.zeros(hist.shape, np.int64)
    for k in range(len(seed_r)):
        pix = np.array([[seed_r[k], seed_c[k]]])
        for _ in range(5):
            pix = (pix[:, None, :] + shifts[None]).reshape(-1, 2)  # duplicates kept
            pix = pix[hist[pix[:, 0], pix[:, 1]] > 2]
        label_hist[pix[:, 0], pix[:, 1]] = k + 1
    labels = label_hist[pr, pc].reshape(height, width)
    ids, counts = np.unique(labels, return_counts=True)
    for lab in ids[(counts > 0.4 * height * width) & (ids > 0)]:
        labels[labels == lab] = 0
    return labels


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two label images are equal up to a renaming of the ids."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


def matched_at_half(true: np.ndarray, pred: np.ndarray) -> int:
    """Number of true cells matched by a predicted cell with IoU > 0.5 (unique)."""
    n_pred = int(pred.max()) + 1
    overlap = np.bincount(true.ravel() * n_pred + pred.ravel(), minlength=(true.max() + 1) * n_pred)
    overlap = overlap.reshape(-1, n_pred)
    union = overlap.sum(1, keepdims=True) + overlap.sum(0, keepdims=True) - overlap
    return int((overlap[1:, 1:] / union[1:, 1:] > 0.5).sum())


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """Median wall-clock and process-CPU seconds of ``fn()`` over ``repeats`` calls."""
    walls, cpus, result = [], [], None
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        cpus.append(time.process_time() - cpu)
        walls.append(time.perf_counter() - wall)
    return statistics.median(walls), statistics.median(cpus), result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="image side (pixels)")
    parser.add_argument("--spacing", type=float, default=29.0, help="cell spacing (pixels)")
    parser.add_argument("--crop", type=int, default=128, help="reference crop side")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ref-repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, nargs="*", default=[2], help="extra thread counts to time"
    )
    return parser


def time_torch_paths(dP: np.ndarray, masks: np.ndarray, repeats: int) -> None:
    """Compiled CPU kernels against the vectorised torch code (CUDA's) run on the CPU."""
    iscell = masks > 0
    field = torch.as_tensor(dP, dtype=torch.float32) * torch.as_tensor(iscell) / torch.full(
        (), 5.0
    )
    movers = torch.nonzero((field[0].abs() > 1e-3) | (field[1].abs() > 1e-3))
    own = torch.as_tensor(follow._own_coordinates(*iscell.shape))

    def torch_follow() -> np.ndarray:
        final = own.clone()
        follow._follow_torch(field, movers, 200, final, 65536)
        return final.numpy()

    t_wall, _, t_pos = timed(torch_follow, repeats)
    k_wall, _, k_pos = timed(lambda: follow_flows(dP, iscell), repeats)
    print(
        f"follow_flows, torch-vectorised {t_wall:.2f} s vs compiled {k_wall:.2f} s: "
        f"{t_wall / k_wall:.1f}x; identical: {np.array_equal(t_pos, k_pos)}"
    )
    lab = np.pad(compact_labels(masks)[1], 1).astype(np.int64)
    _, centers, n_iter = flow_targets.cell_geometry(masks)
    flat = (centers[:, 0] + 1) * lab.shape[1] + centers[:, 1] + 1
    for dtype in (torch.float32, torch.float64):
        t_wall, _, t_field = timed(
            lambda dtype=dtype: flow_targets._diffuse_torch(
                torch.from_numpy(lab), torch.from_numpy(flat), n_iter, dtype
            ).numpy(),
            repeats,
        )
        k_wall, _, k_field = timed(
            lambda dtype=dtype: flow_targets._diffuse_cpu(lab, flat, n_iter, dtype), repeats
        )
        print(
            f"diffusion ({n_iter} iterations, {str(dtype)[6:]}), torch sweep {t_wall:.2f} s vs "
            f"compiled per cell {k_wall:.2f} s: {t_wall / k_wall:.1f}x; "
            f"identical: {np.array_equal(t_field, k_field)}"
        )


def time_ours(dP, logits, megapixels, repeats, device="cpu"):
    """Print compute_masks and per-stage times; return (core, whole) CPU s/MP and masks."""
    iscell = logits > 0
    wall, cpu, pred = timed(lambda: compute_masks(dP, logits, device=device), repeats)
    print(
        f"ours  compute_masks ({device}): {wall / megapixels:.2f} s/MP wall, "
        f"{cpu / megapixels:.2f} s/MP CPU (medians of {repeats}); {pred.max()} masks"
    )
    f_wall, f_cpu, positions = timed(lambda: follow_flows(dP, iscell, device=device), repeats)
    g_wall, g_cpu, masks = timed(lambda: get_masks(positions, iscell), repeats)
    c_wall, c_cpu, checked = timed(
        lambda: remove_bad_flow_masks(masks, dP, threshold=0.4, device=device), 1
    )
    h_wall, h_cpu, _ = timed(lambda: fill_holes_and_remove_small_masks(checked, 15), 1)
    print(
        "  stages, CPU s/MP: "
        f"follow_flows {f_cpu / megapixels:.2f}, get_masks {g_cpu / megapixels:.2f}, "
        f"flow check (masks_to_flows) {c_cpu / megapixels:.2f}, "
        f"fill holes / min size {h_cpu / megapixels:.2f}"
    )
    core = (f_cpu + g_cpu) / megapixels
    print(
        f"  follow_flows + get_masks: {core:.2f} s/MP CPU, "
        f"{(f_wall + g_wall) / megapixels:.2f} s/MP wall"
    )
    return core, cpu / megapixels, pred


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(THREADS)
    print(f"torch {torch.__version__}, torch.set_num_threads({THREADS})")
    masks = tissue_masks(args.size, args.spacing, np.random.default_rng(0))
    start = time.perf_counter()
    dP = 5.0 * masks_to_flows(masks)
    print(f"setup: masks_to_flows on the ground truth took {time.perf_counter() - start:.2f} s")
    logits = np.where(masks > 0, 5.0, -5.0).astype(np.float32)
    megapixels = masks.size / 1e6
    field = dP * (logits > 0) / 5.0
    movers_full = int(((np.abs(field[0]) > 1e-3) | (np.abs(field[1]) > 1e-3)).sum())
    print(
        f"image {masks.shape[0]}x{masks.shape[1]} ({megapixels:.3f} MP), {masks.max()} cells, "
        f"{(masks > 0).mean():.0%} cell pixels, {movers_full} moving pixels"
    )
    core, whole, pred = time_ours(dP, logits, megapixels, args.repeats)
    print(f"  {matched_at_half(masks, pred)} of {masks.max()} cells matched at IoU > 0.5")

    top = (args.size - args.crop) // 2
    window = (slice(top, top + args.crop), slice(top, top + args.crop))
    crop_dP = np.ascontiguousarray(dP[(slice(None), *window)])
    crop_iscell = logits[window] > 0
    crop_field = crop_dP * crop_iscell / 5.0
    movers_crop = int(((np.abs(crop_field[0]) > 1e-3) | (np.abs(crop_field[1]) > 1e-3)).sum())
    _, ref_follow, ref_pos = timed(
        lambda: direct_follow_flows(crop_dP, crop_iscell), args.ref_repeats
    )
    _, ref_masks_cpu, ref_masks = timed(
        lambda: direct_get_masks(ref_pos, crop_iscell), args.ref_repeats
    )
    ref_per_mp = (ref_follow + ref_masks_cpu) * movers_full / movers_crop / megapixels
    print(
        f"direct per-pixel reference on a {args.crop}x{args.crop} crop ({movers_crop} moving "
        f"pixels): follow {ref_follow:.2f} s + get_masks {ref_masks_cpu:.2f} s CPU "
        f"(medians of {args.ref_repeats}); extrapolated by moving pixels: {ref_per_mp:.0f} s/MP"
    )
    our_pos = follow_flows(crop_dP, crop_iscell)
    our_masks = get_masks(our_pos, crop_iscell)
    print(
        f"  crop agreement: max |position difference| {np.abs(our_pos - ref_pos).max():.2e} px, "
        f"end-point bins equal {np.mean(our_pos.astype(int) == ref_pos.astype(int)):.4%}, "
        f"same labels up to renaming: {same_partition(our_masks, ref_masks)} "
        f"({our_masks.max()} masks)"
    )
    print(
        f"ratio reference / ours, CPU time: follow_flows + get_masks {ref_per_mp / core:.0f}x; "
        f"whole compute_masks {ref_per_mp / whole:.0f}x"
    )
    time_torch_paths(dP, masks, args.repeats)
    for threads in args.threads:
        torch.set_num_threads(threads)
        wall, _, _ = timed(lambda: compute_masks(dP, logits), args.repeats)
        print(
            f"torch.set_num_threads({threads}): compute_masks {wall / megapixels:.2f} s/MP wall "
            f"(median of {args.repeats}); 1 thread above: {whole:.2f} s/MP CPU"
        )
    torch.set_num_threads(THREADS)
    if torch.cuda.is_available():
        compute_masks(dP, logits, device="cuda")  # warm-up
        _, _, pred_cuda = time_ours(dP, logits, megapixels, args.repeats, device="cuda")
        print(f"  CUDA masks identical to CPU: {np.array_equal(pred, pred_cuda)}")
    else:
        print("CUDA not available: no GPU timing")
    return 0


if __name__ == "__main__":
    sys.exit(main())
