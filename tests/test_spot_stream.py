"""The streamed spot side of out-of-core runs (spill, disk index, density scale, mapping)
equals the in-memory functions on the same data."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from GeneSegNet.data.transcripts import slide_density_scale, slide_density_scale_stream
from GeneSegNet.errors import InputError
from GeneSegNet.io.spot_stream import (
    GeneVocabulary,
    SpotSpill,
    iter_spot_batches,
    spill_spots,
)
from GeneSegNet.io.spots import read_spots, spot_pixels
from GeneSegNet.slide.disk_spots import DiskSpotIndex, inside_pixels
from GeneSegNet.slide.windows import SpotIndex

LAYOUTS = {"upstream": ("spotX", "spotY", "gene"),
           "xenium": ("x_location", "y_location", "feature_name"),
           "cosmx": ("x_global_px", "y_global_px", "target"),
           "positional": ("a", "b", "c")}


def _table(n=2000, shape=(300, 250), seed=0, columns=("spotX", "spotY", "gene")):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-5, shape[1] + 5, n)
    y = rng.uniform(-5, shape[0] + 5, n)
    x[:4], y[:4] = [np.nan, np.inf, 3.0, 0.0], [1.0, 2.0, -np.inf, 0.0]
    genes = rng.choice(["Actb", "Gapdh", "Cd3e", "odd,name"], n).astype(object)
    return pd.DataFrame({columns[0]: x, columns[1]: y, columns[2]: genes})


def _write(frame, path):
    if path.suffix == ".parquet":
        frame.to_parquet(path, row_group_size=700)  # several row groups
    else:
        frame.to_csv(path, index=False)
    return path


def _streamed(path, scale, batch_rows=333):
    vocab = GeneVocabulary()
    batches = list(iter_spot_batches(path, scale, batch_rows, vocab))
    x = np.concatenate([b.x for b in batches])
    y = np.concatenate([b.y for b in batches])
    gene = vocab.as_array()[np.concatenate([b.gene for b in batches])]
    return x, y, gene, len(batches)


@pytest.mark.parametrize("suffix", [".csv", ".csv.gz", ".parquet"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_batches_equal_read_spots(tmp_path, suffix, layout):
    frame = _table(columns=LAYOUTS[layout])
    frame.loc[7, LAYOUTS[layout][2]] = None  # a missing gene name
    path = _write(frame, tmp_path / f"spots{suffix}")
    expected = read_spots(path, scale=1.7, strict=False)
    x, y, gene, n_batches = _streamed(path, 1.7)
    assert n_batches > 3
    np.testing.assert_array_equal(x, expected["x"].to_numpy())
    np.testing.assert_array_equal(y, expected["y"].to_numpy())
    assert list(gene) == list(expected["gene"])


def test_non_numeric_coordinates_and_no_gene_column(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("x,y\n1.5,2\nabc,3\n,4\n5,6\n")
    expected = read_spots(path, strict=False)
    x, y, gene, _ = _streamed(path, 1.0, batch_rows=2)
    np.testing.assert_array_equal(x, expected["x"].to_numpy())
    np.testing.assert_array_equal(y, expected["y"].to_numpy())
    assert list(gene) == list(expected["gene"]) == ["NA"] * 4


def test_numeric_looking_gene_names_are_read_as_written(tmp_path):
    """Gene names are labels: "1.50", "007" and "1e3" must not turn into 1.5, 7, 1000.0,
    in the whole-file read or in any batch (batches of 2 rows: some all numeric-looking)."""
    path = tmp_path / "s.csv"
    path.write_text("spotX,spotY,gene\n1,2,1.50\n3,4,007\n5,6,1e3\n7,8,Actb\n9,9,1.50\n")
    written = ["1.50", "007", "1e3", "Actb", "1.50"]
    assert list(read_spots(path)["gene"]) == written
    assert list(_streamed(path, 1.0, batch_rows=2)[2]) == written


def test_header_only_file_gives_no_spots(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text("spotX,spotY,gene\n")
    assert len(read_spots(path)) == 0
    assert sum(len(b.x) for b in iter_spot_batches(path)) == 0
    assert len(spill_spots(path, tmp_path / "spill")) == 0


@pytest.mark.parametrize("content", [None, b"", b"onlyone\n1\n", b"PAR1 not really parquet"])
def test_bad_files_raise_input_error_naming_the_file(tmp_path, content):
    path = tmp_path / ("bad.parquet" if content and content.startswith(b"PAR1") else "bad.csv")
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError) as err:
        list(iter_spot_batches(path))
    assert err.value.path == path and str(path) in str(err.value)
    with pytest.raises(InputError):
        spill_spots(path, tmp_path / "spill")


def test_spill_round_trip_and_reuse(tmp_path):
    path = _write(_table(), tmp_path / "s.parquet")
    spill = spill_spots(path, tmp_path / "spill", scale=2.0, batch_rows=500)
    expected = read_spots(path, scale=2.0, strict=False)
    got = [spill.read(0, 700), spill.read(700, 5000)]
    np.testing.assert_array_equal(np.concatenate([b.x for b in got]), expected["x"].to_numpy())
    names = spill.vocabulary.as_array()[np.concatenate([b.gene for b in got])]
    assert list(names) == list(expected["gene"])
    stamp = (tmp_path / "spill" / "x.f8").stat().st_mtime_ns
    assert len(spill_spots(path, tmp_path / "spill", scale=2.0)) == len(expected)
    assert (tmp_path / "spill" / "x.f8").stat().st_mtime_ns == stamp  # reused
    again = spill_spots(path, tmp_path / "spill", scale=1.0)  # other scale: rebuilt
    np.testing.assert_array_equal(again.read(0, 10).x, expected["x"].to_numpy()[:10] / 2.0)


def _spill_and_memory(tmp_path, shape, n=20000, seed=3):
    rng = np.random.default_rng(seed)
    frame = _table(n=n, shape=shape, seed=seed)
    frame.loc[: n // 3, "spotX"] = rng.uniform(10, 60, n // 3 + 1)  # a dense patch
    path = _write(frame, tmp_path / "s.parquet")
    spill = spill_spots(path, tmp_path / "spill", batch_rows=1500)
    table = read_spots(path, strict=False)
    rows, cols, inside = spot_pixels(table["x"].to_numpy(), table["y"].to_numpy(), shape)
    return spill, table, rows, cols, inside


@pytest.mark.parametrize("bin_size", [16, 64, 256])
def test_disk_index_answers_like_the_memory_index(tmp_path, bin_size):
    shape = (300, 250)
    spill, table, rows, cols, inside = _spill_and_memory(tmp_path, shape)
    genes = ["Gapdh", "Actb", "Zz"]
    encode = pd.Index(genes).get_indexer
    codes = encode(table["gene"].to_numpy())[inside]
    memory = SpotIndex(rows, cols, shape, bin_size, codes=codes)
    disk = DiskSpotIndex.build(spill, shape, tmp_path / "index.rec", bin_size=bin_size,
                               code_table=encode(spill.vocabulary.as_array()), batch_rows=777)
    assert len(disk) == len(memory) == inside.sum() and disk.shape == memory.shape
    rng = np.random.default_rng(0)
    boxes = [(0, 300, 0, 250), (-50, 400, -50, 400), (299, 300, 249, 250), (10, 10, 0, 5),
             (-20, 0, 0, 250), (300, 320, 0, 250)]
    for _ in range(200):
        r0, c0 = rng.integers(-40, 300), rng.integers(-40, 250)
        boxes.append((r0, r0 + rng.integers(1, 120), c0, c0 + rng.integers(1, 120)))
    for box in boxes:
        for got, want in zip(disk.query_codes(*box), memory.query_codes(*box), strict=True):
            np.testing.assert_array_equal(got, want)
            assert got.dtype == want.dtype == np.int32
        np.testing.assert_array_equal(disk.query(*box)[0], memory.query(*box)[0])


@pytest.mark.parametrize("max_spots", [50, 100000])
@pytest.mark.parametrize("small_budgets", [False, True])
def test_streamed_density_scale_equals_the_memory_value(tmp_path, monkeypatch, max_spots,
                                                        small_budgets):
    if small_budgets:  # several sample groups and pair chunks
        monkeypatch.setattr("GeneSegNet.data.transcripts.NEAR_BUDGET", 700)
        monkeypatch.setattr("GeneSegNet.data.transcripts.PAIR_BUDGET", 900)
    shape = (300, 250)
    spill, _, rows, cols, _ = _spill_and_memory(tmp_path, shape)
    expected = slide_density_scale(rows, cols, pixel_size_um=0.5, max_spots=max_spots)

    def passes():
        return ((r, c) for r, c, _ in inside_pixels(spill, shape, batch_rows=999))

    assert slide_density_scale_stream(passes, pixel_size_um=0.5,
                                      max_spots=max_spots) == expected


def _finished_store(tmp_path):
    from GeneSegNet.slide.outofcore import blocks_serial, merge_blocks
    from tests.test_outofcore import MS, SHAPE, synthetic_store

    store, field = synthetic_store(tmp_path / "s.zarr")
    blocks_serial(store, MS)
    n_cells = merge_blocks(store, MS)
    return store, field, SHAPE, n_cells


@pytest.mark.parametrize("out_of_bounds", ["background", "drop"])
@pytest.mark.parametrize("source", ["spill", "frame"])
def test_streamed_mapping_files_equal_the_in_memory_ones(tmp_path, out_of_bounds, source):
    from GeneSegNet.export.confidence import PROBABILITY_COLUMN
    from GeneSegNet.mapping import cell_by_gene_counts, map_transcripts
    from GeneSegNet.slide.slides_ooc import write_mapping_out_of_core

    store, field, shape, n_cells = _finished_store(tmp_path)
    path = _write(_table(n=5000, shape=shape, seed=5), tmp_path / "spots.csv")
    table = read_spots(path, strict=False)
    labels = store.labels[:]
    mapped = map_transcripts(labels, table, out_of_bounds).table
    rows, cols, inside = spot_pixels(mapped["spotX"], mapped["spotY"], shape)
    prob = np.full(len(mapped), np.nan, np.float32)
    logit = field[2].astype(np.float32)[rows, cols]
    prob[inside] = 1.0 / (1.0 + np.exp(-np.clip(logit, -80.0, 80.0)))
    mapped[PROBABILITY_COLUMN] = prob
    mapped.to_csv(tmp_path / "want.csv", index=False, float_format="%.10g")
    cell_by_gene_counts(None, mapped["cell_id"].to_numpy(), mapped["gene"].to_numpy(),
                        cells=np.arange(1, n_cells + 1)).to_csv(tmp_path / "want_cbg.csv")
    assert n_cells > 20 and (mapped["cell_id"] > 0).sum() > 500

    spots = spill_spots(path, tmp_path / "spill", batch_rows=700) if source == "spill" \
        else table
    out = write_mapping_out_of_core(tmp_path / "got", "s", store, spots, out_of_bounds,
                                    batch_rows=900, bucket_rows=600)
    assert (tmp_path / "got" / "s.csv").read_bytes() == (tmp_path / "want.csv").read_bytes()
    assert out[1].read_bytes() == (tmp_path / "want_cbg.csv").read_bytes()
    assert sorted(p.name for p in (tmp_path / "got").iterdir()) == ["s.csv",
                                                                    "s_cell_by_gene.csv"]


def test_spots_on_disk_equal_the_in_memory_inputs(tmp_path):
    """The out-of-core run's spot inputs (index, gene codes, density scale) for a slide
    above ``in_memory_outputs`` equal those of the in-memory loading."""
    from GeneSegNet.data.gene_embedding import GeneEmbedding
    from GeneSegNet.data.model_input import ModelInput
    from GeneSegNet.data.transcripts import TranscriptInput
    from GeneSegNet.slide.files import SlideSample
    from GeneSegNet.slide.pipeline import slide_transcripts
    from GeneSegNet.slide.slides_ooc import load_spots, spots_on_disk
    from GeneSegNet.slide.store import SlideStore

    shape = (300, 250)
    path = _write(_table(n=8000, shape=shape, seed=9), tmp_path / "spots.parquet")
    embedding = GeneEmbedding(("Actb", "Cd3e", "Gapdh"), np.eye(3)[:, :2])
    model_input = ModelInput(TranscriptInput(mode="density", n_gene_channels=2), embedding)
    sample = SlideSample("s", tmp_path / "s.tif", path)
    store = SlideStore(tmp_path / "label_s.zarr", shape, {"t": 1}, "float16", chunk=64)
    index, transcripts, spill = spots_on_disk(sample, store, 1.3, model_input, 0.5)
    rows, cols, codes, _ = load_spots(sample, shape, 1.3, embedding.encode)
    memory = SpotIndex(rows, cols, shape, codes=codes)
    assert isinstance(index, DiskSpotIndex) and isinstance(spill, SpotSpill)
    for got, want in zip(index.query_codes(-5, 400, -5, 400),
                         memory.query_codes(-5, 400, -5, 400), strict=True):
        np.testing.assert_array_equal(got, want)
    assert transcripts == slide_transcripts(rows, cols, model_input, 0.5)
    assert (store.path / "spots" / "gene.i4").is_file()
    no_spots = spots_on_disk(SlideSample("n", sample.image, None), store, 1.3, model_input, 0.5)
    empty = np.zeros(0, np.int32)
    assert len(no_spots[0]) == 0 and no_spots[2] is None
    assert no_spots[1] == slide_transcripts(empty, empty, model_input, 0.5)


def test_out_of_core_run_streams_spots_and_matches_the_in_memory_run(tmp_path):
    """An out-of-core run of a slide above ``in_memory_outputs`` (spots spilled, disk
    index) writes the heatmap and mapping files of the in-memory run."""
    import tifffile

    from tests.tiny_runs import inference_runner, tiny_slides

    raw, model = tiny_slides(tmp_path, height=180, width=260, seed=5, model_seed=1)
    run = inference_runner(raw, model, "--confidence_threshold", "-2", "--mapping")

    assert run(tmp_path / "mem", "--out_of_core", "off") == 0
    assert run(tmp_path / "big", "--out_of_core", "on", "--out_of_core_pixels", "1000") == 0
    store = tmp_path / "big" / "label_sample_00.zarr"
    assert (store / "spots" / "x.f8").is_file() and (store / "spot_index.rec").is_file()
    heat = "HeatMap/sample_00_gaumap.tif"
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "big" / heat),
                                  tifffile.imread(tmp_path / "mem" / heat))
    mem = pd.read_csv(tmp_path / "mem" / "mapping" / "sample_00.csv")
    big = pd.read_csv(tmp_path / "big" / "mapping" / "sample_00.csv")
    pd.testing.assert_frame_equal(big, mem[list(big.columns)])
    pd.testing.assert_frame_equal(
        pd.read_csv(tmp_path / "big" / "mapping" / "sample_00_cell_by_gene.csv"),
        pd.read_csv(tmp_path / "mem" / "mapping" / "sample_00_cell_by_gene.csv"))
