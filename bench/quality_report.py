"""Quality report: does GeneSegNet segment cells, not nuclei, better than what users do instead?

On simulated tissue (a preset of :mod:`GeneSegNet.data.sim_config`: ``dense`` is Xenium-like,
``sparse`` ISS-like) whose starting labels are the detectable nuclei, scores the HELD-OUT
test images against the true cells for

- the starting labels;
- the starting labels expanded by d µm, d = 0, 1, ..., 10 (what vendors ship), and the
  best of them (by AP@0.5, ties by transcripts in the right cell);
- the starting labels grown by their transcripts (:func:`GeneSegNet.growth.grow.grow_labels`,
  no network): the labels GeneSegNet's recursion starts from;
- each trained model after each recursive round (whole-image inference), all with the
  same budget: ``genesegnet`` (image + transcript density + gene-identity channels, labels
  grown by the transcripts between rounds); to isolate the network input, the same
  relabelling with ``heatmap`` (upstream's max-of-Gaussians heatmap as the input) and
  ``image_only`` (transcript channels zeroed, no spots at inference); and ``upstream``
  (upstream's heatmap input and upstream's morphology relabelling: the original method).

It also prints each transcript representation's saturation on the test images. Everything
goes through the real scripts. Not a CI test: each model trains for minutes.

Measures: AP at IoU 0.5/0.75/0.9; "right cell" = transcripts of true cells assigned to the
predicted cell that stands for their cell (IoU >= 0.5 pairing); "bg in cells" = true
background transcripts put in a cell; "assignment accuracy" = all transcripts, background
ones included, whose assignment (the predicted cell standing for their true cell, or none)
is right; "found" = predicted cells / true cells; recall@0.5 = true cells matched at
IoU >= 0.5. ``--working_pixel_size`` runs crops (training) and inference at that pixel
size; the results are scored on the input grid.

Run: python bench/quality_report.py --preset dense --out_dir quality_dense [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from skimage.segmentation import expand_labels  # noqa: E402

import GeneSeg_train  # noqa: E402
from bench.quality_summary import row_key  # noqa: E402
from GeneSegNet.data.heatmap import render_heatmap  # noqa: E402
from GeneSegNet.data.transcripts import (  # noqa: E402
    DEFAULT_SIGMA_UM,
    density_channel,
    saturation_stats,
    slide_density_scale,
    write_transcript_channels,
)
from GeneSegNet.evaluation.truth import score_sample  # noqa: E402
from GeneSegNet.growth.grow import grow_labels  # noqa: E402
from GeneSegNet.io import (  # noqa: E402
    atomic_path,
    read_image,
    read_label,
    read_spots,
    spot_pixels,
)
from GeneSegNet.io.metadata import metadata_path, read_metadata  # noqa: E402
from Inference import slidingwindows_gradient  # noqa: E402
from preprocess import Generate_Image_Label_locationMap, simulate_tissue  # noqa: E402

MEASURES = ("AP@0.5", "AP@0.75", "AP@0.9", "right_cell", "background_in_cells",
            "assignment_accuracy", "recall@0.5")
TRAIN_FLAGS = ["--all_channels", "--recursive_num", "2", "--learning_rate", "0.01",
               "--diameter", "0", "--relabel_min_size", "50", "--warm_start_rounds"]
MODELS = ("genesegnet", "heatmap", "image_only", "upstream")
# epochs per round by preset: at 12 the dense outlines are not sharp yet (AP@0.9 lost to
# 5 µm expansion on one image set), 30 made the sparse preset worse (README)
DEFAULT_EPOCHS = {"dense": 36, "sparse": 12, "demo": 12}


def _check(code: int, what: str) -> None:
    if code != 0:
        raise SystemExit(f"{what} failed with exit code {code}")


def _truth(raw: Path, name: str) -> tuple[np.ndarray, pd.DataFrame]:
    cells = read_label(raw / "truth" / f"{name}_cells.png").astype(np.int64)
    return cells, pd.read_csv(raw / "truth" / f"{name}_spots.csv")


def _mean_scores(per_sample: list[dict]) -> dict:
    frame = pd.DataFrame(per_sample)
    out = frame.mean(numeric_only=True).to_dict()
    out["found"] = frame["cells_found"].sum() / max(frame["true_cells"].sum(), 1)
    return out


def _score_labels(raw: Path, names: list[str], labels_of) -> dict:
    rows = []
    for name in names:
        cells, spots = _truth(raw, name)
        rows.append(score_sample(np.asarray(labels_of(name)).astype(np.int64), cells, spots))
    return _mean_scores(rows)


def _pixel_size(raw: Path, name: str) -> float:
    return read_metadata(metadata_path(raw, name)).pixel_size_um


def _spots_px(raw: Path, name: str, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    spots = read_spots(next((raw / "spots").glob(f"{name}.*")))
    rows, cols, inside = spot_pixels(spots["x"], spots["y"], shape)
    genes = spots["gene"].to_numpy()[inside]
    return (spots["y"].to_numpy(np.float64)[inside], spots["x"].to_numpy(np.float64)[inside],
            np.unique(genes.astype(str), return_inverse=True)[1])


def baselines(raw: Path, names: list[str]) -> list[tuple[str, dict]]:
    """Starting labels, nuclei expansion scanned over 0..10 µm, transcript growth."""
    start = {n: read_label(next((raw / "labels").glob(f"{n}.*"))) for n in names}
    rows = [("true cells (reference)", _score_labels(raw, names, lambda n: _truth(raw, n)[0])),
            ("starting labels (nuclei)", _score_labels(raw, names, start.__getitem__))]
    scan = []
    for d_um in range(0, 11):
        scores = _score_labels(raw, names, lambda n, d=d_um: expand_labels(
            start[n], distance=d / _pixel_size(raw, n)))
        scan.append((d_um, scores))
        print(f"  expansion {d_um:2d} µm: " + "  ".join(
            f"{m} {scores[m]:.3f}" for m in MEASURES), flush=True)
    best_d, best = max(scan, key=lambda s: (round(s[1]["AP@0.5"], 3), s[1]["right_cell"]))
    rows.append((f"nuclei expanded by {best_d} µm (best of 0..10)", best))
    per_measure = {m: (max if m != "background_in_cells" else min)(
        scan, key=lambda s, m=m: s[1][m]) for m in (*MEASURES, "found")}
    rows.append(("nuclei expansion, best distance per measure (" + ", ".join(
        f"{d}" for d, _ in per_measure.values()) + " µm)",
        {m: s[m] for m, (_, s) in per_measure.items()}))

    def grown(name: str) -> np.ndarray:
        lab = start[name]
        r, c, g = _spots_px(raw, name, lab.shape)
        return grow_labels(lab, r, c, g, pixel_size_um=_pixel_size(raw, name))

    rows.append(("nuclei grown by their transcripts (no network)",
                 _score_labels(raw, names, grown)))
    return rows


def saturation(raw: Path, names: list[str]) -> list[str]:
    """Each representation's saturation on the test images (mean over images)."""
    stats: dict[str, list[dict]] = {"upstream heatmap (max, 7 px)": [],
                                    f"density ({DEFAULT_SIGMA_UM:g} µm, per-slide scale)": []}
    for name in names:
        cells, _ = _truth(raw, name)
        r, c, _ = _spots_px(raw, name, cells.shape)
        pix = _pixel_size(raw, name)
        heat = render_heatmap(np.floor(r).astype(np.int64), np.floor(c).astype(np.int64),
                              cells.shape, 7.0)
        stats["upstream heatmap (max, 7 px)"].append(saturation_stats(heat, cells > 0,
                                                                      reference=1.0))
        scale = slide_density_scale(r, c, pixel_size_um=pix)
        dens = density_channel(r, c, cells.shape, sigma_um=DEFAULT_SIGMA_UM, pixel_size_um=pix,
                               slide_scale=scale)
        stats[f"density ({DEFAULT_SIGMA_UM:g} µm, per-slide scale)"].append(
            saturation_stats(dens, cells > 0))
    lines = []
    for what, values in stats.items():
        frame = pd.DataFrame(values).mean(numeric_only=True)
        lines.append(f"  {what:<40} mean {frame['mean']:.3f}  >=0.9 x ref "
                     f"{frame['fraction_high']:.3f}  in-cell/background {frame['contrast']:.2f}")
    return lines


