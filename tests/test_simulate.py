"""The simulator's truth is self-consistent and as hard as its presets promise.

Quantities are measured here from the returned arrays (areas, spot counts, image
intensities), independently of the simulator's own summary.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from GeneSegNet.commands.simulate import main as simulate_main
from GeneSegNet.data.sim_genes import SPOT_DECIMALS, _inside
from GeneSegNet.data.simulate import (
    TissueConfig,
    marker_genes,
    preset_config,
    sample_statistics,
    simulate_tissue,
    write_simulated_dataset,
)
from GeneSegNet.errors import InputError
from GeneSegNet.io import read_spots
from GeneSegNet.io.metadata import metadata_path, read_metadata

SMALL = TissueConfig(height=160, width=200)


@pytest.fixture(scope="module")
def dense():
    """Dense (Xenium-like) samples at 512 px (~109 µm square, ~50 cells each)."""
    cfg = preset_config("dense", height=512, width=512)
    return cfg, [simulate_tissue(cfg, rng=seed) for seed in range(3)]


def _equivalent_diameters_um(labels: np.ndarray, px_um: float) -> np.ndarray:
    areas = np.bincount(labels.ravel())[1:]
    return 2.0 * np.sqrt(areas[areas > 0] / np.pi) * px_um


def test_truth_is_consistent():
    s = simulate_tissue(SMALL, rng=1)
    assert s.image.dtype == np.uint8 and s.image.shape == (160, 200)
    n_cells = int(s.cells.max())
    assert n_cells > 30 and set(np.unique(s.cells)) == set(range(n_cells + 1))
    # every cell has a nucleus, nuclei sit inside their own cells, cells extend beyond them
    nuc = s.nuclei > 0
    assert set(np.unique(s.nuclei)) == set(range(n_cells + 1))
    assert np.all(s.cells[nuc] == s.nuclei[nuc])
    assert (s.cells > 0).sum() > 2.5 * nuc.sum()
    # every cell transcript lies in its true cell; noise transcripts exist
    cell_spots = s.spots[s.spots.cell_id > 0]
    rows, cols = cell_spots.y.astype(int), cell_spots.x.astype(int)
    np.testing.assert_array_equal(s.cells[rows, cols], cell_spots.cell_id)
    assert 0.05 < (s.spots.cell_id == 0).mean() < 0.2
    assert len(s.cell_types) == len(s.dim) == n_cells + 1


def test_dense_cells_are_about_twice_their_nuclei(dense):
    cfg, samples = dense
    assert cfg.pixel_size_um == 0.2125
    cell_d = np.concatenate([_equivalent_diameters_um(s.cells, 0.2125) for s in samples])
    nuc_d = np.concatenate([_equivalent_diameters_um(s.nuclei, 0.2125) for s in samples])
    assert 6.0 < nuc_d.mean() < 10.0
    assert 1.7 <= cell_d.mean() / nuc_d.mean() <= 2.4
    stats = sample_statistics(samples[0])
    assert 1.7 <= stats["cell_nucleus_ratio"] <= 2.4


@pytest.mark.parametrize("preset, height", [("dense", 512), ("sparse", 512)])
def test_transcript_density_inside_cells(preset, height, dense):
    cfg = preset_config(preset, height=height, width=height)
    samples = dense[1] if preset == "dense" else [simulate_tissue(cfg, rng=s) for s in range(2)]
    area_um2 = sum(float((s.cells > 0).sum()) for s in samples) * cfg.pixel_size_um ** 2
    in_cells = sum(int((s.spots.cell_id > 0).sum()) for s in samples)
    assert in_cells / area_um2 == pytest.approx(cfg.transcripts_per_um2, rel=0.2)
    background = sum(int((s.spots.cell_id == 0).sum()) for s in samples)
    total = sum(len(s.spots) for s in samples)
    assert background / total == pytest.approx(0.1, abs=0.02)


def test_dense_dim_nuclei_are_missing_from_the_starting_labels(dense):
    cfg, samples = dense
    n_cells = sum(int(s.cells.max()) for s in samples)
    n_dim = sum(int(s.dim.sum()) for s in samples)
    assert n_cells > 100
    assert 0.08 <= n_dim / n_cells <= 0.22
    for s in samples:
        area = np.bincount(s.nuclei.ravel(), minlength=len(s.dim))
        same = np.bincount(s.nuclei.ravel(), weights=(s.labels == s.nuclei).ravel(),
                           minlength=len(s.dim))
        covered = np.bincount(s.nuclei.ravel(), weights=(s.labels > 0).ravel(),
                              minlength=len(s.dim))
        ids = np.arange(1, len(s.dim))
        dim, bright = ids[s.dim[1:]], ids[~s.dim[1:]]
        # detectable nuclei are labelled with their own id, dim ones (nearly) not at all
        assert np.all(same[bright] == area[bright])
        assert np.all(covered[dim] <= 0.05 * area[dim])
        # labels stay within a few px of a detected nucleus: most cell area is outside them
        grown = ndimage.binary_dilation(np.isin(s.nuclei, bright), iterations=3)
        assert not np.any((s.labels > 0) & ~grown)
        assert (s.labels > 0).sum() < 0.4 * (s.cells > 0).sum()
        # dim nuclei are faint (relative to the local brightness field) but visible
        image = s.image.astype(np.float64)
        outside = image[s.cells == 0]
        background, noise = np.median(outside), outside.std()
        mean = np.array([image[s.nuclei == i].mean() for i in ids])
        field = np.array([s.field[s.nuclei == i].mean() for i in ids])
        assert np.all(mean[dim - 1] > background + 3 * noise)
        relative = (mean - background) / field
        assert relative[dim - 1].mean() < 0.5 * relative[bright - 1].mean()


def test_dense_brightness_field_spans_a_factor_of_ten(dense):
    cfg, samples = dense
    for s in samples:
        assert s.field.max() / s.field.min() == pytest.approx(10.0, rel=1e-4)
        image = s.image.astype(np.float64)
        background = np.median(image[s.cells == 0])
        ids = np.arange(1, len(s.dim))[~s.dim[1:]]
        signal = np.array([image[s.nuclei == i].mean() - background for i in ids])
        field = np.array([s.field[s.nuclei == i].mean() for i in ids])
        order = np.argsort(field)
        assert signal[order[-5:]].mean() / signal[order[:5]].mean() >= 5.0


def test_dense_cell_types_have_distinct_profiles(dense):
    cfg, samples = dense
    spots = [s.spots.assign(cell_type=s.cell_types[s.spots.cell_id]) for s in samples]
    genes = sorted(set().union(*(set(t.gene) for t in spots)))
    assert cfg.n_cell_types == 6 and 60 <= cfg.n_genes <= 120
    counts = np.zeros((cfg.n_cell_types, len(genes)))
    for table in spots:
        table = table[table.cell_id > 0]
        index = np.searchsorted(genes, table.gene)
        np.add.at(counts, (table.cell_type.to_numpy(), index), 1)
    freq = counts / counts.sum(axis=1, keepdims=True)
    housekeeping = np.arange(cfg.n_housekeeping)
    for t in range(cfg.n_cell_types):
        ranked = [g for g in np.argsort(-freq[t]) if g not in housekeeping]
        assert set(ranked[: cfg.markers_per_type]) == set(marker_genes(cfg, t))
    unit = freq / np.linalg.norm(freq, axis=1, keepdims=True)
    cosine = unit @ unit.T
    assert np.max(cosine[~np.eye(cfg.n_cell_types, dtype=bool)]) < 0.6
    # cells with enough transcripts are typed correctly by the nearest profile
    table = spots[0][spots[0].cell_id > 0]
    per_cell = np.zeros((len(samples[0].cell_types), len(genes)))
    np.add.at(per_cell, (table.cell_id.to_numpy(), np.searchsorted(genes, table.gene)), 1)
    rich = np.nonzero(per_cell.sum(axis=1) >= 50)[0]
    guess = np.argmax(per_cell[rich] @ np.log(freq.T + 1e-9), axis=1)
    assert np.mean(guess == samples[0].cell_types[rich]) > 0.95


def test_coordinates_are_truncated_strictly_inside():
    values = np.array([0.0, 0.004, 5.0, 5.999, 511.999999, np.nextafter(512.0, 0.0)])
    out = _inside(values, 512)
    assert np.all(out < 512) and np.all(out >= 0)
    np.testing.assert_array_equal(np.floor(out), np.floor(values))
    np.testing.assert_array_equal(out, np.round(out, SPOT_DECIMALS))


@pytest.mark.parametrize("size", [512, 640])
@pytest.mark.parametrize("seed", [0, 1])
def test_every_spot_lies_inside_the_image(size, seed):
    s = simulate_tissue(TissueConfig(height=size, width=size), rng=seed)
    assert np.all((s.spots.x >= 0) & (s.spots.x < size))
    assert np.all((s.spots.y >= 0) & (s.spots.y < size))


@pytest.mark.parametrize("preset", ["dense", "sparse"])
def test_every_spot_lies_inside_the_image_presets(preset):
    cfg = preset_config(preset, height=200, width=330)
    s = simulate_tissue(cfg, rng=1)
    assert np.all((s.spots.x >= 0) & (s.spots.x < 330))
    assert np.all((s.spots.y >= 0) & (s.spots.y < 200))


def test_reproducible_with_a_seed():
    cfg = preset_config("dense", height=256, width=256)
    a, b, c = (simulate_tissue(cfg, rng=r) for r in (3, 3, 4))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.spots.equals(b.spots)
    assert not np.array_equal(a.image, c.image)


def test_written_layout_and_metadata(tmp_path):
    out = write_simulated_dataset(tmp_path / "raw", n_samples=2, cfg=SMALL, seed=4)
    for rel in ("images/sample_00.png", "labels/sample_01.png", "spots/sample_00.csv",
                "truth/sample_01_cells.png", "truth/sample_00_spots.csv",
                "truth/sample_00_cell_types.csv", "metadata/sample_01.json"):
        assert (out / rel).is_file(), rel
    assert read_metadata(metadata_path(out, "sample_00")).pixel_size_um == SMALL.pixel_size_um
    spots = read_spots(out / "spots" / "sample_01.csv")
    assert spots["x"].max() < 200 and spots["y"].max() < 160


def test_command_dense_preset_writes_its_pixel_size(tmp_path, caplog):
    caplog.set_level("INFO")
    code = simulate_main(["--out_dir", str(tmp_path / "raw"), "--n_samples", "1",
                          "--preset", "dense", "--height", "192", "--width", "160"])
    assert code == 0
    meta = read_metadata(metadata_path(tmp_path / "raw", "sample_00"))
    assert meta.pixel_size_um == 0.2125
    assert "cell diameter" in caplog.text and "µm" in caplog.text
    with pytest.raises(SystemExit) as bad:  # refused by the parser
        simulate_main(["--out_dir", str(tmp_path / "bad"), "--pixel_size", "-1"])
    assert bad.value.code == 2 and not (tmp_path / "bad").exists()


def test_bad_configuration_names_the_option():
    with pytest.raises(InputError, match="pixel_size_um"):
        TissueConfig(pixel_size_um=0)
    with pytest.raises(InputError, match="n_genes"):
        preset_config("dense", n_genes=20)
    with pytest.raises(InputError, match="preset"):
        preset_config("xenium")
