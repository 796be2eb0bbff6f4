"""Are the per-transcript confidence columns calibrated? Accuracy by confidence decile.

Simulated truth: :func:`GeneSegNet.data.simulate.simulate_tissue` with
``preset_config("dense")`` (truth spots carry their source ``cell_id``; 0 = noise).

Segmentations (each imperfect in its own way), run in turn:

- ``nuclei``: the simulation's starting labels, the detected nuclei expanded by
  ``label_expansion_um`` (dim nuclei missed, cells under-segmented at their rim);
- ``dilated``: the true cells expanded by ``--shift_um`` into the background
  (:func:`skimage.segmentation.expand_labels`): over-segmentation;
- ``shifted``: the true cells moved by ``--shift_um`` in x and y (misregistration).

Each segmented cell stands for the true cell it overlaps most (0 if only background).

Probability map (synthetic, no network): logit = (signed distance to the true cell
boundary, µm, positive inside) / ``--scale_um`` + Gaussian noise smoothed over
``--noise_um`` and scaled to standard deviation ``--noise_sd``; probability = sigmoid.

A transcript is correctly assigned when the true cell its segmented cell stands for is
its true cell (background counts as cell 0). Printed: accuracy per decile of
``cell_probability`` (transcripts in segmented cells) and of ``boundary_distance_um``
(all transcripts, as |distance|), and how often a wrongly assigned transcript's true
cell is its ``nearest_cell_id``. Decile tables are printed as one row of accuracies
(decile 1 = lowest score ... 10 = highest).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def decile_accuracy(score: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(10,) accuracy and (11,) score edges over the deciles of ``score`` (NaN dropped)."""
    keep = np.isfinite(score)
    score, correct = score[keep], correct[keep]
    order = np.argsort(score, kind="stable")
    parts = np.array_split(order, 10)
    acc = np.array([correct[p].mean() if len(p) else np.nan for p in parts])
    edges = np.array([score[p[0]] for p in parts if len(p)] + [score[order[-1]]])
    return acc, edges


def _row(name: str, score: np.ndarray, correct: np.ndarray) -> str:
    if not len(score):
        return f"  {name:44s} (no transcripts)"
    acc, edges = decile_accuracy(score, correct)
    return (f"  {name:44s} n={len(score):6d} range {edges[0]:.3g}..{edges[-1]:.3g}\n"
            f"  {'':44s} " + " ".join(f"{a:.2f}" for a in acc))


def segmentation(kind: str, sim, shift_px: int) -> np.ndarray:
    from skimage.segmentation import expand_labels

    if kind == "nuclei":
        return sim.labels
    if kind == "dilated":
        return expand_labels(sim.cells, shift_px).astype(np.int32)
    shifted = np.zeros_like(sim.cells)
    shifted[shift_px:, shift_px:] = sim.cells[:-shift_px, :-shift_px]
    return shifted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale_um", type=float, default=1.0)
    parser.add_argument("--noise_sd", type=float, default=1.0)
    parser.add_argument("--noise_um", type=float, default=2.0)
    parser.add_argument("--shift_um", type=float, default=1.0)
    args = parser.parse_args(argv)

    from GeneSegNet.data.sim_config import preset_config
    from GeneSegNet.data.simulate import simulate_tissue
    from GeneSegNet.export.confidence import label_edges, transcript_confidence
    from GeneSegNet.mapping import lookup_cell_ids

    cfg = preset_config("dense")
    sim = simulate_tissue(cfg, rng=args.seed)
    px = sim.pixel_size_um
    truth, seg = sim.cells, sim.labels
    rng = np.random.default_rng(args.seed + 1)
    true_distance = ndimage.distance_transform_edt(~label_edges(truth)) + 0.5
    true_distance[truth == 0] *= -1
    noise = ndimage.gaussian_filter(rng.normal(size=truth.shape), args.noise_um / px)
    noise *= args.noise_sd / max(noise.std(), 1e-12)
    logit = (true_distance * px / args.scale_um + noise).astype(np.float32)
    spots = sim.spots
    x, y = spots["x"].to_numpy(float), spots["y"].to_numpy(float)
    true_cell = spots["cell_id"].to_numpy()
    shift_px = max(1, int(round(args.shift_um / px)))
    print(f"dense preset: {truth.shape[1]}x{truth.shape[0]} px at {px} µm/px, "
          f"{int(truth.max())} true cells, {len(spots)} transcripts "
          f"({np.mean(true_cell == 0):.3f} noise)")
    print(f"synthetic logit = signed distance to the true boundary / {args.scale_um} µm + "
          f"smoothed noise (sd {args.noise_sd}, {args.noise_um} µm); shift/dilation "
          f"{shift_px} px")
    for kind in ("nuclei", "dilated", "shifted"):
        seg = segmentation(kind, sim, shift_px)
        pairs = pd.DataFrame({"seg": seg.ravel(), "true": truth.ravel()})
        pairs = pairs[pairs.seg > 0].value_counts().reset_index(name="n")
        best = pairs.sort_values("n", ascending=False).drop_duplicates("seg")
        stands_for = np.zeros(int(seg.max()) + 1, dtype=np.int64)
        stands_for[best.seg.to_numpy()] = best.true.to_numpy()
        assigned, _, inside = lookup_cell_ids(seg, x, y)
        conf = transcript_confidence(seg, x, y, cell_logit=logit, pixel_size_um=px)
        correct = stands_for[assigned] == true_cell
        in_cell = assigned > 0
        prob = conf["cell_probability"].to_numpy()
        dist = conf["boundary_distance_um"].to_numpy()
        print(f"\n[{kind}] {int(seg.max())} segmented cells; accuracy overall "
              f"{correct.mean():.3f}, in cells {correct[in_cell].mean():.3f}, on background "
              f"{correct[~in_cell].mean():.3f}; accuracy by decile (low -> high score):")
        print(_row("cell_probability (in cells)", prob[in_cell], correct[in_cell]))
        print(_row("boundary_distance_um (in cells)", dist[in_cell], correct[in_cell]))
        print(_row("-boundary_distance_um (background)", -dist[~in_cell & inside],
                   correct[~in_cell & inside]))
        wrong = ~correct & (true_cell > 0)
        nearest_true = stands_for[conf["nearest_cell_id"].to_numpy()] == true_cell
        share = f"{nearest_true[wrong].mean():.3f}" if wrong.any() else "-"
        print(f"  wrongly assigned transcripts of a true cell: {int(wrong.sum())}; their true "
              f"cell is the nearest other cell for {share}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
