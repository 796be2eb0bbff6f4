"""QC figures of one sample, drawn with OpenCV (no matplotlib), plus ``qc.html``.

Written into ``<folder>/<sample>_qc/``: ``overlay.png`` (cells in colour over the DAPI
image with outlines and transcripts: cyan in a cell, yellow on background; at most
``max_side`` px on a side and ``max_spots`` spots), ``cell_area.png`` and
``transcripts_per_cell.png`` (histograms), ``fraction_in_cells.png`` (per gene, the
``max_genes`` most frequent, and overall), ``control_rate.png`` (control-probe share of
the transcripts in cells vs on background), ``qc.json`` (the numbers) and ``qc.html``
linking them. Every file is written atomically.
"""

from __future__ import annotations

import html
import json
import logging
import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from GeneSegNet.export.controls import control_mask
from GeneSegNet.figures import CYAN, RED, YELLOW, mask_overlay, outline_pixels
from GeneSegNet.io import atomic_path

logger = logging.getLogger(__name__)

WHITE, BLACK, GREY, BLUE = (255, 255, 255), (0, 0, 0), (160, 160, 160), (200, 120, 40)
FONT = cv2.FONT_HERSHEY_SIMPLEX


def _text(img: np.ndarray, text: str, org: tuple[int, int], scale: float = 0.45,
          color=BLACK) -> None:
    ascii_text = text.encode("ascii", "replace").decode()  # Hershey fonts are ASCII only
    cv2.putText(img, ascii_text, org, FONT, scale, color, 1, cv2.LINE_AA)


