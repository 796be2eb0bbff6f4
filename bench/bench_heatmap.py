"""Heatmap speed: exact EDT rendering vs upstream's stack of per-spot maps.

1. 256×256 crop with 100, 1000 and 5000 spots: median time of both, and the ratio.
2. Whole image of 10,000×10,000 px with 10^6 spots: time and peak memory (measured in a
   child process as the growth of its peak resident set size, VmHWM).

Run: python bench/bench_heatmap.py [--whole_size 10000 --whole_spots 1000000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_time, peak_rss_mb, single_thread  # noqa: E402

from GeneSegNet.data.heatmap import TRUNCATE_EXPONENT, render_heatmap  # noqa: E402


def stacked_reference(rows, cols, shape, sigma=7.0):
    """Upstream's recipe: an [N, H, W] float32 stack of truncated Gaussians, then max."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    d2 = (xx[None] - cols[:, None, None].astype(np.float32)) ** 2 + (
        yy[None] - rows[:, None, None].astype(np.float32)) ** 2
    e = d2 / np.float32(2 * sigma * sigma)
    stack = np.where(e > TRUNCATE_EXPONENT, np.float32(0), np.exp(-e))
    return stack.max(axis=0)


def crop_benchmark() -> None:
    rng = np.random.default_rng(0)
    print("256×256 crop, sigma 7")
    print(f"{'spots':>6} {'EDT (ms)':>10} {'stack (ms)':>11} {'speed-up':>9} {'max |diff|':>11}")
    for n in (100, 1000, 5000):
        rows, cols = rng.integers(0, 256, n), rng.integers(0, 256, n)
        ours = median_time(lambda r=rows, c=cols: render_heatmap(r, c, (256, 256)), repeats=9)
        ref = median_time(lambda r=rows, c=cols: stacked_reference(r, c, (256, 256)),
                          repeats=3 if n >= 5000 else 5)
        diff = np.abs(render_heatmap(rows, cols, (256, 256))
                      - stacked_reference(rows, cols, (256, 256))).max()
        print(f"{n:>6} {ours * 1e3:>10.2f} {ref * 1e3:>11.1f} {ref / ours:>8.0f}× {diff:>11.2e}")


def whole_image_child(size: int, n_spots: int) -> None:
    single_thread()
    rng = np.random.default_rng(1)
    rows = rng.integers(0, size, n_spots)
    cols = rng.integers(0, size, n_spots)
    base = peak_rss_mb()
    start = time.perf_counter()
    heat = render_heatmap(rows, cols, (size, size))
    elapsed = time.perf_counter() - start
    peak = peak_rss_mb()
    print(json.dumps({"seconds": elapsed, "peak_growth_mb": peak - base,
                      "output_mb": heat.nbytes / 2**20, "mean": float(heat.mean())}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--whole_size", type=int, default=10_000)
    parser.add_argument("--whole_spots", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        whole_image_child(args.whole_size, args.whole_spots)
        return 0
    print(single_thread())
    crop_benchmark()
    runs = []
    for _ in range(args.repeats):
        out = subprocess.run([sys.executable, __file__, "--child", "--whole_size",
                              str(args.whole_size), "--whole_spots", str(args.whole_spots)],
                             check=True, capture_output=True, text=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    secs = sorted(r["seconds"] for r in runs)[len(runs) // 2]
    mem = sorted(r["peak_growth_mb"] for r in runs)[len(runs) // 2]
    print(f"whole image {args.whole_size}×{args.whole_size} px, {args.whole_spots} spots "
          f"(median of {len(runs)} runs): {secs:.2f} s, peak memory growth {mem:.0f} MB "
          f"(of which the float32 output is {runs[0]['output_mb']:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
