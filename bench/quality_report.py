"""Quality report: does recursive training with the spot heatmap beat the starting labels?

On simulated tissue whose starting labels are expanded nuclei (dim nuclei missing, cells
larger than their nuclei), reports AP at IoU 0.5 (and 0.75, and transcript assignment
accuracy) against the TRUE cells of the held-out test images, for

(a) the starting labels;
(b) the model after each recursive round (whole-image inference with the spot heatmap);
(c) an image-only model (heatmaps zeroed in training, no spots at inference), trained
    with the same budget (same rounds, epochs and network).

Everything goes through the real scripts. Not a CI test: it trains 2 models (about
10 minutes on 2 CPU cores with the defaults below).

Run: python bench/quality_report.py [--out_dir quality_run --n_samples 6 --n_epochs 12]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import GeneSeg_train  # noqa: E402
from GeneSegNet.evaluation.truth import score_folder  # noqa: E402
from GeneSegNet.io import read_image, write_image  # noqa: E402
from Inference import slidingwindows_gradient  # noqa: E402
from preprocess import Generate_Image_Label_locationMap, simulate_tissue  # noqa: E402

TRAIN_FLAGS = ["--all_channels", "--metrics", "--recursive_num", "2", "--learning_rate", "0.01",
               "--nbase", "8", "16", "32", "64", "--train_tile_size", "112", "--diam_mean", "17",
               "--diameter", "0", "--relabel_min_size", "50", "--warm_start_rounds"]


def _check(code: int, what: str) -> None:
    if code != 0:
        raise SystemExit(f"{what} failed with exit code {code}")


def _zero_heatmaps(src: Path, dst: Path) -> None:
    """Copy a crop dataset with every network heatmap replaced by zeros."""
    shutil.copytree(src, dst)
    for path in dst.rglob("HeatMaps/HeatMap_all/*"):
        write_image(path, np.zeros_like(read_image(path, "gray")))


def _train(crops: Path, run_dir: Path, epochs: int) -> list[Path]:
    _check(GeneSeg_train.main(["--train_dir", str(crops / "train"), "--val_dir",
                               str(crops / "val"), "--test_dir", str(crops / "test"),
                               "--save_model_dir", str(run_dir), "--n_epochs", str(epochs),
                               *TRAIN_FLAGS]), f"training in {run_dir}")
    manifest = json.loads(max(run_dir.glob("run_*.json")).read_text())
    return [Path(r["model_used"]) for r in manifest["rounds"]]


def _test_images(raw: Path, crops: Path, out: Path, with_spots: bool) -> Path:
    """A raw folder holding only the test samples (and their spots, if asked)."""
    names = [p.name for p in (crops / "test").iterdir() if p.is_dir()]
    (out / "images").mkdir(parents=True)
    for name in names:
        shutil.copy(raw / "images" / f"{name}.png", out / "images")
        if with_spots:
            (out / "spots").mkdir(exist_ok=True)
            shutil.copy(raw / "spots" / f"{name}.csv", out / "spots")
    return out


def _score(root: Path, model: Path, save: Path, truth: Path) -> dict:
    _check(slidingwindows_gradient.main(["--root_dir", str(root), "--save_dir", str(save),
                                         "--model_file", str(model), "--diameter", "0"]),
           f"inference with {model.name}")
    return score_folder(save, truth).set_index("sample").loc["mean"].to_dict()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out_dir", type=Path, default=Path("quality_run"))
    parser.add_argument("--n_samples", type=int, default=6)
    parser.add_argument("--n_epochs", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = args.out_dir
    if out.exists():
        raise SystemExit(f"{out} exists; choose another --out_dir or remove it")
    raw, crops = out / "raw", out / "crops"
    _check(simulate_tissue.main(["--out_dir", str(raw), "--n_samples", str(args.n_samples),
                                 "--seed", str(args.seed)]), "simulation")
    _check(Generate_Image_Label_locationMap.main([
        "--base_dir", str(raw), "--save_crop_dir", str(crops), "--n_crops", "20",
        "--split", "0.5", "0.17", "0.33"]), "preprocessing")
    _zero_heatmaps(crops, out / "crops_image_only")  # before training writes newlabels/
    truth = raw / "truth"
    with_spots = _test_images(raw, crops, out / "test_raw", with_spots=True)
    image_only = _test_images(raw, crops, out / "test_raw_image_only", with_spots=False)

    rows = []
    start = score_folder(raw / "labels", truth).set_index("sample")
    test_names = [p.name for p in (crops / "test").iterdir() if p.is_dir()]
    rows.append(("(a) starting labels (expanded nuclei)", start.loc[test_names].mean(
        numeric_only=True).to_dict()))
    for n, model in enumerate(_train(crops, out / "run_heatmap", args.n_epochs), start=1):
        rows.append((f"(b) GeneSegNet, image + heatmap, after round {n}",
                     _score(with_spots, model, out / f"pred_round{n}", truth)))
    models = _train(out / "crops_image_only", out / "run_image_only", args.n_epochs)
    rows.append((f"(c) image-only model, same budget (round {len(models)})",
                 _score(image_only, models[-1], out / "pred_image_only", truth)))

    print(f"\nTest images: {', '.join(sorted(test_names))}; {args.n_epochs} epochs per round, "
          "2 rounds, network 8/16/32/64; scores against the true cells")
    print(f"{'segmentation':<48} {'AP@0.5':>7} {'AP@0.75':>8} {'cells':>7} {'assign. acc.':>13}")
    for name, r in rows:
        print(f"{name:<48} {r['AP@0.5']:>7.3f} {r['AP@0.75']:>8.3f} {r['cells_found']:>7.0f} "
              f"{r['assignment_accuracy']:>13.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
