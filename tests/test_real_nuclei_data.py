"""The real nuclei image used by bench/real_nuclei_check.py (shipped in the stardist wheel)
and the seeded label degradation of that check. Skipped without stardist."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

if importlib.util.find_spec("stardist") is None:
    pytest.skip("stardist (the real nuclei image) is not installed", allow_module_level=True)

BENCH = Path(__file__).resolve().parents[1] / "bench" / "real_nuclei_check.py"


@pytest.fixture(scope="module")
def check():
    spec = importlib.util.spec_from_file_location("real_nuclei_check", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data(check):
    try:
        return check.load_real_nuclei()
    except FileNotFoundError as error:
        pytest.skip(f"stardist example data missing: {error}")


def test_image_and_mask(data) -> None:
    image, mask = data
    assert image.shape == mask.shape == (512, 512)
    assert image.ndim == 2 and np.issubdtype(image.dtype, np.integer)
    assert 0 < image.max() <= 255  # 8-bit values stored as uint16
    assert mask.dtype == np.int64 and mask.min() == 0
    n = len(np.unique(mask)) - 1
    assert 120 <= n <= 130 and mask.max() == n  # ~125 nuclei, ids 1..n


def test_degradation_is_seeded_and_moderate(check, data) -> None:
    from GeneSegNet.evaluation.metrics import match

    _, mask = data
    first = check.degrade_labels(mask, seed=0)
    assert np.array_equal(first, check.degrade_labels(mask, seed=0))
    assert not np.array_equal(first, check.degrade_labels(mask, seed=1))
    ap = match(mask, first, thresholds=(0.5,)).ap[0.5]
    assert 0.3 < ap < 1.0
    n_true, n_deg = mask.max(), first.max()
    assert 0.6 * n_true < n_deg < n_true  # ~20 % dropped, a few merged, a few false blobs


def test_quadrants_tile_the_image(check, data) -> None:
    image, mask = data
    parts = [check.quadrant(image, q) for q in range(4)]
    assert all(p.shape == (256, 256) for p in parts)
    whole = np.block([[parts[0], parts[1]], [parts[2], parts[3]]])
    assert np.array_equal(whole, image)
    q = check.quadrant_labels(mask, 3)
    assert q.max() == len(np.unique(q)) - 1


def test_cells_are_redrawn_from_real_nuclei(data) -> None:
    """Real nuclear texture: cells are the true nuclei grown by 4 µm (at an assumed 0.325
    µm/px) with ISS-like transcripts in them; rough cells (1.5 µm too wide, shifted by
    4 px) are redrawn from the nuclei the stain shows, grown by the pooled reach."""
    from skimage.segmentation import expand_labels

    from GeneSegNet.evaluation.metrics import per_cell_best_iou
    from GeneSegNet.growth.nuclear import nuclei_within_cells, regrow_from_nuclei

    image, mask = data
    pixel_um, rng = 0.325, np.random.default_rng(0)
    cells = expand_labels(mask, 4.0 / pixel_um)
    inside = np.flatnonzero(cells.ravel() > 0)
    pix = rng.choice(inside, rng.poisson(0.1 * inside.size * pixel_um ** 2))
    n_bg = rng.poisson(0.005 * cells.size * pixel_um ** 2)
    rows = np.concatenate([pix // cells.shape[1] + rng.uniform(0, 1, pix.size),
                           rng.uniform(0, cells.shape[0], n_bg)])
    cols = np.concatenate([pix % cells.shape[1] + rng.uniform(0, 1, pix.size),
                           rng.uniform(0, cells.shape[1], n_bg)])
    rough = np.roll(expand_labels(cells, 1.5 / pixel_um), (4, 4), (0, 1))
    nuclei = nuclei_within_cells(rough, image, 0.3 / pixel_um)
    assert np.median(per_cell_best_iou(mask, nuclei)) > 0.7
    redrawn = regrow_from_nuclei(rough, image, rows, cols, pixel_size_um=pixel_um)
    before = np.median(per_cell_best_iou(cells, rough))
    after = np.median(per_cell_best_iou(cells, redrawn))
    assert after > 0.8 and after > before + 0.15
