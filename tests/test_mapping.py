"""Transcript-to-cell mapping against brute-force references."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.io import savemat

from Analysis import generate_MappingRelationships as mapping_script
from GeneSegNet.io import write_label
from GeneSegNet.mapping import cell_by_gene_counts, lookup_cell_ids, map_transcripts


def _labels(rng, shape=(40, 50), n=12):
    labels = np.zeros(shape, np.int32)
    for cell in rng.choice(np.arange(1, 1000), size=n, replace=False):
        r, c = rng.integers(0, shape[0] - 6), rng.integers(0, shape[1] - 6)
        labels[r:r + rng.integers(2, 8), c:c + rng.integers(2, 8)] = cell
    return labels


def test_lookup_matches_a_loop_over_cell_ids(rng):
    labels = _labels(rng)
    x, y = rng.uniform(0, 50, 500), rng.uniform(0, 40, 500)
    ids, finite, inside = lookup_cell_ids(labels, x, y)
    expected = np.zeros(500, np.int64)
    for cell in np.unique(labels):  # upstream's per-id selection, done plainly
        for k in range(500):
            if labels[int(y[k]), int(x[k])] == cell:
                expected[k] = cell
    np.testing.assert_array_equal(ids, expected)
    assert finite.all() and inside.all()


def test_out_of_image_and_invalid_spots_are_never_wrapped():
    labels = np.zeros((10, 10), np.int32)
    labels[9, 9] = 7  # the pixel that negative indices would wrap to
    labels[0, 0] = 5
    spots = pd.DataFrame({"x": [-1.0, 0.5, 10.0, 9.99, np.nan, -0.2],
                          "y": [-1.0, 0.5, 3.0, 9.99, 1.0, 0.5], "gene": list("abcdef")})
    result = map_transcripts(labels, spots)
    by_gene = dict(zip(result.table.gene, result.table.cell_id, strict=True))
    assert by_gene == {"a": 0, "b": 5, "c": 0, "d": 7, "e": 0, "f": 0}
    assert (result.n_out_of_bounds, result.n_invalid, result.n_assigned,
            result.n_background) == (3, 1, 2, 0)
    dropped = map_transcripts(labels, spots, out_of_bounds="drop")
    assert sorted(dropped.table.gene) == ["b", "d"]


def test_table_sorted_by_cell_keeping_file_order(rng):
    labels = _labels(rng)
    spots = pd.DataFrame({"x": rng.uniform(0, 50, 300), "y": rng.uniform(0, 40, 300),
                          "gene": [f"g{i}" for i in range(300)]})
    table = map_transcripts(labels, spots).table
    assert list(table.columns) == ["cell_id", "spotX", "spotY", "gene"]
    assert table.cell_id.is_monotonic_increasing and table.cell_id.dtype.kind == "i"
    for _, group in table.groupby("cell_id"):
        order = [int(g[1:]) for g in group.gene]
        assert order == sorted(order)
    assert len(table) == 300


def test_cell_by_gene_counts_match_crosstab(rng):
    labels = _labels(rng)
    x, y = rng.uniform(0, 50, 400), rng.uniform(0, 40, 400)
    genes = rng.choice(["Actb", "Gad1", "Sst", "Vip"], 400)
    ids, _, _ = lookup_cell_ids(labels, x, y)
    counts = cell_by_gene_counts(labels, ids, genes)
    assert list(counts.index) == sorted(set(np.unique(labels)) - {0})  # empty cells included
    expected = pd.crosstab(ids[ids > 0], genes[ids > 0])
    for cell in counts.index:
        for gene in counts.columns:
            want = expected.loc[cell, gene] if cell in expected.index else 0
            assert counts.loc[cell, gene] == want
    assert counts.to_numpy().sum() == (ids > 0).sum()


def test_script_pairs_inference_labels_and_writes_outputs(tmp_path, rng):
    labels = _labels(rng)
    (tmp_path / "labels").mkdir()
    (tmp_path / "spots").mkdir()
    write_label(tmp_path / "labels" / "label_s1.png", labels)
    write_label(tmp_path / "labels" / "label_s1.mat", labels)  # as inference writes both
    savemat(tmp_path / "labels" / "s2.mat", {"CellMap": labels.astype(np.uint16)})
    for name in ("s1", "s2"):
        pd.DataFrame({"spotX": [1.5, 20.25, -3.0], "spotY": [2.0, 30.0, 1.0],
                      "gene": ["a", "b", "c"]}).to_csv(tmp_path / "spots" / f"{name}.csv",
                                                       index=False)
    code = mapping_script.main(["--label_dir", str(tmp_path / "labels"), "--spot_dir",
                                str(tmp_path / "spots"), "--save_dir", str(tmp_path / "out")])
    assert code == 0
    for name in ("s1", "s2"):
        table = pd.read_csv(tmp_path / "out" / f"{name}.csv")
        expected = {"a": labels[2, 1], "b": labels[30, 20], "c": 0}
        assert dict(zip(table.gene, table.cell_id, strict=True)) == expected
        assert set(table.spotX) == {1.5, 20.25, -3.0}
        counts = pd.read_csv(tmp_path / "out" / f"{name}_cell_by_gene.csv", index_col=0)
        assert len(counts) == len(np.unique(labels)) - 1


def test_script_reports_unpaired_and_missing(tmp_path, caplog):
    (tmp_path / "labels").mkdir()
    (tmp_path / "spots").mkdir()
    (tmp_path / "spots" / "s9.csv").write_text("x,y,gene\n1,1,a\n")
    code = mapping_script.main(["--label_dir", str(tmp_path / "labels"), "--spot_dir",
                                str(tmp_path / "spots"), "--save_dir", str(tmp_path / "out")])
    assert code == 2 and "s9.csv has no matching file in labels" in caplog.text
    assert not (tmp_path / "out").exists()


def test_key_runs_against_a_python_loop():
    from GeneSegNet.mapping import key_runs

    keys = np.sort(np.random.default_rng(0).integers(0, 20, 200))
    want, start = [], 0
    for i in range(1, len(keys) + 1):
        if i == len(keys) or keys[i] != keys[start]:
            want.append((int(keys[start]), start, i))
            start = i
    assert list(key_runs(keys)) == want
    assert list(key_runs(np.zeros(0, np.int64))) == []
    assert list(key_runs(np.array([7]))) == [(7, 0, 1)]
