"""Test pass over a dataset root: predict every crop, write outputs, score against labels.

Used by ``GeneSeg_test.py`` and by the training script's per-round test. Inputs are
read-only: nothing under the dataset is deleted or rewritten (upstream's test removed
``newlabels/``); outputs are added in a separate folder per sample:

    <test_dir>/<sample>/<output_visual>/     (default ``visresults``), or
    <savedir>/<sample>/                      (``savedir`` set; samples never collide)

Per crop ``<key>`` (the image name without ``--img_filter``): ``<key>_label.png`` (the
predicted label image; 8/16-bit PNG, 32-bit TIFF ``<key>_label.tif`` when ids exceed
65,535) and, on request, ``<key>_label.tif``, ``<key>_cp_outlines.txt`` (ImageJ),
``<key>_cp_output.png`` (figure), ``<key>_dP.tif`` (float32 [2, H, W] flows),
``<key>_flows.tif`` (uint8 RGB flow colours) and ``<key>_outlines.png``. With
``in_folders`` these go to the sub-folders masks/, txt_outlines/, cp_output/, flows/
and outlines/. Every file is written atomically (temporary file, then rename).

Metrics (crops whose ``labels/`` image holds at least one cell): ``metrics_per_image.csv``
and the means in ``metrics_summary.json`` / ``metrics_summary.csv``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tifffile
import torch
from torch import nn
from tqdm import tqdm

from GeneSegNet.data.dataset import Crop, load_sample_folder
from GeneSegNet.data.dataset import sample_folders as list_sample_folders
from GeneSegNet.data.model_input import check_model_channels, model_input_from_meta
from GeneSegNet.dynamics.masks import outlines_list, remove_edge_masks, size_shape_filter
from GeneSegNet.errors import InputError
from GeneSegNet.evaluation.metrics import (
    DEFAULT_THRESHOLDS,
    aggregated_jaccard_index,
    gene_iou,
    match,
    per_cell_best_iou,
    threshold_key,
)
from GeneSegNet.figures import comparison_figure, draw_outlines, flow_rgb
from GeneSegNet.io import atomic_path, write_image, write_label
from GeneSegNet.io.layout import INPUT_FOLDERS
from GeneSegNet.io.records import write_json
from GeneSegNet.model.predict import EvalConfig, Prediction, predict_crop

logger = logging.getLogger(__name__)

UPSTREAM_AP_THRESHOLD = 0.25  # upstream printed AP at this IoU as "AP at 0.5"
_INPUT_NAMES = INPUT_FOLDERS
_SUBFOLDER = {
    "mask": "masks",
    "txt": "txt_outlines",
    "figure": "cp_output",
    "flows": "flows",
    "outlines": "outlines",
}


@dataclass(frozen=True)
class OutputOptions:
    """What the test pass writes and where (module docstring).

    Metrics files go to ``metrics_dir``, else ``savedir``, else the dataset root.
    """

    save_png: bool = False
    save_tif: bool = False
    save_txt: bool = False
    save_flows: bool = False
    save_outlines: bool = False
    in_folders: bool = False
    savedir: Path | None = None
    output_visual: str = "visresults"
    metrics_dir: Path | None = None


def sample_output_dir(sample_dir: Path, out: OutputOptions) -> Path:
    """Output folder of one sample: ``<savedir>/<sample>`` or ``<sample>/<output_visual>``."""
    if out.savedir is not None:
        return Path(out.savedir) / sample_dir.name
    return sample_dir / out.output_visual


def _check_output_options(out: OutputOptions) -> None:
    name = out.output_visual
    if out.savedir is None and (not name or Path(name).name != name or name in ("..", ".")):
        raise InputError(f"--output_visual must be a plain folder name, got {name!r}")
    if out.savedir is None and name in _INPUT_NAMES:
        raise InputError(f"--output_visual {name!r} would write into an input folder")


def _load_samples(test_dir: Path, **load_kwargs: Any) -> list[tuple[Path, list[Crop]]]:
    """Read every sample folder up front (labels from ``labels/`` only), so bad input
    stops the run before anything is written."""
    samples = []
    for folder in list_sample_folders(test_dir):
        crops = load_sample_folder(folder, label_dir="labels", require_labels=False, **load_kwargs)
        samples.append((folder, crops))
        if not any(c.labels is not None for c in crops):
            logger.info(
                "%s: no label files in %s; its %d crop(s) are predicted and saved, metrics skipped",
                folder.name,
                folder / "labels",
                len(crops),
            )
    return samples


def _target(out_dir: Path, kind: str, name: str, out: OutputOptions) -> Path:
    return (out_dir / _SUBFOLDER[kind] if out.in_folders else out_dir) / name


def _write_tiff(path: Path, data: np.ndarray, **kwargs: Any) -> Path:
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, data, **kwargs)
    return path


def _write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def imagej_outlines(masks: np.ndarray) -> str:
    """ImageJ outline text: line i holds cell i+1's contour as ``x0,y0,x1,y1,...``
    (an empty line for contours of 4 points or fewer, as upstream)."""
    lines = []
    for outline in outlines_list(masks):
        lines.append(",".join(str(v) for v in outline.ravel()) if len(outline) > 4 else "")
    return "".join(line + "\n" for line in lines)


def write_crop_outputs(
    crop: Crop, masks: np.ndarray, pred: Prediction, out_dir: Path, out: OutputOptions
) -> list[Path]:
    """Write the outputs of one crop (module docstring); returns the paths written."""
    key = crop.key
    written = [write_label(_target(out_dir, "mask", f"{key}_label.png", out), masks)]
    if out.save_tif:
        written.append(write_label(_target(out_dir, "mask", f"{key}_label.tif", out), masks))
    if out.save_txt:
        written.append(
            _write_text(
                _target(out_dir, "txt", f"{key}_cp_outlines.txt", out), imagej_outlines(masks)
            )
        )
    if out.save_png:
        figure = comparison_figure(crop.image, masks, crop.labels, crop.spots_xy, flows=pred.flows)
        written.append(write_image(_target(out_dir, "figure", f"{key}_cp_output.png", out), figure))
    if out.save_flows:
        written.append(
            _write_tiff(
                _target(out_dir, "flows", f"{key}_dP.tif", out), pred.flows.astype(np.float32)
            )
        )
        written.append(
            _write_tiff(
                _target(out_dir, "flows", f"{key}_flows.tif", out),
                flow_rgb(pred.flows),
                photometric="rgb",
            )
        )
    if out.save_outlines:
        written.append(
            write_image(
                _target(out_dir, "outlines", f"{key}_outlines.png", out),
                draw_outlines(crop.image, masks),
            )
        )
    return written


def image_metrics(
    labels: np.ndarray, masks: np.ndarray, spots_xy: np.ndarray, thresholds: Sequence[float]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Scores of one crop against its labels.

    Returns a flat row (``n_true``, ``n_pred``, ``AP@t``/``TP@t``/``FP@t``/``FN@t`` for each
    threshold and for upstream's 0.25, ``AJI``, ``mean_best_IoU``, ``gene_IoU``) and the
    per-cell arrays ``best_iou`` and ``gene_iou`` (NaN for cells without spots) for pooling.
    """
    ts = tuple(dict.fromkeys([*map(float, thresholds), UPSTREAM_AP_THRESHOLD]))
    row: dict[str, Any] = match(labels, masks, ts).as_dict()
    best = per_cell_best_iou(labels, masks)
    gene_mean, gene_cells = gene_iou(labels, masks, spots_xy)
    row["AJI"] = aggregated_jaccard_index(labels, masks)
    row["mean_best_IoU"] = float(best.mean()) if best.size else float("nan")
    row["gene_IoU"] = gene_mean
    return row, {"best_iou": best, "gene_iou": gene_cells}