def bar_chart(values: np.ndarray, labels: list[str], title: str, *, horizontal: bool = False,
              width: int = 640, height: int = 400, value_format: str = "{:.3g}") -> np.ndarray:
    """A titled bar chart, uint8 BGR [height', width, 3] (horizontal: one row per bar)."""
    values = np.nan_to_num(np.asarray(values, dtype=np.float64))
    top = float(values.max(initial=0.0)) or 1.0
    if horizontal:
        height = 40 + 16 * max(len(values), 1)
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    _text(img, title, (10, 20), 0.5)
    if horizontal:
        left, right = 170, width - 70
        for i, (v, name) in enumerate(zip(values, labels, strict=True)):
            y = 34 + 16 * i
            x1 = left + int((right - left) * v / top)
            cv2.rectangle(img, (left, y), (max(x1, left + 1), y + 11), BLUE, -1)
            _text(img, name[:24], (6, y + 10), 0.38)
            _text(img, value_format.format(v), (x1 + 4, y + 10), 0.38)
        return img
    left, bottom, right, top_px = 50, height - 40, width - 10, 35
    cv2.line(img, (left, bottom), (right, bottom), BLACK, 1)
    cv2.line(img, (left, bottom), (left, top_px), BLACK, 1)
    n = max(len(values), 1)
    step = (right - left) / n
    for i, v in enumerate(values):
        x0 = int(left + i * step)
        x1 = int(left + (i + 1) * step) - 1
        y = int(bottom - (bottom - top_px) * v / top)
        cv2.rectangle(img, (x0, y), (max(x1, x0), bottom), BLUE, -1)
    _text(img, value_format.format(top), (2, top_px + 5), 0.38)
    _text(img, "0", (30, bottom), 0.38)
    if labels:
        _text(img, labels[0], (left, bottom + 16), 0.38)
        _text(img, labels[-1], (max(left, right - 9 * len(labels[-1])), bottom + 16), 0.38)
        if len(labels) > 2:
            _text(img, labels[len(labels) // 2], (left + (right - left) // 2 - 20, bottom + 16),
                  0.38)
    return img


def histogram(values: np.ndarray, title: str, bins: int = 40, unit: str = "") -> np.ndarray:
    """Histogram of finite ``values`` as a bar chart (edges labelled)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return bar_chart(np.zeros(1), [], f"{title} (no cells)")
    counts, edges = np.histogram(values, bins=bins)
    labels = [f"{e:.3g}{unit}" for e in edges[:-1]]
    labels[-1] = f"{edges[-1]:.3g}{unit}"
    return bar_chart(counts, labels, f"{title} (n={values.size}, median {np.median(values):.3g})",
                     value_format="{:.0f}")


def overlay_figure(image: np.ndarray | None, labels: np.ndarray, x: np.ndarray, y: np.ndarray,
                   in_cell: np.ndarray, max_side: int = 2048, max_spots: int = 50_000,
                   seed: int = 0) -> np.ndarray:
    """Cells over the image with outlines and transcripts, subsampled to ``max_side`` px."""
    step = max(1, math.ceil(max(labels.shape) / max_side))
    sub = labels[::step, ::step]
    base = np.zeros(sub.shape, np.uint8) if image is None else np.asarray(image)[::step, ::step]
    panel = np.ascontiguousarray(mask_overlay(base, sub))
    panel[outline_pixels(sub)] = RED
    finite = np.isfinite(x) & np.isfinite(y)
    idx = np.flatnonzero(finite)
    if idx.size > max_spots:
        idx = np.sort(np.random.default_rng(seed).choice(idx, max_spots, replace=False))
    cols = (x[idx] / step).astype(np.int64)
    rows = (y[idx] / step).astype(np.int64)
    ok = (cols >= 0) & (rows >= 0) & (cols < sub.shape[1]) & (rows < sub.shape[0])
    colours = np.where(in_cell[idx][ok, None], np.array(CYAN), np.array(YELLOW))
    panel[rows[ok], cols[ok]] = colours.astype(np.uint8)
    return panel


def _write_png(path: Path, img: np.ndarray) -> Path:
    with atomic_path(path) as tmp:
        if not cv2.imwrite(str(tmp), img):
            raise OSError(f"OpenCV could not write {path}")
    return path


def qc_summary(cell_ids: np.ndarray, genes: np.ndarray, areas_um2: np.ndarray,
               counts_per_cell: np.ndarray) -> tuple[dict, pd.DataFrame]:
    """Numbers of the QC page and the per-gene table (gene, n, in_cells, fraction)."""
    cell_ids = np.asarray(cell_ids)
    in_cell = cell_ids > 0
    names, codes = np.unique(np.asarray(genes).astype(str), return_inverse=True)
    total = np.bincount(codes, minlength=len(names))
    inside = np.bincount(codes[in_cell], minlength=len(names))
    per_gene = pd.DataFrame({"gene": names, "n": total, "in_cells": inside,
                             "fraction_in_cells": inside / np.maximum(total, 1),
                             "control": control_mask(names)})
    ctrl = per_gene["control"].to_numpy()[codes]
    n_in, n_out = int(in_cell.sum()), int((~in_cell).sum())
    summary = {
        "n_cells": int(len(areas_um2)),
        "n_transcripts": int(len(cell_ids)),
        "fraction_in_cells": n_in / max(len(cell_ids), 1),
        "median_area_um2": float(np.median(areas_um2)) if len(areas_um2) else None,
        "median_transcripts_per_cell": (float(np.median(counts_per_cell))
                                        if len(counts_per_cell) else None),
        "control_rate_in_cells": float((ctrl & in_cell).sum() / n_in) if n_in else None,
        "control_rate_background": float((ctrl & ~in_cell).sum() / n_out) if n_out else None,
    }
    return summary, per_gene


def write_qc(folder: str | Path, name: str, *, labels: np.ndarray, image: np.ndarray | None,
             x: np.ndarray, y: np.ndarray, genes: np.ndarray, cell_ids: np.ndarray,
             areas_um2: np.ndarray, counts_per_cell: np.ndarray, max_genes: int = 40) -> Path:
    """Write the QC figures and ``qc.html`` of one sample; returns the html path.

    x, y : (N,) transcript positions in px; genes, cell_ids : (N,); areas_um2,
    counts_per_cell : (K,) per cell.
    """
    out = Path(folder) / f"{name}_qc"
    summary, per_gene = qc_summary(cell_ids, genes, areas_um2, counts_per_cell)
    shown = per_gene[~per_gene["control"]].sort_values("n", ascending=False).head(max_genes)
    figures = {
        "overlay.png": overlay_figure(image, labels, np.asarray(x, float), np.asarray(y, float),
                                      np.asarray(cell_ids) > 0),
        "cell_area.png": histogram(areas_um2, "cell area (um2)"),
        "transcripts_per_cell.png": histogram(counts_per_cell, "transcripts per cell"),
        "fraction_in_cells.png": bar_chart(
            shown["fraction_in_cells"].to_numpy(), [str(g) for g in shown["gene"]],
            f"fraction of transcripts in cells: overall {summary['fraction_in_cells']:.3f}; "
            f"top {len(shown)} genes", horizontal=True, width=720),
        "control_rate.png": bar_chart(
            np.array([summary["control_rate_in_cells"] or 0.0,
                      summary["control_rate_background"] or 0.0]),
            ["in cells", "background"], "control-probe share of transcripts",
            horizontal=True, value_format="{:.4f}"),
    }
    for file, img in figures.items():
        _write_png(out / file, img)
    with atomic_path(out / "qc.json") as tmp:
        tmp.write_text(json.dumps({"sample": name, **summary}, indent=2), encoding="utf-8")
    with atomic_path(out / "per_gene.csv") as tmp:
        per_gene.to_csv(tmp, index=False)
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in summary.items())
    imgs = "".join(f'<h2>{html.escape(f)}</h2><img src="{html.escape(f)}" '
                   f'style="max-width:100%">' for f in figures)
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>QC "
            f"{html.escape(name)}</title></head><body><h1>QC: {html.escape(name)}</h1>"
            f"<table border='1'>{rows}</table><p><a href='qc.json'>qc.json</a> · "
            f"<a href='per_gene.csv'>per_gene.csv</a></p>{imgs}</body></html>\n")
    with atomic_path(out / "qc.html") as tmp:
        tmp.write_text(page, encoding="utf-8")
    logger.info("QC of %s -> %s", name, out / "qc.html")
    return out / "qc.html"
