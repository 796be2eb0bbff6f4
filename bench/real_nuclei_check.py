"""Real-texture check of the image side: GeneSegNet trained on degraded labels of real nuclei.

Data: the fluorescence nuclei image shipped in the ``stardist`` wheel
(``stardist/data/images/img2d.tif`` with its true mask ``mask2d.tif``; 512 x 512, 125 nuclei,
2018 Data Science Bowl, CC0). The file is located without importing stardist.

Per fold, one 256 x 256 quadrant is held out; of the other three, two are training images and
one is the validation image. The network is trained on labels DEGRADED from the true mask
(:func:`degrade_labels`, seeded: ~20 % of the nuclei dropped, every other nucleus shrunk or
grown by 1-3 px, a few touching pairs merged, a few false blobs on background), with no
transcripts: the spot tables are empty, preprocessing uses the upstream heatmap mode (so the
transcript channel is zero) and there is no pixel size, so relabelling between rounds is
upstream's morphology refinement. Everything goes through the real scripts.

Rows scored on the held-out quadrant against the TRUE mask: the degraded labels, a classical
segmentation (:func:`GeneSegNet.data.nuclei.segment_nuclei` at the median diameter of the
degraded training labels), GeneSegNet round 1 and round 2 (whole-image inference of the
quadrant). AP = TP / (TP + FP + FN) at IoU 0.5 / 0.75 / 0.9; found = predicted / true cells.

Run: python bench/real_nuclei_check.py --out_dir real_nuclei_run [--folds 4] [--n_epochs 50]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tifffile  # noqa: E402
import torch  # noqa: E402
from scipy import ndimage  # noqa: E402
from skimage.morphology import disk  # noqa: E402
from skimage.segmentation import relabel_sequential  # noqa: E402

import GeneSeg_train  # noqa: E402
from GeneSegNet.data.nuclei import segment_nuclei  # noqa: E402
from GeneSegNet.dynamics.masks import diameters  # noqa: E402
from GeneSegNet.evaluation.metrics import match  # noqa: E402
from GeneSegNet.io import read_label, write_image, write_label  # noqa: E402
from Inference import slidingwindows_gradient  # noqa: E402
from preprocess import Generate_Image_Label_locationMap  # noqa: E402

QUADRANTS = ((0, 0), (0, 256), (256, 0), (256, 256))  # (row, col) origin of quadrant q
QSIZE = 256
MEASURES = ("AP@0.5", "AP@0.75", "AP@0.9")


# ---------------------------------------------------------------- data


def stardist_files() -> tuple[Path, Path]:
    """(image, mask) paths of the stardist 2-D example, or FileNotFoundError."""
    spec = importlib.util.find_spec("stardist")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the stardist package is not installed")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "images"
    image, mask = folder / "img2d.tif", folder / "mask2d.tif"
    for path in (image, mask):
        if not path.is_file():
            raise FileNotFoundError(path)
    return image, mask


def load_real_nuclei() -> tuple[np.ndarray, np.ndarray]:
    """(image (512, 512) as stored, true mask (512, 512) int64 with ids 1..n)."""
    image_path, mask_path = stardist_files()
    image = tifffile.imread(image_path)
    mask = relabel_sequential(tifffile.imread(mask_path).astype(np.int64))[0]
    return image, mask


def quadrant(array: np.ndarray, q: int) -> np.ndarray:
    r, c = QUADRANTS[q]
    return array[r:r + QSIZE, c:c + QSIZE]


def quadrant_labels(labels: np.ndarray, q: int) -> np.ndarray:
    """Quadrant ``q`` of a label image, cells renumbered 1..n (cut cells keep their part)."""
    return relabel_sequential(np.ascontiguousarray(quadrant(labels, q)))[0]


# ---------------------------------------------------------------- degradation


def _touching_pairs(labels: np.ndarray, gap: int = 2) -> list[tuple[int, int]]:
    """Pairs (a < b) of labels within ``gap`` px of each other."""
    pairs = set()
    for lab, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        box = tuple(slice(max(b.start - gap, 0), b.stop + gap) for b in box)
        window = labels[box]
        own = window == lab
        ring = ndimage.binary_dilation(own, iterations=gap) & ~own
        for other in np.unique(window[ring]):
            if other > 0 and other != lab:
                pairs.add((int(min(lab, other)), int(max(lab, other))))
    return sorted(pairs)


def degrade_labels(true: np.ndarray, seed: int = 0, drop: float = 0.2, max_change: int = 3,
                   n_merge: int = 4, n_false: int = 5) -> np.ndarray:
    """Noisy starting labels made from a true mask (seeded; same seed, same result).

    1. merge ``n_merge`` disjoint pairs of nuclei lying within 2 px of each other into one
       label (the gap between them closed);
    2. drop a fraction ``drop`` of the other nuclei;
    3. shrink or grow every remaining label by a random 1..``max_change`` px (sign and size
       drawn per label; growth only into background, a label is kept at >= 1 px);
    4. add ``n_false`` false blobs (disks of radius 5-10 px) on background far from nuclei.

    Returns an int64 label image with ids 1..n.
    """
    rng = np.random.default_rng(seed)
    true = relabel_sequential(np.asarray(true).astype(np.int64))[0]
    out = true.copy()
    ids = [int(i) for i in np.unique(true[true > 0])]

    merged: set[int] = set()
    pairs = _touching_pairs(true)
    for k in rng.permutation(len(pairs)):
        if len(merged) >= 2 * n_merge:
            break
        a, b = pairs[k]
        if a in merged or b in merged:
            continue
        both = (out == a) | (out == b)
        closed = ndimage.binary_closing(both, structure=disk(3), iterations=1)
        out[(closed & (out == 0)) | (out == b)] = a
        merged.update((a, b))

    single = [i for i in ids if i not in merged]
    dropped = rng.choice(single, size=int(round(drop * len(single))), replace=False)
    out[np.isin(out, dropped)] = 0

    boxes = ndimage.find_objects(out)
    for lab in np.unique(out[out > 0]):
        step = int(rng.integers(1, max_change + 1)) * (1 if rng.random() < 0.5 else -1)
        box = tuple(slice(max(b.start - abs(step), 0), b.stop + abs(step))
                    for b in boxes[lab - 1])
        window = out[box]  # a view: edits change ``out``
        own = window == lab
        if step > 0:
            grown = ndimage.binary_dilation(own, structure=disk(step))
            window[grown & (window == 0)] = lab
        else:
            kept = ndimage.binary_erosion(own, structure=disk(-step))
            if kept.any():
                window[own & ~kept] = 0

    far = ndimage.distance_transform_edt(true == 0) > 14
    far[:12, :] = far[-12:, :] = far[:, :12] = far[:, -12:] = False
    next_id = int(out.max()) + 1
    rows, cols = np.nonzero(far)
    for _ in range(n_false):
        if rows.size == 0:
            break
        k = int(rng.integers(rows.size))
        radius = int(rng.integers(5, 11))
        rr, cc = np.ogrid[:out.shape[0], :out.shape[1]]
        blob = ((rr - rows[k]) ** 2 + (cc - cols[k]) ** 2 <= radius ** 2) & (out == 0)
        out[blob] = next_id
        next_id += 1
        far &= ~ndimage.binary_dilation(blob, iterations=2 * radius)
        rows, cols = np.nonzero(far)
    return relabel_sequential(out)[0]


# ---------------------------------------------------------------- scoring


def score(true: np.ndarray, pred: np.ndarray) -> dict:
    found = match(true.astype(np.int64), np.asarray(pred).astype(np.int64)).as_dict()
    return {**{m: float(found[m]) for m in MEASURES}, "n_pred": int(found["n_pred"]),
            "n_true": int(found["n_true"])}


# ---------------------------------------------------------------- one fold


def _check(code: int, what: str) -> None:
    if code != 0:
        raise SystemExit(f"{what} failed with exit code {code}")


def _write_raw(root: Path, name: str, image: np.ndarray, labels: np.ndarray | None) -> None:
    """One sample of the raw layout: image, labels (optional) and an EMPTY spot table."""
    for sub in ("images", "spots") + (("labels",) if labels is not None else ()):
        (root / sub).mkdir(parents=True, exist_ok=True)
    write_image(root / "images" / f"{name}.tif", image)
    if labels is not None:
        write_label(root / "labels" / f"{name}.tif", labels.astype(np.uint16))
    (root / "spots" / f"{name}.csv").write_text("x,y,gene\n")


def run_fold(q: int, image: np.ndarray, true: np.ndarray, degraded: np.ndarray, args,
             out: Path) -> tuple[list[tuple[str, dict]], float, str]:
    others = [k for k in range(4) if k != q]
    val_q = others[(q + 1) % 3]
    train_qs = [k for k in others if k != val_q]
    fold = out / f"fold_q{q}"
    for part, qs in (("train", train_qs), ("val", [val_q])):
        for k in qs:
            _write_raw(fold / f"raw_{part}", f"q{k}", quadrant(image, k),
                       quadrant_labels(degraded, k))
        _check(Generate_Image_Label_locationMap.main([
            "--base_dir", str(fold / f"raw_{part}"), "--save_crop_dir", str(fold / "crops" / part),
            "--n_crops", str(args.n_crops), "--crop_size", str(args.crop_size),
            "--transcript_input", "heatmap", "--seed", str(args.seed + k)]),
            f"preprocessing {part}")
    _write_raw(fold / "raw_test", f"q{q}", quadrant(image, q), None)
    truth = quadrant_labels(true, q)

    run = fold / "run"
    start = time.perf_counter()
    _check(GeneSeg_train.main([
        "--train_dir", str(fold / "crops" / "train"), "--val_dir", str(fold / "crops" / "val"),
        "--save_model_dir", str(run), "--all_channels", "--recursive_num", str(args.rounds),
        "--n_epochs", str(args.n_epochs), "--learning_rate", str(args.learning_rate),
        "--nbase", *map(str, args.nbase), "--train_tile_size", str(args.train_tile_size),
        "--diam_mean", str(args.diam_mean), "--diameter", "0", "--seed", str(args.seed),
        "--refine_method", args.refine_method, "--relabel_min_size", str(args.relabel_min_size),
        "--warm_start_rounds"]), f"training fold q{q}")
    minutes = (time.perf_counter() - start) / 60
    manifest = json.loads(max(run.glob("run_*.json")).read_text())

    train_labels = np.concatenate([diameters(quadrant_labels(degraded, k))[1]
                                   for k in (*train_qs, val_q)])
    diam = float(np.median(train_labels))
    rows = [("degraded labels", score(truth, quadrant_labels(degraded, q))),
            (f"classical segment_nuclei (d={diam:.0f}px)",
             score(truth, segment_nuclei(quadrant(image, q), pixel_size_um=1.0,
                                         diameter_um=diam)))]
    for n, record in enumerate(manifest["rounds"], start=1):
        save = fold / f"pred_round{n}"
        _check(slidingwindows_gradient.main([
            "--root_dir", str(fold / "raw_test"), "--save_dir", str(save),
            "--model_file", record["model_used"], "--diameter", "0", "--no_heatmap"]),
            f"inference fold q{q} round {n}")
        pred = read_label(next(save.glob(f"label_q{q}.*")))
        rows.append((f"GeneSegNet round {n}", score(truth, pred)))
    notes = []
    for record in manifest["rounds"]:
        note = f"round {record['round']}: label diameter {record['diam_labels']:.1f} px"
        relabelled = (record.get("relabelled") or {}).get("train")
        if relabelled:
            before = record["input_labels"]["train"]
            note += (f", relabelling (train) {before['n_cells']} cells of median area "
                     f"{before['median_area']:.0f} px2 -> {relabelled['n_cells']} of "
                     f"{relabelled['stats']['median_area']:.0f} px2")
        notes.append(note)
    return rows, minutes, f"train q{train_qs[0]},q{train_qs[1]} val q{val_q}; " + "; ".join(
        notes)


# ---------------------------------------------------------------- report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", type=Path, default=Path("real_nuclei_run"))
    parser.add_argument("--folds", type=int, default=4, choices=(1, 2, 3, 4),
                        help="held-out quadrants 0..folds-1 (4 = every quadrant)")
    parser.add_argument("--n_epochs", type=int, default=50, help="epochs per round")
    parser.add_argument("--rounds", type=int, default=2, help="--recursive_num")
    parser.add_argument("--n_crops", type=int, default=8, help="crops per training quadrant")
    parser.add_argument("--crop_size", type=int, default=160)
    parser.add_argument("--learning_rate", type=float, default=0.01)
    parser.add_argument("--nbase", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--train_tile_size", type=int, default=112)
    parser.add_argument("--diam_mean", type=float, default=17.0)
    parser.add_argument("--relabel_min_size", type=int, default=50,
                        help="refined labels drop cells smaller than this (px; upstream 300 "
                             "would drop most of these ~20-px nuclei)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--refine_method", default="morphology",
                        help="relabelling between rounds (GeneSeg_train.py --refine_method)")
    parser.add_argument("--seed", type=int, default=0, help="degradation and training seed")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out_dir
    if out.exists():
        raise SystemExit(f"{out} exists; choose another --out_dir or remove it")
    out.mkdir(parents=True)
    begin = time.perf_counter()
    image, true = load_real_nuclei()
    # the image's values fit 8 bits (0..235 here): store them losslessly as uint8
    if image.max() <= 255:
        image = image.astype(np.uint8)
    degraded = degrade_labels(true, seed=args.seed)
    whole = score(true, degraded)
    table: list[tuple[str, str, dict]] = []
    minutes: list[float] = []
    notes: list[str] = []
    for q in range(args.folds):
        rows, mins, note = run_fold(q, image, true, degraded, args, out)
        minutes.append(mins)
        notes.append(f"  held-out q{q}: {note}")
        table += [(f"q{q}", name, r) for name, r in rows]
        print(f"fold q{q} done: {mins:.1f} min training", flush=True)

    print(f"\nstardist img2d (512x512, {int(true.max())} true nuclei); degraded labels "
          f"(seed {args.seed}) on the whole image: " + "  ".join(
              f"{m} {whole[m]:.3f}" for m in MEASURES) + f"  cells {whole['n_pred']}/"
          f"{whole['n_true']}")
    print(f"{args.rounds} rounds x {args.n_epochs} epochs, network "
          f"{'/'.join(map(str, args.nbase))}, {args.threads} torch thread(s); training "
          f"minutes per fold: {', '.join(f'{m:.1f}' for m in minutes)}; no transcripts "
          f"(heatmap mode, empty spots), {args.refine_method} relabelling")
    print("\n".join(notes))
    header = f"{'held-out':<9}{'segmentation':<36}" + "".join(f"{m:>9}" for m in MEASURES) \
        + f"{'found/true':>12}"
    print(header)
    for fold, name, r in table:
        print(f"{fold:<9}{name:<36}" + "".join(f"{r[m]:>9.3f}" for m in MEASURES)
              + f"{r['n_pred']:>7}/{r['n_true']:<4}")
    names = list(dict.fromkeys(name.split(" (d=")[0] for _, name, _ in table))
    for name in names:
        rs = [r for _, n, r in table if n.split(" (d=")[0] == name]
        print(f"{'mean':<9}{name:<36}" + "".join(
            f"{np.mean([r[m] for r in rs]):>9.3f}" for m in MEASURES)
            + f"{sum(r['n_pred'] for r in rs):>7}/{sum(r['n_true'] for r in rs):<4}")
    total = (time.perf_counter() - begin) / 60
    print(f"total {total:.1f} min")
    (out / "real_nuclei_check.json").write_text(json.dumps({
        "args": {k: str(v) for k, v in vars(args).items()}, "degraded_whole": whole,
        "training_minutes": minutes, "notes": notes, "total_minutes": total,
        "rows": [{"held_out": f, "segmentation": n, **r} for f, n, r in table]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
