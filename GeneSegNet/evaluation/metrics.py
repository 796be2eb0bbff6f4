"""Segmentation metrics as pure functions: label arrays in, numbers or dataclasses out.

All label images are integer arrays of shape (H, W) indexed (row, col) = (y, x), with
0 = background and any non-negative ids (they need not be consecutive). Internally each
image is renumbered to 1..n in ascending id order, so row ``i`` of every per-cell result
belongs to the ``i``-th smallest non-zero id (``label_ids`` returns that order).

Every pairwise quantity comes from one pixel-overlap table built with a single
``np.bincount`` over paired labels (upstream looped over cell pairs on full images).
The table and the IoU matrix are dense, ``(n_true + 1) x (n_pred + 1)``: fine for crops
and tiles, heavy for whole slides with tens of thousands of cells.

Thresholds are parameters and appear in result keys by their true value
(``"AP@0.5"`` for 0.5). Upstream's test script used ``UPSTREAM_THRESHOLDS`` =
(0.25, 0.75, 0.9) but printed the first column as "0.5"; pass it explicitly to
reproduce upstream numbers, which then come out labelled ``"AP@0.25"``.

Spot coordinates are ``spots_xy`` arrays of shape (N, 2), column 0 = x (column),
column 1 = y (row), in pixels. A spot lies in pixel ``(floor(y), floor(x))``, which
equals upstream's truncation toward zero for every in-image spot. Spots with a negative
or non-finite coordinate, or at or beyond the image size, are ignored (upstream wrapped
negative ones around to the opposite edge).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from GeneSegNet.io.spots import spot_pixels

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLDS: tuple[float, ...] = (0.5, 0.75, 0.9)
UPSTREAM_THRESHOLDS: tuple[float, ...] = (0.25, 0.75, 0.9)
"""Upstream's AP thresholds; its printed "AP@0.5" was really AP@0.25."""

_LUT_MAX_ID = 1 << 22  # renumber through a lookup table below this id, else np.unique


def threshold_key(name: str, threshold: float) -> str:
    """Result key for a metric at a threshold, e.g. ``threshold_key("AP", 0.5) == "AP@0.5"``."""
    return f"{name}@{float(threshold)!r}"


