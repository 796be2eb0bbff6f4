"""Tests for GeneSegNet.evaluation.metrics against analytic or hand-computed answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from GeneSegNet.evaluation.metrics import (
    UPSTREAM_THRESHOLDS,
    aggregated_jaccard_index,
    average_precision,
    gene_iou,
    iou_matrix,
    label_ids,
    match,
    overlap_table,
    per_cell_best_iou,
    transcript_assignment_accuracy,
)

# ----------------------------------------------------------------------------- helpers


def disk_iou(r: float, d: float) -> float:
    """IoU of two disks of radius r whose centres are d apart (circle-circle lens area)."""
    if d >= 2 * r:
        return 0.0
    lens = 2 * r * r * math.acos(d / (2 * r)) - 0.5 * d * math.sqrt(4 * r * r - d * d)
    return lens / (2 * math.pi * r * r - lens)


def paint_disk(labels: np.ndarray, cy: float, cx: float, r: float, value: int) -> None:
    yy, xx = np.mgrid[: labels.shape[0], : labels.shape[1]]
    labels[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = value


def random_labels(rng: np.random.Generator, shape, n_rect: int, ids) -> np.ndarray:
    """Overlapping random rectangles painted with the given (non-consecutive) ids."""
    out = np.zeros(shape, dtype=np.int64)
    for value in ids[:n_rect]:
        r0, c0 = rng.integers(0, shape[0] - 3), rng.integers(0, shape[1] - 3)
        h, w = rng.integers(2, 12, size=2)
        out[r0 : r0 + h, c0 : c0 + w] = value
    return out


# The A/B/X/Y strip example (10 rows): true A = cols 0-9, B = cols 10-19;
# pred Y = cols 0-2, X = cols 3-14.
# IoU(A, X) = 70/150, IoU(B, X) = 50/170, IoU(A, Y) = 30/100, IoU(B, Y) = 0.
A, B, X, Y = 4, 9, 21, 8


def strips() -> tuple[np.ndarray, np.ndarray]:
    true = np.zeros((10, 24), dtype=np.int32)
    true[:, 0:10] = A
    true[:, 10:20] = B
    pred = np.zeros_like(true)
    pred[:, 0:3] = Y
    pred[:, 3:15] = X
    return true, pred


# ----------------------------------------------------------------------------- tables


def test_overlap_table_matches_brute_force_double_loop(rng):
    true_ids = [3, 17, 1000, 5, 42]
    pred_ids = [7, 2, 99999, 64]
    true = random_labels(rng, (40, 50), 5, true_ids)
    pred = random_labels(rng, (40, 50), 4, pred_ids)
    table = overlap_table(true, pred)
    t_all = [0] + sorted(set(np.unique(true)) - {0})
    p_all = [0] + sorted(set(np.unique(pred)) - {0})
    assert table.shape == (len(t_all), len(p_all))
    assert table.dtype == np.int64
    for i, t in enumerate(t_all):
        for j, p in enumerate(p_all):
            assert table[i, j] == np.sum((true == t) & (pred == p))
    np.testing.assert_array_equal(label_ids(true), t_all[1:])


def test_overlap_table_huge_ids_uses_same_answer():
    true = np.array([[0, 2**40, 2**40], [5, 5, 0]], dtype=np.int64)
    pred = np.array([[1, 1, 2**35], [0, 2**35, 2**35]], dtype=np.int64)
    # rows: 0, 5, 2**40; cols: 0, 1, 2**35
    expected = np.array([[0, 1, 1], [1, 0, 1], [0, 1, 1]])
    np.testing.assert_array_equal(overlap_table(true, pred), expected)


def test_iou_matrix_on_strips():
    true, pred = strips()
    # rows A(4), B(9); cols Y(8), X(21)
    expected = np.array([[30 / 100, 70 / 150], [0.0, 50 / 170]])
    np.testing.assert_allclose(iou_matrix(true, pred), expected, rtol=0, atol=1e-15)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="shapes differ"):
        overlap_table(np.zeros((3, 3), int), np.zeros((3, 4), int))
    with pytest.raises(ValueError, match="integer"):
        overlap_table(np.zeros((3, 3), float), np.zeros((3, 3), int))
    with pytest.raises(ValueError, match="negative"):
        overlap_table(-np.ones((3, 3), int), np.zeros((3, 3), int))
    with pytest.raises(ValueError, match="thresholds"):
        match(np.zeros((3, 3), int), np.zeros((3, 3), int), thresholds=(0.0,))


# ----------------------------------------------------------------------------- matching


def test_identical_masks_give_ap_one_everywhere(rng):
    true = random_labels(rng, (60, 60), 5, [11, 3, 8, 40, 2])
    result = match(true, true.copy(), thresholds=(0.5, 0.75, 0.9, 1.0))
    n = len(label_ids(true))
    for t in result.thresholds:
        assert result.ap[t] == 1.0
        assert (result.tp[t], result.fp[t], result.fn[t]) == (n, 0, 0)


def test_shifted_disks_exact_tp_fp_fn():
    r, spacing = 20, 70
    shifts = [1, 3, 6, 8, 14, 22]  # analytic IoUs ~0.94, 0.83, 0.68, 0.60, 0.39, 0.20
    thresholds = (0.25, 0.5, 0.75, 0.9)
    true = np.zeros((3 * spacing, 4 * spacing), dtype=np.int32)
    pred = np.zeros_like(true)
    centres = [
        (spacing // 2 + spacing * i, spacing // 2 + spacing * j) for i in range(3) for j in range(3)
    ]
    analytic = {}
    for k, d in enumerate(shifts):
        cy, cx = centres[k]
        paint_disk(true, cy, cx, r, 100 + 7 * k)  # non-consecutive ids
        paint_disk(pred, cy, cx + d, r, 500 - 3 * k)
        analytic[(100 + 7 * k, 500 - 3 * k)] = disk_iou(r, d)
    paint_disk(true, *centres[6], r, 999)  # missed cell -> FN
    paint_disk(pred, *centres[7], r, 1)  # spurious cells -> FP
    paint_disk(pred, *centres[8], r, 2)

    # The pixel IoUs are close to the analytic ones, and no analytic IoU is near a threshold,
    # so the analytic values decide each pair.
    iou = iou_matrix(true, pred)
    t_ids, p_ids = list(label_ids(true)), list(label_ids(pred))
    for (ti, pi), value in analytic.items():
        assert abs(iou[t_ids.index(ti), p_ids.index(pi)] - value) < 0.01
        assert all(abs(value - t) > 0.02 for t in thresholds)

    result = match(true, pred, thresholds)
    assert (result.n_true, result.n_pred) == (len(shifts) + 1, len(shifts) + 2)
    for t in thresholds:
        expected_pairs = {pair for pair, value in analytic.items() if value >= t}
        tp = len(expected_pairs)
        assert result.tp[t] == tp
        assert result.fp[t] == len(shifts) + 2 - tp
        assert result.fn[t] == len(shifts) + 1 - tp
        assert result.ap[t] == pytest.approx(tp / (2 * len(shifts) + 3 - tp))
        assert {tuple(p) for p in result.pairs[t].tolist()} == expected_pairs
    assert [result.tp[t] for t in thresholds] == [5, 4, 2, 1]


def test_hungarian_beats_greedy_on_strips():
    true, pred = strips()
    result = match(true, pred, thresholds=(0.25, 0.4, 0.5))
    # At 0.25 both A-Y (0.30) and B-X (0.294) pass; greedy A-X would give one pair only.
    assert (result.tp[0.25], result.fp[0.25], result.fn[0.25]) == (2, 0, 0)
    assert {tuple(p) for p in result.pairs[0.25].tolist()} == {(A, Y), (B, X)}
    np.testing.assert_allclose(sorted(result.pair_iou[0.25]), [50 / 170, 30 / 100])
    # At 0.4 only A-X (0.467) passes.
    assert (result.tp[0.4], result.fp[0.4], result.fn[0.4]) == (1, 1, 1)
    assert result.ap[0.4] == pytest.approx(1 / 3)
    assert result.tp[0.5] == 0 and result.ap[0.5] == 0.0


def test_empty_cases():
    empty = np.zeros((8, 8), dtype=np.int32)
    cells = empty.copy()
    cells[1:3, 1:3] = 4
    cells[5:7, 5:7] = 9
    both_empty = match(empty, empty)
    assert all(both_empty.ap[t] == 1.0 for t in (0.5, 0.75, 0.9))
    assert both_empty.tp[0.5] == both_empty.fp[0.5] == both_empty.fn[0.5] == 0
    only_pred = match(empty, cells)
    assert (only_pred.tp[0.5], only_pred.fp[0.5], only_pred.fn[0.5]) == (0, 2, 0)
    assert only_pred.ap[0.5] == 0.0
    only_true = match(cells, empty)
    assert (only_true.tp[0.9], only_true.fp[0.9], only_true.fn[0.9]) == (0, 0, 2)
    assert only_true.pairs[0.9].shape == (0, 2)


def test_extra_and_missing_cells():
    true = np.zeros((20, 20), dtype=np.int32)
    true[0:5, 0:5] = 1
    true[10:15, 10:15] = 2
    true[0:5, 10:15] = 3
    pred = np.zeros_like(true)
    pred[0:5, 0:5] = 30  # exact
    pred[10:15, 10:15] = 10  # exact
    pred[15:20, 0:5] = 20  # extra -> FP; true 3 has no pred -> FN
    result = match(true, pred, thresholds=(0.5,))
    assert (result.tp[0.5], result.fp[0.5], result.fn[0.5]) == (2, 1, 1)
    assert result.as_dict()["AP@0.5"] == pytest.approx(2 / 4)


def test_keys_name_the_true_threshold():
    true, pred = strips()
    keys = match(true, pred).as_dict()
    for t in ("0.5", "0.75", "0.9"):
        for name in ("AP", "TP", "FP", "FN"):
            assert f"{name}@{t}" in keys
    upstream = average_precision([true], [pred], thresholds=UPSTREAM_THRESHOLDS)
    assert UPSTREAM_THRESHOLDS == (0.25, 0.75, 0.9)
    assert "AP@0.25" in upstream and "AP@0.5" not in upstream
    assert upstream["AP@0.25"] == 1.0  # both strips pairs pass at 0.25 (see above)
    assert upstream["ap"][0.25] == 1.0


def test_average_precision_means_over_images():
    true, pred = strips()
    empty = np.zeros_like(true)
    out = average_precision([true, empty, true], [true, pred, pred], thresholds=(0.4,))
    # per image AP@0.4: identical -> 1; empty GT with 2 preds -> 0; strips -> 1/3
    assert out["n_images"] == 3
    assert out["AP@0.4"] == pytest.approx((1 + 0 + 1 / 3) / 3)
    assert (out["TP@0.4"], out["FP@0.4"], out["FN@0.4"]) == (2 + 0 + 1, 0 + 2 + 1, 0 + 0 + 1)
    skipped = average_precision(
        [true, empty], [true, pred], thresholds=(0.4,), skip_empty_true=True
    )
    assert skipped["n_images"] == 1 and skipped["AP@0.4"] == 1.0
    with pytest.raises(ValueError):
        average_precision([true], [pred, pred])


# ----------------------------------------------------------------------------- AJI / IoU


def test_aji_shifted_squares():
    true = np.zeros((20, 30), dtype=np.int32)
    pred = np.zeros_like(true)
    true[0:10, 0:10] = 1
    pred[0:10, 5:15] = 2  # overlap 50, union 150
    assert aggregated_jaccard_index(true, pred) == pytest.approx(50 / 150)
    true[15:19, 20:24] = 7  # a GT cell with no pred adds its area (16) to the union only
    assert aggregated_jaccard_index(true, pred) == pytest.approx(50 / 166)
    pred[15:20, 0:2] = 3  # an unused pred adds its area (10) to the union
    assert aggregated_jaccard_index(true, pred) == pytest.approx(50 / 176)


def test_aji_strips_double_counts_shared_pred():
    true, pred = strips()
    # A -> X (70 / 150), B -> X (50 / 170), Y unused (30)
    assert aggregated_jaccard_index(true, pred) == pytest.approx(120 / 350)


def test_aji_empty_cases():
    empty = np.zeros((5, 5), dtype=np.int32)
    cells = empty.copy()
    cells[1:3, 1:3] = 2
    assert aggregated_jaccard_index(empty, empty) == 1.0
    assert aggregated_jaccard_index(empty, cells) == 0.0
    assert aggregated_jaccard_index(cells, empty) == 0.0
    assert aggregated_jaccard_index(cells, cells) == 1.0


def test_per_cell_best_iou_on_squares():
    true, pred = strips()
    np.testing.assert_allclose(per_cell_best_iou(true, pred), [70 / 150, 50 / 170])
    np.testing.assert_array_equal(per_cell_best_iou(true, np.zeros_like(pred)), [0.0, 0.0])


# ----------------------------------------------------------------------------- spots

# 6 x 8 hand example. True: 10 = rows 0-2 cols 0-3; 20 = rows 0-2 cols 4-7;
# 30 = rows 4-5 cols 0-1 (no pred overlaps it); 40 = (5, 3) (no spots).
# Pred: 5 = rows 0-2 cols 0-4 (IoU with 10 = 12/15, with 20 = 3/24);
# 6 = rows 0-2 cols 5-7 (IoU with 20 = 9/12); 7 = rows 4-5 cols 4-7 (no true cell).


def hand_images() -> tuple[np.ndarray, np.ndarray]:
    true = np.zeros((6, 8), dtype=np.int32)
    true[0:3, 0:4] = 10
    true[0:3, 4:8] = 20
    true[4:6, 0:2] = 30
    true[5, 3] = 40
    pred = np.zeros_like(true)
    pred[0:3, 0:5] = 5
    pred[0:3, 5:8] = 6
    pred[4:6, 4:8] = 7
    return true, pred


def test_gene_iou_hand_example():
    true, pred = hand_images()
    spots = np.array(
        [
            [0, 0], [1, 1], [1, 1], [3, 2],  # in 10 and 5 (one duplicate)
            [4, 0], [4.6, 1.2],  # in 20 but in pred 5
            [5, 0], [6, 2], [6.9, 2.5],  # in 20 and 6 ((6, 2) twice)
            [5, 4],  # pred 7 only
            [0, 4], [1.7, 5.2],  # in 30, no overlapping pred
            [3, 4],  # background
            [-0.5, 1], [-1, 0], [8, 0], [0, 6], [np.nan, 1],  # outside: ignored
        ]
    )  # fmt: skip
    mean, per_cell = gene_iou(true, pred, spots)
    # 10: A = {(0,0),(1,1),(3,2)}, B(5) = A + {(4,0),(4,1)} -> 3/5
    # 20: A = {(4,0),(4,1),(5,0),(6,2)}, B(6) = {(5,0),(6,2)} -> 2/4
    # 30: no overlapping pred -> 0; 40: no spots -> NaN
    np.testing.assert_allclose(per_cell, [3 / 5, 2 / 4, 0.0, np.nan])
    assert mean == pytest.approx((3 / 5 + 2 / 4 + 0.0) / 3)


def test_gene_iou_without_preds_or_spots():
    true, pred = hand_images()
    mean, per_cell = gene_iou(true, np.zeros_like(pred), np.array([[0, 0], [5, 1]]))
    assert mean == 0.0
    np.testing.assert_array_equal(per_cell, [0.0, 0.0, np.nan, np.nan])
    mean, per_cell = gene_iou(true, pred, np.zeros((0, 2)))
    assert math.isnan(mean) and np.isnan(per_cell).all()


def test_gene_iou_matches_set_based_reference(rng):
    true = random_labels(rng, (30, 30), 8, [2, 5, 9, 13, 77, 100, 101, 300])
    pred = random_labels(rng, (30, 30), 8, [1, 4, 6, 8, 10, 12, 14, 16])
    spots = rng.integers(-2, 32, size=(300, 2)).astype(float)
    mean, per_cell = gene_iou(true, pred, spots)

    pixels = {(int(x), int(y)) for x, y in spots if 0 <= x < 30 and 0 <= y < 30}
    expected = []
    for t in sorted(set(np.unique(true)) - {0}):
        a = {(x, y) for x, y in pixels if true[y, x] == t}
        if not a:
            expected.append(np.nan)
            continue
        best_id, best_iou = None, 0.0
        for p in sorted(set(np.unique(pred)) - {0}):
            inter = np.sum((true == t) & (pred == p))
            iou = inter / np.sum((true == t) | (pred == p))
            if iou > best_iou:
                best_id, best_iou = p, iou
        b = {(x, y) for x, y in pixels if best_id is not None and pred[y, x] == best_id}
        expected.append(len(a & b) / len(a | b))
    np.testing.assert_allclose(per_cell, expected)
    assert mean == pytest.approx(np.nanmean(expected))


def test_transcript_assignment_accuracy_hand_example():
    true, pred = hand_images()
    spots = np.array([[0, 0], [0, 0], [4, 1], [5, 0], [5, 4], [0, 4], [3, 4], [9, 9]], dtype=float)
    truth = np.array([10, 10, 20, 20, 0, 30, 0, 10])
    # matched at 0.5: pred 5 -> 10, pred 6 -> 20; pred 7 unmatched.
    # predicted: 10, 10, 10, 20, (unmatched), 0, 0, (outside)
    out = transcript_assignment_accuracy(truth, pred, true, spots)
    assert out["n_spots"] == 7 and out["n_ignored"] == 1
    assert out["accuracy"] == pytest.approx(4 / 7)
    # in a pred cell: spots 0-4 (5); truly in a cell: 0, 1, 2, 3, 5 (5); both: 0-3 (4)
    assert out["precision"] == pytest.approx(4 / 5)
    assert out["recall"] == pytest.approx(4 / 5)
    # At 0.8, pred 6 (IoU 0.75 with 20) no longer stands for 20: spot 3 becomes wrong.
    strict = transcript_assignment_accuracy(truth, pred, true, spots, iou_threshold=0.8)
    assert strict["accuracy"] == pytest.approx(3 / 7)
    assert strict["precision"] == pytest.approx(4 / 5)


def test_transcript_assignment_accuracy_checks_lengths():
    true, pred = hand_images()
    with pytest.raises(ValueError, match="spots"):
        transcript_assignment_accuracy(np.array([1, 2]), pred, true, np.zeros((3, 2)))


def test_right_cell_and_background_in_cells_count_by_hand():
    from GeneSegNet.evaluation.metrics import transcript_assignment_accuracy
    true = np.zeros((10, 20), np.int32)
    true[:, :8] = 1
    true[:, 10:18] = 2
    pred = np.zeros_like(true)
    pred[:, :9] = 5  # stands for true cell 1 (IoU 8/9), and swallows column 8 (background)
    pred[:, 12:18] = 7  # stands for true cell 2 (IoU 6/8)
    # x (col), y (row): two in cell 1, two in cell 2 (one in pred 7, one outside it),
    # three true background spots: one in pred 5, two outside every pred cell
    xy = np.array([[1, 1], [6, 2], [13, 3], [10.5, 4], [8.2, 5], [9.5, 5], [19, 0]], float)
    truth_ids = np.array([1, 1, 2, 2, 0, 0, 0])
    result = transcript_assignment_accuracy(truth_ids, pred, true, xy)
    assert result["right_cell"] == pytest.approx(3 / 4)
    assert result["background_in_cells"] == pytest.approx(1 / 3)
    assert result["accuracy"] == pytest.approx(5 / 7)
