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