def _zero_transcripts(src: Path, dst: Path) -> None:
    """Copy a crop dataset with every network transcript input replaced by zeros."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("newlabels*"))
    for path in dst.rglob("HeatMaps/HeatMap_all/*"):
        from GeneSegNet.io import write_image
        write_image(path, np.zeros_like(read_image(path, "gray")))
    for path in dst.rglob("HeatMaps/Transcripts/*.tif"):
        import tifffile
        write_transcript_channels(path, np.zeros_like(tifffile.imread(path), np.float32))


def _test_root(raw: Path, names: list[str], out: Path, with_spots: bool) -> Path:
    for sub in ("images", "metadata") + (("spots",) if with_spots else ()):
        (out / sub).mkdir(parents=True)
        for name in names:
            for path in (raw / sub).glob(f"{name}.*"):
                shutil.copy(path, out / sub)
    return out


def train_and_score(model: str, args, crops: Path, raw: Path, names: list[str],
                    out: Path) -> list[tuple[str, dict]]:
    run = out / f"run_{model}"
    test_root = out / f"test_{model}"
    flags = [*TRAIN_FLAGS, "--n_epochs", str(args.n_epochs), "--nbase", *map(str, args.nbase),
             "--train_tile_size", str(args.train_tile_size), "--diam_mean", str(args.diam_mean),
             *args.train_flags.split()]
    if model == "upstream":  # upstream's relabelling; the others grow labels with transcripts
        flags += ["--refine_method", "morphology"]
    finished = [m for m in run.glob("run_*.json")
                if json.loads(m.read_text()).get("status") == "finished"]
    if not finished:  # (--resume: a finished run is reused)
        _check(GeneSeg_train.main(["--train_dir", str(crops / "train"), "--val_dir",
                                   str(crops / "val"), "--save_model_dir", str(run), *flags]),
               f"training {model}")
    manifest = json.loads(max(run.glob("run_*.json")).read_text())
    minutes = sum(r["training"]["train_seconds"] for r in manifest["rounds"]) / 60
    if not test_root.exists():
        _test_root(raw, names, test_root, with_spots=model != "image_only")
    def predict_and_score(save: Path, model_file: str, what: str, *flags: str) -> dict:
        """Whole-image inference into ``save`` (unless there from an earlier run), scored."""
        if not save.exists():
            start = time.perf_counter()
            _check(slidingwindows_gradient.main(
                ["--root_dir", str(test_root), "--save_dir", str(save), "--model_file",
                 model_file, "--diameter", "0", *flags, *_inference(args)]),
                f"inference {what}")
            print(f"  {what}: inference of {len(names)} image(s) "
                  f"{time.perf_counter() - start:.1f} s ({args.threads} torch threads)",
                  flush=True)
        return _score_labels(raw, names, lambda name: read_label(
            next(save.glob(f"label_{name}.*"))))

    rows = []
    tta = ", --augment" if args.augment else ""
    for n, record in enumerate(manifest["rounds"], start=1):
        scores = predict_and_score(out / f"pred_{model}_round{n}{_suffix(args)}",
                                   record["model_used"], f"{model} round {n}")
        rows.append((f"{model}, round {n}{tta} ({minutes:.1f} min training in all)", scores))
        if model == "genesegnet" and n == len(manifest["rounds"]):  # the network's cells alone
            rows.append((f"{model}, round {n}{tta}, network cells without inference "
                         "refinement",
                         predict_and_score(
                             out / f"pred_{model}_round{n}_network_only{_suffix(args)}",
                             record["model_used"], f"{model} round {n} (network only)",
                             "--no_transcript_refine")))
        cells = record["relabelled"] or {}
        print(f"  {model} round {n}: training labels {record['input_labels']['train']['n_cells']}"
              f" cells; relabelled {cells.get('train', {}).get('n_cells', '-')}", flush=True)
    print(f"  {model}: " + "  ".join(f"{m} {rows[-1][1][m]:.3f}" for m in MEASURES),
          flush=True)
    return rows


def _working(args) -> list[str]:
    """The --working_pixel_size flag for preprocessing and inference, if one is set."""
    return [] if args.working_pixel_size is None else [
        "--working_pixel_size", str(args.working_pixel_size)]


def _inference(args) -> list[str]:
    """Inference flags: the working resolution and ``--augment``, if set."""
    return [*_working(args), *(["--augment"] if args.augment else [])]


def _suffix(args) -> str:
    """Prediction folders of a run with ``--augment`` are kept apart (``--resume``)."""
    return "_augment" if args.augment else ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=("dense", "sparse", "demo"), default="dense")
    parser.add_argument("--out_dir", type=Path, default=Path("quality_run"))
    parser.add_argument("--n_samples", type=int, default=6)
    parser.add_argument("--split", type=float, nargs=3, default=(3, 1, 2))
    parser.add_argument("--n_crops", type=int, default=12)
    parser.add_argument("--crop_size", type=int, default=512)
    parser.add_argument("--n_epochs", type=int, default=None,
                        help="epochs per round; default by preset: " + ", ".join(
                            f"{k} {v}" for k, v in DEFAULT_EPOCHS.items()))
    parser.add_argument("--nbase", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--train_tile_size", type=int, default=112)
    parser.add_argument("--diam_mean", type=float, default=17.0)
    parser.add_argument("--models", default="genesegnet,heatmap,image_only,upstream",
                        help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (stated)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_flags", default="",
                        help="extra GeneSeg_train.py flags for every model, e.g. "
                             "'--max_growth_um 4'")
    parser.add_argument("--prep_flags", default="",
                        help="extra Generate_Image_Label_locationMap.py flags for the crops, "
                             "e.g. '--gene_channels 0' (a lone flag: --prep_flags=--flag)")
    parser.add_argument("--transcript_sigma_um", type=float, default=None,
                        help="density kernel σ of the crops (preprocessing's default if unset)")
    parser.add_argument("--working_pixel_size", type=float, default=None,
                        help="µm/px for crops (training) and inference (results are scored "
                             "on the input grid); default: the images' own")
    parser.add_argument("--augment", action="store_true",
                        help="inference with test-time augmentation (flips); with --resume "
                             "an earlier run's models are scored again this way")
    parser.add_argument("--resume", action="store_true",
                        help="reuse what an earlier run left in --out_dir (data, finished "
                             "trainings, predictions)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n_epochs is None:
        args.n_epochs = DEFAULT_EPOCHS[args.preset]
    torch.set_num_threads(args.threads)
    models = [m for m in args.models.split(",") if m]
    unknown = set(models) - set(MODELS)
    if unknown:
        raise SystemExit(f"unknown models {sorted(unknown)}; choose from {MODELS}")
    out = args.out_dir
    if out.exists() and not args.resume:
        raise SystemExit(f"{out} exists; choose another --out_dir, remove it or --resume")
    raw, crops = out / "raw", out / "crops"
    if not raw.exists():
        _check(simulate_tissue.main(["--out_dir", str(raw), "--n_samples", str(args.n_samples),
                                     "--seed", str(args.seed), "--preset", args.preset]),
               "simulation")
    prep = ["--base_dir", str(raw), "--n_crops", str(args.n_crops), "--crop_size",
            str(args.crop_size), "--split", *map(str, args.split), *_working(args),
            *args.prep_flags.split()]
    if args.transcript_sigma_um is not None:
        prep += ["--transcript_sigma_um", str(args.transcript_sigma_um)]
    if not crops.exists():
        _check(Generate_Image_Label_locationMap.main([*prep, "--save_crop_dir", str(crops)]),
               "preprocessing")
    names = sorted(p.name for p in (crops / "test").iterdir() if p.is_dir())
    print(f"\n== {args.preset} preset, held-out test images {', '.join(names)}", flush=True)
    rows = baselines(raw, names)
    sat = saturation(raw, names)
    for model in models:
        if model == "genesegnet":
            rows += train_and_score(model, args, crops, raw, names, out)
        elif model == "image_only":
            if not (out / "crops_image_only").exists():
                _zero_transcripts(crops, out / "crops_image_only")
            rows += train_and_score(model, args, out / "crops_image_only", raw, names, out)
        else:
            heat = out / "crops_heatmap_input"
            if not heat.exists():
                _check(Generate_Image_Label_locationMap.main(
                    [*prep, "--save_crop_dir", str(heat), "--transcript_input", "heatmap"]),
                    "preprocessing (heatmap)")
            crops_model = out / f"crops_{model}"
            if not crops_model.exists():
                shutil.copytree(heat, crops_model)
            rows += train_and_score(model, args, crops_model, raw, names, out)
    print(f"\n{args.preset} preset; {args.n_epochs} epochs per round, network "
          f"{'/'.join(map(str, args.nbase))}, {args.threads} torch threads; held-out images "
          f"{', '.join(names)}; scores against the true cells")
    print("transcript representations on the test images:")
    print("\n".join(sat))
    short = {"background_in_cells": "bg_in_cells", "assignment_accuracy": "assign_acc"}
    header = f"{'segmentation':<58}" + "".join(f"{short.get(m, m):>12}"
                                               for m in (*MEASURES, "found"))
    print(header)
    for name, r in rows:
        print(f"{name:<58}" + "".join(f"{r[m]:>12.3f}" for m in (*MEASURES, "found")))
    report_path = out / "quality_report.json"
    new_rows = [{"segmentation": n, **{k: float(v) for k, v in r.items()}} for n, r in rows]
    report = {"args": {k: str(v) for k, v in vars(args).items()}, "saturation": sat,
              "rows": new_rows}
    if args.resume and report_path.exists():  # add to the earlier report, do not replace it
        earlier = json.loads(report_path.read_text())
        report["rows"] = merge_rows(new_rows, earlier.get("rows", []))
        report["earlier_args"] = [*earlier.get("earlier_args", []), earlier.get("args", {})]
    with atomic_path(report_path) as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    return 0


def merge_rows(new: list[dict], earlier: list[dict]) -> list[dict]:
    """This run's rows, then the earlier report's rows this run did not score again (matched
    by :func:`bench.quality_summary.row_key`: a resumed run's rows differ only in the
    training minutes and the chosen expansion distance)."""
    done = {row_key(r["segmentation"]) for r in new}
    return [*new, *(r for r in earlier if row_key(r["segmentation"]) not in done)]


if __name__ == "__main__":
    sys.exit(main())
