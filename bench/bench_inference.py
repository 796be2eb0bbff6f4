"""Benchmark: whole-slide inference (Inference/slidingwindows_gradient.py), CPU, one thread.

1. Throughput: megapixels per second of the whole pipeline (window pass + block-wise
   masks, no file writing) with the real full-size network (nbase 32-64-128-256, random
   weights) on a simulated tissue image (``--size``), median of repeats.
2. Upstream's per-window recipe on a smaller simulated image (``--ratio_size``), in the
   same run: per window the weights are re-read from disk, the window's own spots
   (vectorised filter) give its heatmap, the window is normalised on its own and run as
   upstream's ``eval`` (resize, pad, four 224-px tiles) *and its masks are computed and
   thrown away*; the windows are averaged, then masks are computed on the whole field.
   It uses our heatmap (O(H·W), not upstream's O(spots·H·W)) and a vectorised spot
   filter (not upstream's Python loop over all spots per window), so the ratio
   understates upstream's cost.
3. Peak memory (VmHWM of a child process) against image size (``--sizes`` in
   megapixels, square images). A synthetic slide holds one cell per 28 × 28 px (about
   510,000 cells at 400 megapixels: touching, rounded cells on a square lattice, with
   flows of 5x unit vectors toward each centre and logits +-5), so the mask
   reconstruction does realistic work. ``--mode full``: image, spots
   (0.03 per px), the window pass with a reduced-width network (nbase 8-16-16-16),
   whose blended output is then overwritten in place by the flows of the synthetic
   cells, block-wise masks, all outputs (label png/tif, mat, jpg, heatmap TIFF) and the
   transcript mapping. ``--mode flows``: no network and no spots; the float16 canvas is
   filled with the synthetic flows directly, then masks and label outputs.
   ``--flow_threshold 0`` skips the flow-error check (about 60 % of the mask time).

If CUDA is available, section 1 is repeated on the GPU.

Run: ``.venv/bin/python bench/bench_inference.py [--size 512] [--ratio_size 384]
[--sizes 4,16,64,400] [--mode full|flows] [--flow_threshold 0.4]``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import median_time, peak_rss_mb, single_thread  # noqa: E402

THREADS_LINE = single_thread()

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from GeneSegNet.data.heatmap import heatmap_to_uint8, render_heatmap  # noqa: E402
from GeneSegNet.data.simulate import TissueConfig, simulate_tissue  # noqa: E402
from GeneSegNet.dynamics.reconstruct import compute_masks  # noqa: E402
from GeneSegNet.io.images import write_tiled_tiff  # noqa: E402
from GeneSegNet.mapping import write_mapping  # noqa: E402
from GeneSegNet.model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from GeneSegNet.model.net import GeneSegUNet, NetConfig  # noqa: E402
from GeneSegNet.model.predict import EvalConfig, prepare_input, run_network  # noqa: E402
from GeneSegNet.model.tiling import TiledAccumulator  # noqa: E402
from GeneSegNet.slide.blockwise import reconstruct_blockwise  # noqa: E402
from GeneSegNet.slide.files import HEATMAP_TILE, write_label_outputs  # noqa: E402
from GeneSegNet.slide.pipeline import SlideRunConfig, segment_slide  # noqa: E402
from GeneSegNet.slide.plan import SlideConfig, plan_windows  # noqa: E402
from GeneSegNet.slide.windows import SpotIndex, heatmap_tiles, predict_slide  # noqa: E402

PERIOD = 28  # px between neighbouring synthetic cells (square lattice)
CENTRE = (13.3, 14.6)  # cell centre within its period (off the pixel grid)
REACH = 0.62  # cells extend this fraction of the period from their centre


def tissue_inputs(size: int, seed: int = 0):
    sample = simulate_tissue(TissueConfig(height=size, width=size), seed)
    rows = np.floor(sample.spots["y"].to_numpy()).astype(np.int64)
    cols = np.floor(sample.spots["x"].to_numpy()).astype(np.int64)
    return sample.image, rows, cols


def ours(net, image, rows, cols, device) -> np.ndarray:
    index = SpotIndex(rows, cols, image.shape)
    return segment_slide(
        net, image, index, SlideRunConfig(), diam_mean=34.0, diam_labels=34.0, device=device
    )


def upstream_recipe(model_path: Path, image, rows, cols, device) -> np.ndarray:
    """Spec §8 per window: reload, window-local heatmap, per-window eval incl. masks."""
    ev = EvalConfig()
    plan = plan_windows(
        image.shape, SlideConfig(window_local=True), diam_mean=34.0, diam_labels=34.0
    )
    acc = TiledAccumulator(3, image.shape)
    for r0, c0 in plan.starts:
        net, _ = load_checkpoint(model_path, device)  # upstream re-reads the weights
        inside = (rows >= r0) & (rows < r0 + 256) & (cols >= c0) & (cols < c0 + 256)
        heat = heatmap_to_uint8(
            render_heatmap(rows[inside] - r0, cols[inside] - c0, (256, 256), 7.0)
        )
        window = np.zeros((256, 256), np.float32)
        part = image[r0 : r0 + 256, c0 : c0 + 256]
        window[: part.shape[0], : part.shape[1]] = part
        x = prepare_input(np.stack([window, heat.astype(np.float32)]), ev)
        flows, cellprob, _ = run_network(net, x, rescale=plan.rescale, cfg=ev, device=device)
        compute_masks(flows, cellprob, device=device)  # upstream computes and discards these
        acc.add(np.concatenate([flows, cellprob[None]]), r0, c0)
    field = acc.result()
    return compute_masks(field[:2], field[2], device=device)


def section_throughput(args, device, tmp: Path) -> None:
    torch.manual_seed(0)
    net = GeneSegUNet(NetConfig()).to(device).eval()
    model_path = save_checkpoint(tmp / "full.pt", net)
    image, rows, cols = tissue_inputs(args.size)
    mp = image.size / 1e6
    index = SpotIndex(rows, cols, image.shape)
    t_win = median_time(
        lambda: predict_slide(
            net, image, index, SlideConfig(), diam_mean=34.0, diam_labels=34.0, device=device
        ),
        args.repeats,
    )
    field = np.empty((3, args.size, args.size), np.float16)
    synthetic_slide(field, np.empty((args.size, args.size), np.uint8))
    t_masks = median_time(
        lambda: reconstruct_blockwise(field[:2], field[2], halo=64, device=device), args.repeats
    )
    print(f"[{device}] {args.size}x{args.size} px ({mp:.2f} MP), median of {args.repeats}:")
    print(f"  window pass, full network, simulated tissue : {t_win:7.2f} s = {mp / t_win:.4f} MP/s")
    print(
        f"  block-wise masks, synthetic cells (28 px)   : {t_masks:7.2f} s = "
        f"{mp / t_masks:.4f} MP/s"
    )
    print(f"  whole pipeline (sum)                        : {mp / (t_win + t_masks):.4f} MP/s")
    image, rows, cols = tissue_inputs(args.ratio_size, seed=1)
    mp = image.size / 1e6
    t_ours = median_time(lambda: ours(net, image, rows, cols, device), args.repeats)
    t_up = median_time(
        lambda: upstream_recipe(model_path, image, rows, cols, device), args.upstream_repeats
    )
    print(
        f"[{device}] {args.ratio_size}x{args.ratio_size} px ({mp:.2f} MP), same network "
        "(random weights: few cells, so per-window masks cost little here):"
    )
    print(
        f"  ours (global windows, stride 192, masks once)       : {t_ours:7.2f} s "
        f"(median of {args.repeats})"
    )
    print(
        f"  upstream recipe (reload + per-window eval and masks): {t_up:7.2f} s "
        f"(median of {args.upstream_repeats})"
    )
    print(f"  ratio upstream / ours: {t_up / t_ours:.2f}x")


def _cell_tile() -> tuple[np.ndarray, np.ndarray]:
    """One period of the synthetic tissue: field [3, P, P] and image [P, P] uint8."""
    ys, xs = np.mgrid[:PERIOD, :PERIOD].astype(np.float32)
    dy, dx = CENTRE[0] - ys, CENTRE[1] - xs
    dist = np.sqrt(dy * dy + dx * dx)
    cell = dist <= REACH * PERIOD
    field = np.stack(
        [
            np.where(cell, 5 * dy / dist, 0),
            np.where(cell, 5 * dx / dist, 0),
            np.where(cell, 5.0, -5.0),
        ]
    )
    return field, np.where(dist <= 0.35 * PERIOD, 200, 30).astype(np.uint8)


def synthetic_slide(field: np.ndarray, image: np.ndarray, rows_per_step: int = 1024) -> int:
    """Fill ``field`` [3, H, W] with network-like flows (5x unit vectors toward the cell
    centre) and logits (+-5) of touching rounded cells on a square lattice of
    ``PERIOD`` px (about 510,000 cells on 20,000 x 20,000 px), and ``image`` with their
    nuclei. Returns the number of cell centres inside the image."""
    height, width = image.shape
    tile_field, tile_image = _cell_tile()
    reps = (rows_per_step // PERIOD + 2, width // PERIOD + 2)
    big_field = np.tile(tile_field, (1, *reps))
    big_image = np.tile(tile_image, reps)
    for r0 in range(0, height, rows_per_step):
        r1 = min(r0 + rows_per_step, height)
        phase = r0 % PERIOD
        field[:, r0:r1] = big_field[:, phase : phase + r1 - r0, :width]
        image[r0:r1] = big_image[phase : phase + r1 - r0, :width]
    per_axis = [len(np.arange(CENTRE[k], n, PERIOD)) for k, n in enumerate((height, width))]
    return per_axis[0] * per_axis[1]


def child(args) -> None:
    """One memory measurement; prints a JSON line."""
    side = int(round(np.sqrt(args.child * 1e6)))
    shape = (side, side)
    out = Path(tempfile.mkdtemp(prefix="bench_inference_"))
    times = {}
    start = time.perf_counter()
    image = np.zeros(shape, np.uint8)
    cfg = SlideRunConfig(
        slide=SlideConfig(evaluation=EvalConfig(flow_threshold=args.flow_threshold)), mapping=True
    )
    if args.mode == "full":
        rng = np.random.default_rng(0)
        n_spots = int(0.03 * side * side)
        genes = pd.Categorical.from_codes(
            rng.integers(0, 100, n_spots), [f"g{k}" for k in range(100)]
        )
        spots = pd.DataFrame(
            {"x": rng.uniform(0, side, n_spots), "y": rng.uniform(0, side, n_spots), "gene": genes}
        )
        index = SpotIndex(
            spots.y.to_numpy().astype(np.int32), spots.x.to_numpy().astype(np.int32), shape
        )
        write_tiled_tiff(out / "heat.tif", heatmap_tiles(index, 7.0, tile=HEATMAP_TILE), shape,
                         np.uint8, HEATMAP_TILE)
        torch.manual_seed(0)
        net = GeneSegUNet(NetConfig(nbase=(8, 16, 16, 16))).eval()
        times["setup"] = time.perf_counter() - start
        result = predict_slide(
            net, image, index, cfg.slide, diam_mean=34.0, diam_labels=34.0, device="cpu"
        )
        times["windows"] = time.perf_counter() - start - sum(times.values())
        field = result.field
    else:
        field = np.empty((3, *shape), np.float16)
    n_sites = synthetic_slide(field, image)
    times["synthetic field"] = time.perf_counter() - start - sum(times.values())
    labels = reconstruct_blockwise(
        field[:2], field[2], block_size=cfg.block_size, halo=64, flow_threshold=args.flow_threshold
    )
    del field
    if args.mode == "full":
        del result
    times["masks"] = time.perf_counter() - start - sum(times.values())
    peak_masks = peak_rss_mb()
    write_label_outputs(out, "slide", labels, image)
    if args.mode == "full":
        write_mapping(out, "slide", labels, spots)
    times["outputs"] = time.perf_counter() - start - sum(times.values())
    print(
        json.dumps(
            {
                "mp": side * side / 1e6,
                "side": side,
                "cells": int(labels.max()),
                "centres": n_sites,
                "peak_mb": peak_rss_mb(),
                "peak_until_masks_mb": peak_masks,
                "cpu_s": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]),
                "times": times,
            }
        )
    )
    for path in out.iterdir():
        path.unlink()
    out.rmdir()


def section_memory(args) -> None:
    print(
        f"peak memory (VmHWM of a child process), mode {args.mode}, flow_threshold "
        f"{args.flow_threshold}, canvas float16, blocks 2048 + 64 halo:"
    )
    print(
        f"  {'MP':>6} {'side':>6} {'centres':>8} {'cells':>8} {'peak MiB':>9} {'B/px':>6}"
        "  times (s)"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for size in args.sizes:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            str(size),
            "--mode",
            args.mode,
            "--flow_threshold",
            str(args.flow_threshold),
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            print(f"  {size} MP failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        times = ", ".join(f"{k} {v:.1f}" for k, v in r["times"].items())
        print(
            f"  {r['mp']:6.1f} {r['side']:6d} {r['centres']:8d} {r['cells']:8d} "
            f"{r['peak_mb']:9.0f} {r['peak_mb'] * 1.048576 / r['mp']:6.1f}  {times}; "
            f"CPU {r['cpu_s']:.0f} s; peak until masks done {r['peak_until_masks_mb']:.0f} MiB"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="throughput image side (px)")
    parser.add_argument("--ratio_size", type=int, default=384, help="ratio image side (px)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--upstream_repeats", type=int, default=2)
    parser.add_argument("--sizes", default="4", help="comma-separated megapixels")
    parser.add_argument("--mode", choices=("full", "flows"), default="full")
    parser.add_argument("--flow_threshold", type=float, default=0.4)
    parser.add_argument("--skip_throughput", action="store_true")
    parser.add_argument("--child", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args)
        return
    args.sizes = [float(s) for s in args.sizes.split(",") if s]
    print(THREADS_LINE)
    if not args.skip_throughput:
        with tempfile.TemporaryDirectory() as tmp:
            section_throughput(args, "cpu", Path(tmp))
            if torch.cuda.is_available():
                section_throughput(args, "cuda", Path(tmp))
    if args.sizes:
        section_memory(args)


if __name__ == "__main__":
    main()
