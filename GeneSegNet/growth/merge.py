"""Next round's labels from the model's cells and the previous round's: no collapse.

:func:`merge_with_previous` keeps every predicted cell, splits a predicted cell that
swallowed several previous cells (:func:`split_merged_cells`) and adds back the previous
cells the model missed unless the transcripts reject them too; :func:`label_stats` gives
the per-round numbers of the run manifest. Coordinates: spots at continuous (row, col) px,
pixel = (floor(row), floor(col)).
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage, stats

from GeneSegNet.errors import InputError
from GeneSegNet.growth.density import check_labels, estimate_levels, spot_pixels_in
from GeneSegNet.growth.params import GrowParams

logger = logging.getLogger(__name__)


def split_merged_cells(predicted: np.ndarray, previous: np.ndarray, min_fraction: float
                       ) -> tuple[np.ndarray, int]:
    """Undo the model's merges of previous cells: (labels int64 (H, W), cells added).

    ``predicted`` has ids 1..K. Each previous cell q goes to the predicted cell p that
    covers most of it, if that covers at least ``min_fraction`` of q. A predicted cell
    given two or more previous cells is split among them: each of its pixels goes to the
    nearest of their pixels (a Voronoi split restricted to the predicted cell); the first
    piece keeps the id, the others get new ids after K.
    """
    out = predicted.astype(np.int64, copy=True)
    n_pred = int(out.max()) + 1
    n_prev = int(previous.max()) + 1
    if n_pred <= 1 or n_prev <= 1:
        return out, 0
    both = (out > 0) & (previous > 0)
    pair = out[both] * n_prev + previous[both]
    keys, overlap = np.unique(pair, return_counts=True)
    p_of, q_of = keys // n_prev, keys % n_prev
    area_q = np.bincount(previous.ravel(), minlength=n_prev)
    order = np.lexsort((-overlap, q_of))  # per previous cell, the largest overlap first
    first = np.ones(order.size, dtype=bool)
    first[1:] = q_of[order][1:] != q_of[order][:-1]
    best = order[first]
    ok = overlap[best] >= min_fraction * area_q[q_of[best]]
    owner_p, owned_q = p_of[best][ok], q_of[best][ok]
    n_owned = np.bincount(owner_p, minlength=n_pred)
    next_id, added = n_pred, 0
    boxes = ndimage.find_objects(out)
    for p in np.flatnonzero(n_owned >= 2):
        box = boxes[p - 1]
        cell = out[box] == p
        mine = owned_q[owner_p == p]
        seeds = np.where(cell & np.isin(previous[box], mine), previous[box], 0)
        if not seeds.any():
            continue
        _, (rr, cc) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
        nearest = seeds[rr, cc]
        region = out[box]
        for q in np.unique(nearest[cell])[1:]:  # the first piece keeps the id p
            region[cell & (nearest == q)] = next_id
            next_id += 1
            added += 1
    return out, added


def merge_with_previous(predicted: np.ndarray, previous: np.ndarray, rows_px: np.ndarray,
                        cols_px: np.ndarray, *, pixel_size_um: float,
                        params: GrowParams | None = None) -> tuple[np.ndarray, dict[str, int]]:
    """Next round's labels: the predicted cells plus the previous cells the model missed.

    A predicted cell that covers at least ``merge_overlap_fraction`` of two or more previous
    cells (which have no other predicted cell covering them more) has merged them: it is
    split among them, each pixel to the nearest of them (:func:`split_merged_cells`).
    A previous cell is missed when less than ``merge_overlap_fraction`` of its pixels lie
    in predicted cells. A missed cell is added back (its pixels outside predicted cells,
    under a new id) unless the transcripts reject it too: its density is at background
    level (not above the foreground threshold of ``estimate_levels`` on the previous
    labels) and its count n is improbably low for a cell, P(N <= n) < ``drop_max_p`` for
    N ~ Poisson(area x in-cell density); then it is dropped. So at sparse densities,
    where a small cell often holds no transcript, absence is not taken as rejection.
    Without any transcript, no missed cell is dropped.

    Returns
    -------
    labels : ndarray (H, W), int32, ids 1..K
    counts : dict
        ``kept`` (predicted cells), ``split`` (cells added by undoing merges),
        ``added_back``, ``dropped``.
    """
    params = params or GrowParams()
    predicted = check_labels(predicted, "predicted")
    previous = check_labels(previous, "previous")
    if predicted.shape != previous.shape:
        raise InputError(f"predicted {predicted.shape} and previous {previous.shape} differ")
    pred_ids, pred_dense = np.unique(predicted, return_inverse=True)
    out = pred_dense.reshape(predicted.shape).astype(np.int64)  # 0 stays 0: ids 1..K
    n_kept = int((pred_ids > 0).sum())
    out, n_split = split_merged_cells(out, previous, params.merge_overlap_fraction)
    n_kept += n_split
    n_prev = int(previous.max()) + 1
    area = np.bincount(previous.ravel(), minlength=n_prev)
    covered = np.bincount(previous.ravel(), (predicted > 0).ravel(), minlength=n_prev)
    with np.errstate(invalid="ignore", divide="ignore"):
        missed = (covered / area) < params.merge_overlap_fraction
    missed &= area > 0
    missed[0] = False
    rows, cols, _ = spot_pixels_in(rows_px, cols_px, previous.shape)
    levels = estimate_levels(previous, rows_px, cols_px, pixel_size_um=pixel_size_um,
                             params=params)
    n_spots = np.bincount(previous[rows, cols], minlength=n_prev)
    with np.errstate(invalid="ignore", divide="ignore"):
        density = n_spots / (area * pixel_size_um ** 2)
    expected = area * pixel_size_um ** 2 * levels.cell_per_um2
    improbable = stats.poisson.cdf(n_spots, expected) < params.drop_max_p
    dropped = missed & ~(density > levels.threshold_per_um2) & improbable
    if rows.size == 0:  # no transcripts: they cannot reject a cell the model missed
        dropped[:] = False
    added = missed & ~dropped
    new_id = np.zeros(n_prev, dtype=np.int64)
    new_id[added] = n_kept + np.arange(1, int(added.sum()) + 1)
    put = (new_id[previous] > 0) & (out == 0)
    out[put] = new_id[previous][put]
    counts = {"kept": n_kept - n_split, "split": n_split, "added_back": int(added.sum()),
              "dropped": int(dropped.sum())}
    logger.debug("merge_with_previous: %s", counts)
    return out.astype(np.int32), counts


def label_stats(labels: np.ndarray, rows_px: np.ndarray, cols_px: np.ndarray,
                pixel_size_um: float) -> dict[str, float | int]:
    """``n_cells``, ``median_area_um2`` (NaN without cells) and
    ``fraction_transcripts_in_cells`` (of in-image spots; NaN without spots)."""
    labels = check_labels(labels, "labels")
    areas = np.bincount(labels.ravel())[1:]
    areas = areas[areas > 0]
    rows, cols, _ = spot_pixels_in(rows_px, cols_px, labels.shape)
    in_cells = labels[rows, cols] > 0
    return {
        "n_cells": int(areas.size),
        "median_area_um2": float(np.median(areas) * pixel_size_um ** 2) if areas.size
        else float("nan"),
        "fraction_transcripts_in_cells": float(in_cells.mean()) if in_cells.size
        else float("nan"),
    }
