"""Saturation of the transcript channel: upstream heatmap vs per-slide scaled density.

For each simulator preset (one seeded sample), prints for the heatmap (σ = 7 px, max 1)
and the density (σ = 2 µm, divided by the slide scale): the mean, the fraction of pixels
>= 0.9 x reference (heatmap: 1.0; density: the map's 99.9th percentile), the fraction > 0.9
in absolute value, and the contrast (mean inside true cells / mean in true background).
For the gene channels (3-component embedding learnt on the sample's own table) it prints
eta² of per-cell channel means against the true cell type (share of the variance across
cells that the type explains; 0 = no type information).

Run: python bench/bench_transcripts.py [--presets demo dense sparse] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from GeneSegNet.data.gene_embedding import learn_gene_embedding
from GeneSegNet.data.simulate import preset_config, simulate_tissue
from GeneSegNet.data.transcripts import (
    TranscriptInput,
    saturation_stats,
    slide_density_scale,
    transcript_channels,
)


def eta_squared(values: np.ndarray, cells: np.ndarray, types: np.ndarray) -> float:
    """Share of the variance of per-cell means of ``values`` explained by the cell type."""
    ids = cells.ravel()
    count = np.bincount(ids)
    means = np.bincount(ids, weights=values.ravel()) / np.maximum(count, 1)
    keep = (np.arange(len(count)) > 0) & (count > 0)
    means, cell_types = means[keep], types[: len(count)][keep]
    total = np.sum((means - means.mean()) ** 2)
    between = sum(np.sum(cell_types == t) * (means[cell_types == t].mean() - means.mean()) ** 2
                  for t in np.unique(cell_types))
    return float(between / total) if total > 0 else 0.0


def measure(preset: str, seed: int) -> None:
    start = time.perf_counter()
    sample = simulate_tissue(preset_config(preset), seed)
    px = sample.pixel_size_um
    rows, cols = sample.spots["y"].to_numpy(), sample.spots["x"].to_numpy()
    shape = sample.cells.shape
    cells = sample.cells > 0
    area_um2 = shape[0] * shape[1] * px * px
    print(f"\n== {preset}: {shape[0]}x{shape[1]} px at {px} µm/px, {len(rows)} transcripts "
          f"({len(rows) / area_um2:.3f}/µm² overall, {cells.mean():.2f} of pixels in cells)")
    heat = transcript_channels(rows, cols, None, shape, TranscriptInput(mode="heatmap"))[0]
    cfg = TranscriptInput(mode="density", n_gene_channels=3)
    scale = slide_density_scale(rows, cols, pixel_size_um=px, sigma_um=cfg.sigma_um)
    emb = learn_gene_embedding([sample.spots], pixel_size_um=px, n_components=3)
    chans = transcript_channels(rows, cols, emb.encode(sample.spots["gene"]), shape, cfg,
                                pixel_size_um=px, slide_scale=scale, embedding=emb)
    print(f"slide scale {scale:.3f} transcripts/µm²; σ heatmap 7 px = {7 * px:.2f} µm, "
          f"σ density {cfg.sigma_um} µm = {cfg.sigma_um / px:.2f} px")
    print(f"{'channel':<10}{'mean':>8}{'>=0.9ref':>10}{'>0.9':>8}{'ref':>8}{'in/bg':>8}")
    for name, chan, ref in (("heatmap", heat, 1.0), ("density", chans[0], None)):
        s = saturation_stats(chan, cells, reference=ref)
        print(f"{name:<10}{s['mean']:>8.3f}{s['fraction_high']:>10.3f}"
              f"{np.mean(chan > 0.9):>8.3f}{s['reference']:>8.3f}{s['contrast']:>8.2f}")
    types = sample.cell_types
    etas = [eta_squared(c, sample.cells, types) for c in chans[1:]]
    eta_density = eta_squared(chans[0], sample.cells, types)
    eta_heat = eta_squared(heat, sample.cells, types)
    genes = ", ".join(f"{e:.3f}" for e in etas)
    print(f"eta² of per-cell means vs true type: heatmap {eta_heat:.3f}, "
          f"density {eta_density:.3f}, gene channels {genes}")
    print(f"({time.perf_counter() - start:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["demo", "dense", "sparse"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for preset in args.presets:
        measure(preset, args.seed)


if __name__ == "__main__":
    main()