def _nan_mean(values: Sequence[float] | np.ndarray) -> float:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def summarise(
    rows: list[dict[str, Any]], cells: list[dict[str, np.ndarray]], thresholds: Sequence[float]
) -> dict[str, Any]:
    """Means over scored crops: AP@t and AJI averaged over images; TP/FP/FN summed;
    best IoU and gene IoU pooled over all true cells (cells with spots for gene IoU)."""
    out: dict[str, Any] = {"n_images": len(rows), "thresholds": [float(t) for t in thresholds]}
    for t in thresholds:
        out[threshold_key("AP", t)] = _nan_mean([r[threshold_key("AP", t)] for r in rows])
        for name in ("TP", "FP", "FN"):
            out[threshold_key(name, t)] = int(sum(r[threshold_key(name, t)] for r in rows))
    out["AJI"] = _nan_mean([r["AJI"] for r in rows])
    best = np.concatenate([c["best_iou"] for c in cells]) if cells else np.zeros(0)
    gene = np.concatenate([c["gene_iou"] for c in cells]) if cells else np.zeros(0)
    out["mean_best_IoU"] = _nan_mean(best)
    out["gene_IoU"] = _nan_mean(gene)
    out["n_true_cells"] = int(sum(r["n_true"] for r in rows))
    out["n_pred_cells"] = int(sum(r["n_pred"] for r in rows))
    up = threshold_key("AP", UPSTREAM_AP_THRESHOLD)
    out["upstream_comparison"] = {
        up: _nan_mean([r[up] for r in rows]),
        "note": f"upstream GeneSegNet printed {up} as 'AP at threshold 0.5'",
    }
    return out


