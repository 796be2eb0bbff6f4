"""Score segmentations against simulated truth (``<raw>/truth/`` from the simulator).

For each sample: cells found, transcripts assigned to a cell, AP at IoU 0.5/0.75/0.9
against the true cells, and transcript assignment accuracy against each transcript's
true source cell.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from skimage.segmentation import expand_labels

from GeneSegNet.errors import InputError
from GeneSegNet.evaluation.metrics import match, threshold_key, transcript_assignment_accuracy
from GeneSegNet.io import LABEL_EXTENSIONS, index_by_sample, list_files, read_label, spot_pixels
from GeneSegNet.io.metadata import metadata_path, read_metadata
from GeneSegNet.mapping import LABEL_PREFIXES, LABEL_SUFFIXES

logger = logging.getLogger(__name__)

TRUTH_CELLS_SUFFIX = "_cells"
TRUTH_SPOTS_SUFFIX = "_spots.csv"


def score_sample(pred: np.ndarray, true_cells: np.ndarray, truth_spots: pd.DataFrame
                 ) -> dict[str, float | int | str]:
    """Scores of one predicted label image against the truth of its sample."""
    if pred.shape != true_cells.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth {true_cells.shape}")
    result = match(true_cells, pred)
    xy = truth_spots[["spotX", "spotY"]].to_numpy(np.float64)
    assignment = transcript_assignment_accuracy(
        truth_spots["cell_id"].to_numpy(np.int64), pred, true_cells, xy)
    rows, cols, _ = spot_pixels(xy[:, 0], xy[:, 1], pred.shape)
    scores: dict[str, float | int | str] = {
        "true_cells": result.n_true,
        "cells_found": result.n_pred,
        "transcripts": len(truth_spots),
        "transcripts_in_cells": int((pred[rows, cols] > 0).sum()),
    }
    for t in result.thresholds:
        scores[threshold_key("AP", t)] = float(result.ap[t])
    scores["assignment_accuracy"] = float(assignment["accuracy"])
    scores["right_cell"] = float(assignment["right_cell"])
    scores["background_in_cells"] = float(assignment["background_in_cells"])
    scores["recall@0.5"] = (float(result.tp[0.5]) / result.n_true if result.n_true
                            else float("nan"))
    return scores


def score_folder(label_dir: str | Path, truth_dir: str | Path, *, expand_um: float = 0.0,
                 metadata_base: str | Path | None = None) -> pd.DataFrame:
    """Score every label image of ``label_dir`` whose sample has truth in ``truth_dir``.

    Label files pair with ``<truth_dir>/<name>_cells.png`` and ``<name>_spots.csv`` by
    sample name (``label_<name>.png`` from inference included). ``expand_um`` > 0 scores
    the labels expanded by that many µm into background (the vendors' baseline), with each
    sample's pixel size from ``<metadata_base>/metadata/<name>.json`` (default: the folder
    above ``truth_dir``, the simulator's raw folder). Returns one row per sample plus a
    final "mean" row.
    """
    if not np.isfinite(expand_um) or expand_um < 0:
        raise InputError(f"--expand_um must be a finite number >= 0, got {expand_um}")
    base = Path(truth_dir).parent if metadata_base is None else Path(metadata_base)
    truth_dir = Path(truth_dir)
    labels = index_by_sample(list_files(label_dir, LABEL_EXTENSIONS), LABEL_PREFIXES,
                             LABEL_SUFFIXES, prefer=LABEL_EXTENSIONS)
    rows = []
    for name, path in sorted(labels.items()):
        cells_path = truth_dir / f"{name}{TRUTH_CELLS_SUFFIX}.png"
        spots_path = truth_dir / f"{name}{TRUTH_SPOTS_SUFFIX}"
        if not cells_path.is_file() or not spots_path.is_file():
            logger.warning("%s: no truth for sample %r in %s; skipped", path, name, truth_dir)
            continue
        labels = read_label(path).astype(np.int64)
        if expand_um > 0:
            pixel = read_metadata(metadata_path(base, name)).pixel_size_um
            labels = expand_labels(labels, distance=expand_um / pixel)
        scores = score_sample(labels, read_label(cells_path).astype(np.int64),
                              pd.read_csv(spots_path))
        rows.append({"sample": name, **scores})
    if not rows:
        raise InputError("no label image has matching truth files", label_dir)
    table = pd.DataFrame(rows)
    mean = table.drop(columns="sample").mean(numeric_only=True).to_dict()
    return pd.concat([table, pd.DataFrame([{"sample": "mean", **mean}])], ignore_index=True)
