"""Transcript mapping of out-of-core slides, read from the zarr store chunk by chunk,
equals the in-memory mapping row for row."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import zarr

from GeneSegNet.export.confidence import PROBABILITY_COLUMN
from GeneSegNet.mapping import cell_by_gene_counts, lookup_chunked, map_transcripts


def _labels_and_spots(seed=0, shape=(300, 250)):
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for k in range(1, 40):
        cy, cx = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= rng.integers(20, 200)] = k
    n = 3000
    x = rng.uniform(-5, shape[1] + 5, n)
    y = rng.uniform(-5, shape[0] + 5, n)
    # chunk edges, the image edge, invalid coordinates
    x[:6] = [63.999, 64.0, 0.0, shape[1] - 1e-9, shape[1], np.nan]
    y[:6] = [64.0, 63.5, 127.99, 128.0, 10.0, 3.0]
    genes = rng.choice(["a", "b", "c"], n)
    return labels, pd.DataFrame({"x": x, "y": y, "gene": genes})


def test_lookup_chunked_equals_fancy_indexing(tmp_path):
    labels, _ = _labels_and_spots()
    z = zarr.create_array(str(tmp_path / "l.zarr"), data=labels, chunks=(64, 48))
    rng = np.random.default_rng(1)
    rows, cols = rng.integers(0, 300, 5000), rng.integers(0, 250, 5000)
    np.testing.assert_array_equal(lookup_chunked(z, rows, cols), labels[rows, cols])
    assert lookup_chunked(z, rows[:0], cols[:0]).shape == (0,)


@pytest.mark.parametrize("out_of_bounds", ["background", "drop"])
def test_zarr_mapping_has_the_in_memory_rows(tmp_path, out_of_bounds):
    labels, spots = _labels_and_spots()
    z = zarr.create_array(str(tmp_path / "l.zarr"), data=labels, chunks=(64, 64))
    expected = map_transcripts(labels, spots, out_of_bounds)
    got = map_transcripts(z, spots, out_of_bounds)
    pd.testing.assert_frame_equal(got.table, expected.table)
    assert got.summary() == expected.summary()
    counts = cell_by_gene_counts(None, got.table["cell_id"].to_numpy(),
                                 got.table["gene"].to_numpy(), cells=np.arange(1, 40))
    pd.testing.assert_frame_equal(counts, cell_by_gene_counts(
        labels, expected.table["cell_id"].to_numpy(), expected.table["gene"].to_numpy()))


def test_store_mapping_equals_the_in_memory_outputs(tmp_path):
    """A finished store's chunked mapping files equal those the in-memory branch writes
    from the whole label image and logits (GeneSegNet.export.sample)."""
    from GeneSegNet.export.sample import SampleOutput, write_sample_outputs
    from GeneSegNet.slide.outofcore import blocks_serial, merge_blocks
    from GeneSegNet.slide.slides_ooc import write_mapping_out_of_core
    from tests.test_outofcore import MS, SHAPE, synthetic_store

    store, field = synthetic_store(tmp_path / "s.zarr")
    blocks_serial(store, MS)
    n_cells = merge_blocks(store, MS)
    labels = store.labels[:]
    _, spots = _labels_and_spots(seed=4, shape=SHAPE)
    write_sample_outputs(SampleOutput(labels, None, None, field[2].astype(np.float32)), spots,
                         tmp_path / "mem", "s", ("csv",))
    write_mapping_out_of_core(tmp_path / "ooc", "s", store, spots)
    mem = pd.read_csv(tmp_path / "mem" / "s.csv")
    ooc = pd.read_csv(tmp_path / "ooc" / "s.csv")
    columns = ["cell_id", "spotX", "spotY", "gene", PROBABILITY_COLUMN]
    assert list(ooc.columns) == columns
    assert n_cells > 20 and (ooc["cell_id"] > 0).sum() > 500
    assert ooc[PROBABILITY_COLUMN].notna().sum() > 2000
    pd.testing.assert_frame_equal(ooc, mem[columns])
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "ooc" / "s_cell_by_gene.csv"),
                                  pd.read_csv(tmp_path / "mem" / "s_cell_by_gene.csv"))


def test_script_maps_out_of_core_slides_like_in_memory_ones(tmp_path):
    """The inference script on a slide above --out_of_core_pixels (label png/mat skipped)
    writes the mapping rows of the in-memory run (an untrained network: the rows are
    background spots with their cell probabilities)."""
    from tests.tiny_runs import inference_runner, tiny_slides

    raw, model = tiny_slides(tmp_path)
    run = inference_runner(raw, model, "--confidence_threshold", "-2", "--mapping")

    assert run(tmp_path / "mem", "--out_of_core", "off") == 0
    assert run(tmp_path / "big", "--out_of_core", "on", "--out_of_core_pixels", "1000") == 0
    assert not (tmp_path / "big" / "label_sample_00.png").exists()
    mem = pd.read_csv(tmp_path / "mem" / "mapping" / "sample_00.csv")
    big = pd.read_csv(tmp_path / "big" / "mapping" / "sample_00.csv")
    columns = ["cell_id", "spotX", "spotY", "gene", PROBABILITY_COLUMN]
    assert list(big.columns) == columns and len(mem) > 100
    pd.testing.assert_frame_equal(big, mem[columns])
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "big" / "mapping" / "sample_00_cell_by_gene.csv"),
        pd.read_csv(tmp_path / "mem" / "mapping" / "sample_00_cell_by_gene.csv"))