def write_metrics(
    metrics_dir: Path,
    rows: list[dict[str, Any]],
    summary: dict[str, Any],
    thresholds: Sequence[float],
) -> list[Path]:
    """Write metrics_per_image.csv, metrics_summary.json and metrics_summary.csv atomically."""
    columns = ["sample", "key", "n_true", "n_pred"]
    for name in ("AP", "TP", "FP", "FN"):
        columns += [threshold_key(name, t) for t in thresholds]
    columns += ["AJI", "mean_best_IoU", "gene_IoU"]
    paths = [
        metrics_dir / n
        for n in ("metrics_per_image.csv", "metrics_summary.json", "metrics_summary.csv")
    ]
    with atomic_path(paths[0]) as tmp:
        pd.DataFrame(rows, columns=columns).to_csv(tmp, index=False)
    write_json(paths[1], summary)
    flat = {k: v for k, v in summary.items() if not isinstance(v, dict | list)}
    flat.update({k: v for k, v in summary["upstream_comparison"].items() if k != "note"})
    with atomic_path(paths[2]) as tmp:
        pd.DataFrame([flat]).to_csv(tmp, index=False)
    return paths


def format_metrics(summary: dict[str, Any]) -> str:
    """One-line-per-metric text table of a :func:`summarise` result, for the log."""
    lines = [f"metrics over {summary['n_images']} labelled crop(s):"]
    for t in summary["thresholds"]:
        k = threshold_key("AP", t)
        lines.append(
            f"  {k:<14} {summary[k]:.4f}  (TP {summary[threshold_key('TP', t)]}, "
            f"FP {summary[threshold_key('FP', t)]}, FN {summary[threshold_key('FN', t)]})"
        )
    for k in ("AJI", "mean_best_IoU", "gene_IoU"):
        lines.append(f"  {k:<14} {summary[k]:.4f}")
    up = threshold_key("AP", UPSTREAM_AP_THRESHOLD)
    lines.append(
        f"  {up:<14} {summary['upstream_comparison'][up]:.4f}  "
        "(what upstream printed as 'AP at 0.5')"
    )
    return "\n".join(lines)


def _postfilter(masks: np.ndarray, exclude_on_edges: bool, size_filter: bool) -> np.ndarray:
    if size_filter:
        masks = size_shape_filter(masks)
    if exclude_on_edges:
        masks = remove_edge_masks(masks)
    return masks


