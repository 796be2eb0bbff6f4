"""Tests for GeneSegNet.training.refine (spec §6.2 label refinement).

The literal level set (``refine_labels_levelset``) is the reference. The rule of
§6.2 is re-implemented here plainly, one cell at a time with scipy's binary
morphology, to check the vectorised ``method="morphology"``. Level-set cases
are kept small (<= 64x64, <= 8 cells).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from GeneSegNet.errors import InputError
from GeneSegNet.training.refine import RuleDomain, refine_labels, refine_labels_levelset

SQUARE = np.ones((3, 3), dtype=bool)


def rule_reference(mask: np.ndarray, passes: int = 2) -> np.ndarray:
    """§6.2 rule: per pass, ids ascending, R_c = dilate(open([m == c])) over background."""
    m = mask.copy()
    for _ in range(passes):
        new = m.copy()
        for c in np.unique(m[m > 0]):
            region = ndi.binary_opening(m == c, SQUARE, border_value=0)
            region = ndi.binary_dilation(region, SQUARE, border_value=0)
            new[region & (m == 0)] = c
        m = new
    return m


def ellipses(shape, cells) -> np.ndarray:
    """Label image from (id, cy, cx, ry, rx) ellipses; earlier cells keep overlaps."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    m = np.zeros(shape, dtype=np.int64)
    for c, cy, cx, ry, rx in cells:
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        m[inside & (m == 0)] = c
    return m


def random_mask(rng, shape, n, rmin, rmax) -> np.ndarray:
    cells = []
    for c in range(1, n + 1):
        cy, cx = rng.uniform(-3, shape[0] + 3), rng.uniform(-3, shape[1] + 3)
        cells.append((c, cy, cx, *rng.uniform(rmin, rmax, 2)))
    return ellipses(shape, cells)


def with_holes_and_notches() -> np.ndarray:
    m = ellipses((48, 48), [(1, 14, 14, 10, 9), (2, 34, 33, 9, 11), (3, 10, 38, 6, 6)])
    m[12:14, 12:15] = 0  # interior holes
    m[16, 18] = 0
    m[34, 30:32] = 0
    m[4:7, 12:14] = 0  # notches from the outline
    m[30:33, 42:44] = 0
    m[10, 32:36] = 0  # a cut 1 px wide
    return m


CASES = {
    "ellipses": lambda: ellipses(
        (48, 48), [(1, 10, 10, 6, 5), (2, 12, 32, 5, 7), (3, 32, 14, 7, 6), (4, 34, 36, 6, 6)]
    ),
    "touching": lambda: ellipses(
        (48, 48), [(1, 20, 14, 9, 8), (2, 20, 29, 8, 8), (3, 34, 22, 8, 10), (4, 8, 40, 5, 5)]
    ),
    "border": lambda: ellipses(
        (40, 40), [(1, 0, 0, 8, 9), (2, 20, -2, 7, 6), (3, 39, 20, 6, 9), (4, 15, 39, 9, 5)]
    ),
    "holes_notches": with_holes_and_notches,
    "non_square": lambda: ellipses(
        (40, 56),
        [(1, 8, 8, 6, 7), (2, 30, 10, 7, 6), (3, 20, 30, 8, 8), (4, 5, 50, 6, 6)]
        + [(5, 36, 50, 6, 7)],
    ),
    "sparse_ids": lambda: ellipses(
        (40, 48),
        [(70000, 10, 12, 6, 7), (3, 28, 14, 7, 6), (1000, 20, 36, 8, 7), (17, 4, 40, 4, 5)],
    ),
}


def check_invariants(before: np.ndarray, after: np.ndarray) -> None:
    assert after.dtype == np.int32 and after.shape == before.shape
    labelled = before > 0
    np.testing.assert_array_equal(after[labelled], before[labelled])  # nobody loses/steals
    assert set(np.unique(after[after > 0])) == set(np.unique(before[before > 0]))


# ----------------------------------------------------------------------- the rule


@pytest.mark.parametrize("seed", range(6))
def test_morphology_method_equals_plain_rule(seed):
    rng = np.random.default_rng(seed)
    shape = [(50, 50), (40, 64), (73, 31)][seed % 3]
    mask = random_mask(rng, shape, n=12, rmin=1.0, rmax=9.0)
    mask[mask > 0] = mask[mask > 0] * 7 + 100  # non-consecutive ids
    out = refine_labels(mask, 1, method="morphology")
    np.testing.assert_array_equal(out, rule_reference(mask))
    check_invariants(mask, out)


def test_morphology_method_analytic_two_squares():
    """7x7 squares 3 px apart: each pass grows a square by 1 px; the middle column
    between them is reached by both in pass 2 and goes to the higher id."""
    mask = np.zeros((20, 30), dtype=np.int64)
    mask[5:12, 5:12] = 4
    mask[5:12, 15:22] = 9
    expected = np.zeros_like(mask)
    expected[3:14, 3:14] = 4
    expected[3:14, 13:24] = 9
    for method in ("morphology", "fast", "levelset"):
        np.testing.assert_array_equal(refine_labels(mask, 1, method=method), expected)