def _check_labels(labels: np.ndarray, name: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype == bool:
        labels = labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must be an integer label image, got dtype {labels.dtype}")
    if labels.ndim != 2:
        raise ValueError(f"{name} must have shape (H, W), got {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError(f"{name} has negative ids; 0 is background, cells are > 0")
    return labels


def _renumber(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map ids to 1..n (ascending), 0 stays 0. Returns (flat int64 dense labels, ids)."""
    flat = labels.ravel()
    top = int(flat.max()) if flat.size else 0
    if top <= max(_LUT_MAX_ID, 2 * flat.size):
        present = np.bincount(flat.astype(np.int64, copy=False), minlength=top + 1) > 0
        present[0] = False
        ids = np.flatnonzero(present)
        lut = np.zeros(top + 1, dtype=np.int64)
        lut[ids] = np.arange(1, ids.size + 1)
        return lut[flat], ids.astype(np.int64)
    uniq, inverse = np.unique(flat, return_inverse=True)
    dense = inverse.astype(np.int64).ravel()
    if uniq[0] != 0:
        return dense + 1, uniq.astype(np.int64)
    return dense, uniq[1:].astype(np.int64)


def label_ids(labels: np.ndarray) -> np.ndarray:
    """Sorted non-zero ids of a label image (H, W); the row order of all per-cell results."""
    return _renumber(_check_labels(labels, "labels"))[1]


@dataclass(frozen=True)
class _Overlap:
    """Overlap table with the dense (1..n) labels and the ids its rows/columns stand for."""

    table: np.ndarray  # (n_true + 1, n_pred + 1) int64
    true_dense: np.ndarray  # (H*W,) int64, 0 = background, i = i-th true id
    pred_dense: np.ndarray  # (H*W,) int64
    true_ids: np.ndarray  # (n_true,) int64, ascending
    pred_ids: np.ndarray  # (n_pred,) int64, ascending


def _overlap(true: np.ndarray, pred: np.ndarray) -> _Overlap:
    true = _check_labels(true, "true")
    pred = _check_labels(pred, "pred")
    if true.shape != pred.shape:
        raise ValueError(f"true {true.shape} and pred {pred.shape} shapes differ")
    t_dense, t_ids = _renumber(true)
    p_dense, p_ids = _renumber(pred)
    n_cols = p_ids.size + 1
    counts = np.bincount(t_dense * n_cols + p_dense, minlength=(t_ids.size + 1) * n_cols)
    table = counts.reshape(t_ids.size + 1, n_cols).astype(np.int64)
    return _Overlap(table, t_dense, p_dense, t_ids, p_ids)


def overlap_table(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Pixel overlap counts between two label images.

    Parameters
    ----------
    true, pred : ndarray of shape (H, W), integer
        Label images, 0 = background.

    Returns
    -------
    ndarray of shape (n_true + 1, n_pred + 1), int64
        ``table[i, j]`` = number of pixels with the i-th true id and the j-th pred id
        (index 0 = background, then ids in ascending order, see ``label_ids``).

    Examples
    --------
    >>> overlap_table(np.array([[0, 5, 5]]), np.array([[2, 2, 0]]))
    array([[0, 1],
           [1, 1]])
    """
    return _overlap(true, pred).table


def _iou_from_table(table: np.ndarray) -> np.ndarray:
    inter = table[1:, 1:].astype(np.float64)
    area_t = table[1:, :].sum(axis=1).astype(np.float64)
    area_p = table[:, 1:].sum(axis=0).astype(np.float64)
    union = area_t[:, None] + area_p[None, :] - inter
    return inter / np.maximum(union, 1.0)  # every present id has area >= 1


def iou_matrix(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Intersection over union of every (true cell, pred cell) pair.

    Returns an ndarray of shape (n_true, n_pred), float64; rows and columns follow the
    ascending non-zero ids of ``true`` and ``pred``.
    """
    return _iou_from_table(overlap_table(true, pred))


def _check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    values = tuple(float(t) for t in np.atleast_1d(np.asarray(thresholds, dtype=np.float64)))
    if not values:
        raise ValueError("at least one IoU threshold is needed")
    if any(not 0.0 < t <= 1.0 for t in values):
        raise ValueError(f"IoU thresholds must lie in (0, 1], got {values}")
    return tuple(dict.fromkeys(values))  # drop repeats, keep order


@dataclass(frozen=True, eq=False)
class MatchResult:
    """Instance matching of one image at several IoU thresholds.

    Dicts are keyed by the float threshold. ``pairs[t]`` is an int64 array of shape
    (TP, 2) holding the matched (true id, pred id) pairs with IoU >= t, and
    ``pair_iou[t]`` their IoUs. ``ap[t] = TP / (TP + FP + FN)``; it is defined as 1.0
    when both images are empty (nothing to find, nothing found).
    """

    thresholds: tuple[float, ...]
    n_true: int
    n_pred: int
    tp: dict[float, int]
    fp: dict[float, int]
    fn: dict[float, int]
    pairs: dict[float, np.ndarray]
    pair_iou: dict[float, np.ndarray]

    @property
    def ap(self) -> dict[float, float]:
        """{threshold: TP / (TP + FP + FN)}, 1.0 when n_true == n_pred == 0."""
        out = {}
        for t in self.thresholds:
            denominator = self.tp[t] + self.fp[t] + self.fn[t]
            out[t] = 1.0 if denominator == 0 else self.tp[t] / denominator
        return out

    def as_dict(self) -> dict[str, float | int]:
        """Flat dict: ``n_true``, ``n_pred`` and ``AP@t``, ``TP@t``, ``FP@t``, ``FN@t``."""
        out: dict[str, float | int] = {"n_true": self.n_true, "n_pred": self.n_pred}
        ap = self.ap
        for t in self.thresholds:
            out[threshold_key("AP", t)] = ap[t]
            out[threshold_key("TP", t)] = self.tp[t]
            out[threshold_key("FP", t)] = self.fp[t]
            out[threshold_key("FN", t)] = self.fn[t]
        return out


def _match_iou(
    iou: np.ndarray, t_ids: np.ndarray, p_ids: np.ndarray, thresholds: tuple[float, ...]
) -> MatchResult:
    n_true, n_pred = iou.shape
    n_min = min(n_true, n_pred)
    tp, fp, fn, pairs, pair_iou = {}, {}, {}, {}, {}
    for t in thresholds:
        rows = cols = np.zeros(0, dtype=np.int64)
        if n_min > 0:
            cost = -(iou >= t).astype(np.float64) - iou / (2.0 * n_min)
            rows, cols = linear_sum_assignment(cost)
            keep = iou[rows, cols] >= t
            rows, cols = rows[keep], cols[keep]
        tp[t] = int(rows.size)
        fp[t] = n_pred - tp[t]
        fn[t] = n_true - tp[t]
        pairs[t] = np.stack([t_ids[rows], p_ids[cols]], axis=1).astype(np.int64)
        pair_iou[t] = iou[rows, cols]
    return MatchResult(thresholds, n_true, n_pred, tp, fp, fn, pairs, pair_iou)


def match(
    true: np.ndarray, pred: np.ndarray, thresholds: Sequence[float] = DEFAULT_THRESHOLDS
) -> MatchResult:
    """Match predicted to true cells at each IoU threshold.

    At threshold t, pairs come from a Hungarian assignment on the cost
    ``-[IoU >= t] - IoU / (2 * n_min)``, ``n_min = min(n_true, n_pred)``: the most pairs
    with IoU >= t, ties broken by total IoU. TP = assigned pairs with IoU >= t,
    FP = n_pred - TP, FN = n_true - TP.

    Parameters
    ----------
    true, pred : ndarray of shape (H, W), integer
        Ground-truth and predicted label images, 0 = background.
    thresholds : sequence of float in (0, 1]
        IoU thresholds (repeats are dropped).

    Examples
    --------
    >>> m = match(np.array([[1, 1, 0, 2]]), np.array([[3, 3, 0, 0]]), thresholds=(0.5,))
    >>> m.tp[0.5], m.fp[0.5], m.fn[0.5], m.as_dict()["AP@0.5"]
    (1, 0, 1, 0.5)
    """
    ov = _overlap(true, pred)
    return _match_iou(
        _iou_from_table(ov.table), ov.true_ids, ov.pred_ids, _check_thresholds(thresholds)
    )


def _as_image_list(images: Sequence[np.ndarray] | np.ndarray) -> list[np.ndarray]:
    if isinstance(images, np.ndarray) and images.ndim == 2:
        return [images]
    return list(images)


def average_precision(
    true_list: Sequence[np.ndarray] | np.ndarray,
    pred_list: Sequence[np.ndarray] | np.ndarray,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    skip_empty_true: bool = False,
) -> dict:
    """AP = TP / (TP + FP + FN) per image, averaged over images.

    Parameters
    ----------
    true_list, pred_list : sequences of ndarray (H, W), integer
        Paired ground-truth and predicted label images (one 2-D array is one image).
    thresholds : sequence of float
        IoU thresholds; ``UPSTREAM_THRESHOLDS`` reproduces upstream's test metric.
    skip_empty_true : bool
        Drop images whose ground truth has no cell (upstream's test did this).

    Returns
    -------
    dict
        ``"per_image"``: list of ``MatchResult``; ``"n_images"``: images averaged;
        ``"ap"``: {threshold: mean AP}; plus ``"AP@t"`` (mean AP) and summed
        ``"TP@t"``, ``"FP@t"``, ``"FN@t"`` for each threshold. Means are NaN when no
        image is left.
    """
    trues, preds = _as_image_list(true_list), _as_image_list(pred_list)
    if len(trues) != len(preds):
        raise ValueError(f"{len(trues)} true images but {len(preds)} predictions")
    ts = _check_thresholds(thresholds)
    per_image = []
    for true, pred in zip(trues, preds, strict=True):
        result = match(true, pred, ts)
        if skip_empty_true and result.n_true == 0:
            continue
        per_image.append(result)
    if not per_image:
        logger.warning("average_precision: no image to average")
    out: dict = {"per_image": per_image, "n_images": len(per_image), "ap": {}}
    for t in ts:
        mean = float(np.mean([r.ap[t] for r in per_image])) if per_image else float("nan")
        out["ap"][t] = mean
        out[threshold_key("AP", t)] = mean
        for name in ("TP", "FP", "FN"):
            out[threshold_key(name, t)] = sum(getattr(r, name.lower())[t] for r in per_image)
    return out


def aggregated_jaccard_index(true: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al., IEEE TMI 2017).

    For each true cell take the pred cell with the highest IoU (first id on ties) and
    add their intersection to C and their union to U; a pred cell picked by several
    true cells is counted in each of their unions. A true cell that overlaps no pred
    cell adds only its own area to U. Finally the areas of pred cells never picked are
    added to U. AJI = C / U, defined as 1.0 when both images are empty.

    Examples
    --------
    >>> aggregated_jaccard_index(np.array([[1, 1, 0]]), np.array([[0, 4, 4]]))
    0.3333333333333333
    """
    table = overlap_table(true, pred)
    inter = table[1:, 1:]
    area_t = table[1:, :].sum(axis=1)
    area_p = table[:, 1:].sum(axis=0)
    if area_t.size == 0:
        return 1.0 if area_p.size == 0 else 0.0
    if area_p.size == 0:
        return 0.0
    iou = _iou_from_table(table)
    best = iou.argmax(axis=1)
    rows = np.arange(best.size)
    hit = iou[rows, best] > 0
    best_inter = inter[rows[hit], best[hit]]
    c = int(best_inter.sum())
    u = int((area_t[hit] + area_p[best[hit]] - best_inter).sum()) + int(area_t[~hit].sum())
    unused = np.ones(area_p.size, dtype=bool)
    unused[best[hit]] = False
    u += int(area_p[unused].sum())
    return c / u


def per_cell_best_iou(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Best IoU of each true cell with any pred cell (0 if none overlaps).

    Returns an ndarray of shape (n_true,), float64, in ascending true-id order.
    """
    iou = iou_matrix(true, pred)
    return iou.max(axis=1) if iou.shape[1] else np.zeros(iou.shape[0])


def _spot_pixels(spots_xy: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(pixel flat index of in-image spots, boolean mask of which spots are in the image)."""
    spots = np.asarray(spots_xy, dtype=np.float64)
    if spots.ndim != 2 or spots.shape[1] < 2:
        raise ValueError(f"spots_xy must have shape (N, 2) as (x, y), got {spots.shape}")
    rows, cols, inside = spot_pixels(spots[:, 0], spots[:, 1], shape)
    return rows * shape[1] + cols, inside


def gene_iou(true: np.ndarray, pred: np.ndarray, spots_xy: np.ndarray) -> tuple[float, np.ndarray]:
    """Spot-set Jaccard index between each true cell and its best-IoU pred cell.

    For every true cell holding at least one spot, the pred cell with the highest pixel
    IoU (first id on ties; none if no pred cell overlaps) is taken, and the score is
    |A ∩ B| / |A ∪ B| for A, B the sets of spot pixels inside the true and the matched
    pred cell (0 without an overlapping pred cell). Spots are reduced to pixels first,
    so duplicate coordinates count once; genes are ignored; out-of-image spots are
    dropped (see the module docstring).

    Parameters
    ----------
    true, pred : ndarray of shape (H, W), integer
        Label images, 0 = background.
    spots_xy : ndarray of shape (N, 2), float or int
        Spot coordinates, column 0 = x (column), column 1 = y (row), in pixels.

    Returns
    -------
    mean : float
        Mean score over true cells with spots (NaN if there are none).
    per_cell : ndarray of shape (n_true,), float64
        Score per true cell in ascending id order; NaN for cells without spots.
    """
    ov = _overlap(true, pred)
    n_true, n_pred = ov.true_ids.size, ov.pred_ids.size
    flat, _ = _spot_pixels(spots_xy, np.asarray(true).shape)
    flat = np.unique(flat)  # the set of spot pixels: duplicates collapse
    t_of, p_of = ov.true_dense[flat], ov.pred_dense[flat]
    best = np.zeros(n_true + 1, dtype=np.int64)  # dense id of the matched pred cell, 0 = none
    if n_true and n_pred:
        iou = _iou_from_table(ov.table)
        arg = iou.argmax(axis=1)
        best[1:] = np.where(iou[np.arange(n_true), arg] > 0, arg + 1, 0)
    n_a = np.bincount(t_of, minlength=n_true + 1)[1:]
    n_b = np.bincount(p_of, minlength=n_pred + 1)
    n_b[0] = 0  # "no matched cell" holds no spots
    same = (t_of > 0) & (p_of == best[t_of]) & (p_of > 0)
    n_ab = np.bincount(t_of[same], minlength=n_true + 1)[1:]
    per_cell = np.full(n_true, np.nan)
    has = n_a > 0
    per_cell[has] = n_ab[has] / (n_a[has] + n_b[best[1:]][has] - n_ab[has])
    mean = float(per_cell[has].mean()) if has.any() else float("nan")
    return mean, per_cell


def _ratio(num: int, den: int) -> float:
    return num / den if den else float("nan")


def transcript_assignment_accuracy(
    true_cell_of_spot: np.ndarray,
    pred_labels: np.ndarray,
    true_labels: np.ndarray,
    spots_xy: np.ndarray,
    iou_threshold: float = 0.5,
) -> dict[str, float | int]:
    """How well a predicted segmentation assigns transcripts to their true cells.

    Each spot gets the pred cell at its pixel. Pred cells are translated to true ids
    through ``match(true_labels, pred_labels, (iou_threshold,)).pairs``; a spot on
    background keeps 0, and a spot in a pred cell that matches no true cell gets an
    "unmatched cell" label that equals no true assignment. Every spot counts (no
    de-duplication); spots outside the image are dropped (module docstring).

    Parameters
    ----------
    true_cell_of_spot : ndarray of shape (N,), integer
        True cell id of each spot, 0 = background; ids refer to ``true_labels``.
    pred_labels, true_labels : ndarray of shape (H, W), integer
        Predicted and ground-truth label images, 0 = background.
    spots_xy : ndarray of shape (N, 2)
        Spot coordinates, column 0 = x (column), column 1 = y (row), in pixels.
    iou_threshold : float
        IoU needed for a pred cell to stand for a true cell.

    Returns
    -------
    dict
        ``accuracy``: fraction of spots whose predicted assignment (matched true id or
        background) equals ``true_cell_of_spot``. ``precision`` and ``recall`` of "in a
        cell" versus background: TP = spots in a pred cell and truly in a cell,
        precision = TP / spots in a pred cell, recall = TP / spots truly in a cell.
        ``right_cell``: fraction of the spots truly in a cell whose pred cell stands for
        that cell; ``background_in_cells``: fraction of the true background spots that
        fall in a pred cell.
        ``n_spots`` (spots used) and ``n_ignored`` (outside the image). Ratios with a
        zero denominator are NaN.
    """
    truth = np.asarray(true_cell_of_spot)
    if truth.ndim != 1 or not np.issubdtype(truth.dtype, np.integer):
        raise ValueError("true_cell_of_spot must be a 1-D integer array")
    if truth.size and truth.min() < 0:
        raise ValueError("true_cell_of_spot has negative ids; 0 is background")
    ov = _overlap(true_labels, pred_labels)
    flat, inside = _spot_pixels(spots_xy, np.asarray(pred_labels).shape)
    if inside.size != truth.size:
        raise ValueError(f"{truth.size} true assignments but {inside.size} spots")
    ts = _check_thresholds((iou_threshold,))
    pairs = _match_iou(_iou_from_table(ov.table), ov.true_ids, ov.pred_ids, ts).pairs[ts[0]]
    to_true = np.full(ov.pred_ids.size + 1, -1, dtype=np.int64)  # dense pred id -> true id
    to_true[0] = 0
    to_true[np.searchsorted(ov.pred_ids, pairs[:, 1]) + 1] = pairs[:, 0]
    pred_cell = ov.pred_dense[flat]
    assigned = to_true[pred_cell]
    truth = truth[inside].astype(np.int64)
    in_pred, in_true = pred_cell > 0, truth > 0
    both = int((in_pred & in_true).sum())
    return {
        "accuracy": _ratio(int((assigned == truth).sum()), truth.size),
        "precision": _ratio(both, int(in_pred.sum())),
        "recall": _ratio(both, int(in_true.sum())),
        "right_cell": _ratio(int((assigned[in_true] == truth[in_true]).sum()),
                             int(in_true.sum())),
        "background_in_cells": _ratio(int(in_pred[~in_true].sum()), int((~in_true).sum())),
        "n_spots": int(truth.size),
        "n_ignored": int((~inside).sum()),
    }
