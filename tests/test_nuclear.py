"""Cells redrawn from their nuclei (GeneSegNet.growth.nuclear) on synthetic tissue with
known truth: round cells around bright nuclei whose brightness varies 10× between cells,
transcripts uniform in the cells at ISS density plus uniform background; the input
cells are the true cells distorted (shifted and cut square), as a network's might be."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.segmentation import expand_labels

from GeneSegNet.errors import InputError
from GeneSegNet.evaluation.metrics import per_cell_best_iou
from GeneSegNet.growth.grow import regrow_whole_cells
from GeneSegNet.growth.nuclear import nuclei_within_cells, regrow_from_nuclei

PIXEL_UM = 0.325
NUCLEUS_UM = 4.0  # radius
REACH_UM = 4.0  # cell radius - nucleus radius (cells touching neighbours are cut between)


def _tissue(seed: int = 0, grid: int = 5, spacing_um: float = 18.0):
    rng = np.random.default_rng(seed)
    spacing = spacing_um / PIXEL_UM
    size = int(grid * spacing)
    centres = [((i + 0.5) * spacing + rng.uniform(-4, 4), (j + 0.5) * spacing + rng.uniform(-4, 4))
               for i in range(grid) for j in range(grid)]
    rr, cc = np.indices((size, size))
    nuclei = np.zeros((size, size), np.int32)
    image = np.full((size, size), 0.02)
    for k, (r, c) in enumerate(centres, start=1):
        disc = (rr - r) ** 2 + (cc - c) ** 2 <= (NUCLEUS_UM / PIXEL_UM) ** 2
        nuclei[disc] = k
        image[disc] = rng.choice([0.1, 1.0]) * rng.uniform(0.8, 1.0)  # 10x brightness range
    image = image + rng.normal(0, 0.01, image.shape)
    cells = expand_labels(nuclei, REACH_UM / PIXEL_UM)
    area_um2 = (cells > 0).sum() * PIXEL_UM ** 2
    n_cell = rng.poisson(0.1 * area_um2)  # 0.1 transcripts/µm² in cells: ISS-like
    inside = np.flatnonzero(cells.ravel() > 0)
    pix = rng.choice(inside, n_cell)
    rows = pix // size + rng.uniform(0, 1, n_cell)
    cols = pix % size + rng.uniform(0, 1, n_cell)
    n_bg = rng.poisson(0.005 * size * size * PIXEL_UM ** 2)
    rows = np.concatenate([rows, rng.uniform(0, size, n_bg)])
    cols = np.concatenate([cols, rng.uniform(0, size, n_bg)])
    return cells, nuclei, image, rows, cols


def _distorted(cells: np.ndarray) -> np.ndarray:
    """Each cell shifted by 3 px and cut to a square around its centre: a rough guess."""
    out = np.zeros_like(cells)
    shifted = np.roll(cells, (3, -3), axis=(0, 1))
    for k in np.unique(cells)[1:]:
        r, c = np.nonzero(cells == k)
        half = int(0.6 * (r.max() - r.min()) / 2)
        box = np.zeros_like(cells, dtype=bool)
        r0, c0 = int(r.mean()), int(c.mean())
        box[r0 - half:r0 + half, c0 - half:c0 + half] = True
        out[box & (shifted == k)] = k
    return out


def test_nuclei_are_found_in_bright_and_dim_cells_alike():
    cells, nuclei, image, _, _ = _tissue()
    found = nuclei_within_cells(cells, image, smooth_px=1.0)
    iou = per_cell_best_iou(nuclei, found)
    assert iou.min() > 0.85
    assert set(np.unique(found)) == set(np.unique(cells))


def test_redrawn_cells_match_the_truth_better_than_the_input():
    cells, _, image, rows, cols = _tissue(seed=1)
    rough = _distorted(cells)
    out = regrow_from_nuclei(rough, image, rows, cols, pixel_size_um=PIXEL_UM)
    before, after = per_cell_best_iou(cells, rough), per_cell_best_iou(cells, out)
    assert np.median(before) < 0.6
    assert np.median(after) > 0.9  # the reach is found from the pooled transcripts
    assert set(np.unique(out)) == set(np.unique(rough))


def test_a_cell_without_a_nucleus_keeps_its_outline():
    cells, _, image, rows, cols = _tissue(seed=2)
    k = int(cells[cells.shape[0] // 2, cells.shape[1] // 2])
    noise = np.random.default_rng(0).normal(0.02, 0.01, image.shape)
    image[cells == k] = noise[cells == k]  # its nucleus is invisible: noise, unimodal
    out = regrow_from_nuclei(cells, image, rows, cols, pixel_size_um=PIXEL_UM)
    np.testing.assert_array_equal(out == k, cells == k)
    assert set(np.unique(out)) == set(np.unique(cells))


def test_regrow_whole_cells_uses_the_image_only_where_borders_go_by_distance():
    cells, _, image, rows, cols = _tissue(seed=3)
    rough = _distorted(cells)
    genes = np.zeros(rows.size, np.int64)
    unchanged = regrow_whole_cells(rough, rows, cols, genes, pixel_size_um=PIXEL_UM)
    np.testing.assert_array_equal(unchanged, rough)
    redrawn = regrow_whole_cells(rough, rows, cols, genes, pixel_size_um=PIXEL_UM, image=image)
    np.testing.assert_array_equal(
        redrawn, regrow_from_nuclei(rough, image, rows, cols, pixel_size_um=PIXEL_UM))
    assert np.median(per_cell_best_iou(cells, redrawn)) > 0.9


def test_bad_input_names_the_problem():
    cells, _, image, rows, cols = _tissue(grid=2)
    with pytest.raises(InputError, match="differ in shape"):
        nuclei_within_cells(cells, image[:-1], 1.0)
    with pytest.raises(InputError, match=r"\(H, W\) or \(H, W, C\)"):
        nuclei_within_cells(cells, image[None, None], 1.0)
    with pytest.raises(InputError, match="pixel_size_um"):
        regrow_from_nuclei(cells, image, rows, cols, pixel_size_um=0.0)
    colour = np.repeat(image[..., None], 3, axis=2)  # (H, W, C): the channel mean
    np.testing.assert_array_equal(nuclei_within_cells(cells, colour, 1.0),
                                  nuclei_within_cells(cells, image, 1.0))


def test_training_relabel_redraws_sparse_crops_from_their_nuclei():
    """Between training rounds (relabel method "grow"), a sparse crop's merged cells are
    redrawn from the nuclei in the crop's image, as whole-image inference does."""
    from types import SimpleNamespace

    from GeneSegNet.training.relabel import grow_round_labels

    cells, nuclei, image, rows, cols = _tissue(seed=4)
    rough = _distorted(cells)
    xy = np.stack([cols, rows], axis=1).astype(np.int64)
    crop = SimpleNamespace(name="crop", labels=nuclei, spots_xy=xy,
                           spot_genes=np.full(len(xy), "Gene01"), pixel_size_um=PIXEL_UM,
                           image=image)
    out = grow_round_labels(rough, crop)
    assert np.median(per_cell_best_iou(cells, rough)) < 0.6
    assert np.median(per_cell_best_iou(cells, out)) > 0.9
    assert set(np.unique(out)) == set(np.unique(rough))