def test_morphology_method_is_identity_from_round_3():
    mask = CASES["touching"]()
    np.testing.assert_array_equal(refine_labels(mask, 3, method="morphology"), mask)


# --------------------------------------------------------- fast vs literal level set


@pytest.mark.parametrize("name", sorted(CASES))
def test_fast_matches_levelset_round_1(name):
    mask = CASES[name]()
    literal = refine_labels_levelset(mask, 1)
    fast = refine_labels(mask, 1, method="fast")
    np.testing.assert_array_equal(fast, literal)
    check_invariants(mask, literal)
    assert (literal != mask).any()  # the refinement does something
    # in these ordinary cases upstream's level set is the rule of §6.2
    np.testing.assert_array_equal(literal, rule_reference(mask))


@pytest.mark.parametrize("name", ["touching", "non_square"])
def test_rounds_1_and_2_agree_and_round_3_is_identity(name):
    mask = CASES[name]()
    np.testing.assert_array_equal(refine_labels(mask, 2), refine_labels(mask, 1))
    np.testing.assert_array_equal(refine_labels_levelset(mask, 2), rule_reference(mask))
    np.testing.assert_array_equal(refine_labels_levelset(mask, 3), mask)
    np.testing.assert_array_equal(refine_labels(mask, 3), mask)


def test_thin_cell_falls_back_to_level_set():
    """A 2-px-wide cell has an empty 3x3 opening: the rule gives it nothing, the
    level set (curvature only, C1 ~ C2) claims background far from it."""
    mask = ellipses((32, 40), [(5, 22, 28, 6, 7)])
    mask[6:8, 4:30] = 2
    literal = refine_labels_levelset(mask, 1)
    np.testing.assert_array_equal(refine_labels(mask, 1, method="fast"), literal)
    check_invariants(mask, literal)
    rule = rule_reference(mask)
    assert (rule == 2).sum() == (mask == 2).sum()  # the rule does not grow it
    assert (literal == 2).sum() > (mask == 2).sum()  # the level set does


def test_large_cell_falls_back_to_level_set():
    """A cell covering most of the image is outside the rule's domain."""
    mask = np.full((30, 40), 5, dtype=np.int64)
    mask[10:13, 10:14] = 0  # a hole
    mask[20, 30] = 0
    mask[0, :5] = 0  # a gap on the image edge
    lo, hi = RuleDomain().bounds(mask.size, True)
    assert (mask == 5).sum() > hi
    literal = refine_labels_levelset(mask, 1)
    np.testing.assert_array_equal(refine_labels(mask, 1, method="fast"), literal)
    check_invariants(mask, literal)


@pytest.mark.slow
def test_small_cells_in_256_image_match_level_set():
    """Cells of <= 250 px in a 256x256 image: the level set fills 1-px concave
    corners the rule leaves empty, and the smallest (edge-cut) cells claim large
    areas; "fast" follows the level set."""
    rng = np.random.default_rng(7)
    mask = random_mask(rng, (256, 256), n=10, rmin=6.0, rmax=9.0)
    literal = refine_labels_levelset(mask, 1)
    np.testing.assert_array_equal(refine_labels(mask, 1, method="fast"), literal)
    check_invariants(mask, literal)
    assert (literal != rule_reference(mask)).any()  # the rule would be wrong here


# ------------------------------------------------------------------------- API


def test_input_not_modified_and_int32():
    mask = CASES["ellipses"]().astype(np.uint16)
    copy = mask.copy()
    out = refine_labels(mask, 1)
    np.testing.assert_array_equal(mask, copy)
    assert out.dtype == np.int32


def test_bad_inputs():
    with pytest.raises(InputError):
        refine_labels(np.zeros((2, 3, 4), dtype=np.int32), 1)
    with pytest.raises(InputError):
        refine_labels(np.zeros((5, 5), dtype=np.float32), 1)
    with pytest.raises(InputError):
        refine_labels(-np.ones((5, 5), dtype=np.int32), 1)
    with pytest.raises(InputError):
        refine_labels_levelset(np.zeros((1, 5), dtype=np.int32), 1)
    with pytest.raises(ValueError):
        refine_labels(np.zeros((5, 5), dtype=np.int32), 1, method="other")


def test_empty_mask():
    mask = np.zeros((9, 11), dtype=np.int64)
    for method in ("fast", "levelset", "morphology"):
        np.testing.assert_array_equal(refine_labels(mask, 1, method=method), mask)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    mask = CASES["holes_notches"]()
    mask[6:8, 30:46] = 11  # a thin cell: runs the level set on the device
    cpu = refine_labels(mask, 1)
    np.testing.assert_array_equal(refine_labels(mask, 1, device=torch.device("cuda")), cpu)
