"""The simulator's truth is self-consistent and has the properties the demo relies on."""

from __future__ import annotations

import numpy as np

from GeneSegNet.data.simulate import TissueConfig, simulate_tissue, write_simulated_dataset

SMALL = TissueConfig(height=160, width=200)


def test_truth_is_consistent():
    s = simulate_tissue(SMALL, rng=1)
    assert s.image.dtype == np.uint8 and s.image.shape == (160, 200)
    n_cells = int(s.cells.max())
    assert n_cells > 30 and set(np.unique(s.cells)) == set(range(n_cells + 1))
    # nuclei sit inside their own cells and cells extend well beyond them
    nuc = s.nuclei > 0
    assert np.all(s.cells[nuc] == s.nuclei[nuc])
    assert (s.cells > 0).sum() > 2.5 * nuc.sum()
    # every cell transcript lies in its true cell; noise transcripts exist
    cell_spots = s.spots[s.spots.cell_id > 0]
    rows, cols = cell_spots.y.astype(int), cell_spots.x.astype(int)
    np.testing.assert_array_equal(s.cells[rows, cols], cell_spots.cell_id)
    assert 0.05 < (s.spots.cell_id == 0).mean() < 0.2


def test_starting_labels_are_expanded_detectable_nuclei():
    s = simulate_tissue(SMALL, rng=2)
    labelled_nuclei = np.unique(s.nuclei[s.labels > 0])
    missing = set(np.unique(s.nuclei)) - set(labelled_nuclei) - {0}
    assert missing, "some dim nuclei must be missing from the starting labels"
    # dim nuclei are darker than detected ones in the image
    dim_mean = np.mean([s.image[s.nuclei == n].mean() for n in missing])
    bright_mean = s.image[(s.nuclei > 0) & (s.labels > 0)].mean()
    assert dim_mean < 0.6 * bright_mean
    # labels are smaller than the true cells (noisy, under-segmented starting point)
    assert (s.labels > 0).sum() < 0.75 * (s.cells > 0).sum()


def test_reproducible_and_written_layout(tmp_path):
    a, b = simulate_tissue(SMALL, rng=3), simulate_tissue(SMALL, rng=3)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.spots.equals(b.spots)
    out = write_simulated_dataset(tmp_path / "raw", n_samples=2, cfg=SMALL, seed=4)
    for rel in ("images/sample_00.png", "labels/sample_01.png", "spots/sample_00.csv",
                "truth/sample_01_cells.png", "truth/sample_00_spots.csv"):
        assert (out / rel).is_file(), rel