def evaluate_dataset(
    net: nn.Module,
    meta: dict[str, Any],
    test_dir: str | Path,
    cfg: EvalConfig,
    *,
    chan: int = 2,
    img_filter: str = "_image",
    mask_filter: str = "_label",
    heatmap_filter: str = "_gaumap_all",
    output: OutputOptions | None = None,
    metrics: bool = False,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    exclude_on_edges: bool = False,
    size_filter: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = False,
    run_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Predict every crop under ``test_dir``, write its outputs and (optionally) metrics.

    Parameters
    ----------
    net, meta : network and metadata from :func:`GeneSegNet.model.checkpoint.load_checkpoint`
        (``meta["diam_mean"]``, ``meta["diam_labels"]`` in pixels).
    test_dir : dataset root of sample folders (labels read from ``labels/`` only).
    cfg : network-pass and mask settings.
    chan, img_filter, mask_filter, heatmap_filter : as ``--chan`` and the filters.
    output : what to write where (default :class:`OutputOptions`).
    metrics : score crops whose label image holds cells; write the metrics files.
    thresholds : IoU thresholds of AP/TP/FP/FN (AP@0.25 is added to the JSON summary
        for comparison with upstream).
    exclude_on_edges : drop predicted cells touching the crop edge (saved and scored).
    size_filter : upstream's size/shape filter on predicted cells (saved and scored).
    device : device of the network pass and flow following.
    run_info : settings to record in ``metrics_summary.json`` under ``"run"``.

    Returns
    -------
    dict with ``n_samples``, ``n_crops``, ``output_dirs`` ({sample: Path}),
    ``unlabelled_samples``, ``empty_label_crops`` (crops skipped from metrics), ``metrics``
    (the summary, or None) and ``metrics_files``.

    Raises
    ------
    InputError : missing or empty dataset root, unreadable or unpaired files, channel
        mismatch, bad output names; raised before any output is written.
    """
    test_dir = Path(test_dir)
    out = output if output is not None else OutputOptions()
    _check_output_options(out)
    model_input = model_input_from_meta(meta)
    nchan = getattr(getattr(net, "config", None), "nchan", None)
    if nchan is not None:
        check_model_channels(nchan, chan, model_input)
    if (cfg.transcript_mode, cfg.n_transcripts) != (model_input.transcripts.mode,
                                                    model_input.n_transcripts):
        raise InputError(f"evaluation settings take {cfg.n_transcripts} {cfg.transcript_mode} "
                         f"transcript channel(s) but the model was trained on "
                         f"{model_input.n_transcripts} {model_input.transcripts.mode} channel(s)")
    samples = _load_samples(
        test_dir,
        chan=chan,
        img_filter=img_filter,
        mask_filter=mask_filter,
        heatmap_filter=heatmap_filter,
    )
    n_crops = sum(len(crops) for _, crops in samples)
    logger.info("%s: %d crop(s) in %d sample folder(s)", test_dir, n_crops, len(samples))
    diam = {"diam_mean": float(meta["diam_mean"]), "diam_labels": float(meta["diam_labels"])}
    rows: list[dict[str, Any]] = []
    cells: list[dict[str, np.ndarray]] = []
    empty: list[str] = []
    output_dirs: dict[str, Path] = {}
    bar = tqdm(total=n_crops, desc="test", disable=not progress)
    for folder, crops in samples:
        out_dir = output_dirs[folder.name] = sample_output_dir(folder, out)
        for crop in crops:
            pred = predict_crop(net, crop, cfg, device=device, **diam)
            masks = _postfilter(pred.masks, exclude_on_edges, size_filter)
            write_crop_outputs(crop, masks, pred, out_dir, out)
            if metrics and crop.labels is not None:
                if int(crop.labels.max(initial=0)) == 0:
                    empty.append(crop.name)
                else:
                    row, per_cell = image_metrics(crop.labels, masks, crop.spots_xy, thresholds)
                    rows.append({"sample": crop.sample, "key": crop.key, **row})
                    cells.append(per_cell)
            bar.update(1)
    bar.close()
    for sample, path in output_dirs.items():
        logger.info("%s: outputs in %s", sample, path)
    if empty:
        logger.info(
            "%d crop(s) skipped from metrics because their label image has no cell: %s",
            len(empty),
            ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else ""),
        )
    result: dict[str, Any] = {
        "n_samples": len(samples),
        "n_crops": n_crops,
        "output_dirs": output_dirs,
        "unlabelled_samples": [f.name for f, c in samples if all(x.labels is None for x in c)],
        "empty_label_crops": empty,
        "metrics": None,
        "metrics_files": [],
    }
    if metrics and not rows:
        logger.warning("--metrics: no crop has a label image with cells; no metrics written")
    elif metrics:
        summary = summarise(rows, cells, thresholds)
        summary["n_images_skipped_empty_labels"] = len(empty)
        summary["run"] = {
            "eval_config": asdict(cfg),
            "output": asdict(out),
            "exclude_on_edges": exclude_on_edges,
            "size_filter": size_filter,
            "test_dir": test_dir,
            **(run_info or {}),
        }
        metrics_dir = Path(out.metrics_dir or out.savedir or test_dir)
        result["metrics"] = summary
        result["metrics_files"] = write_metrics(metrics_dir, rows, summary, thresholds)
        logger.info("metrics written to %s", metrics_dir)
    return result
