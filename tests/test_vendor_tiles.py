"""Vendor import at scale: the transcript sink's counts, the prefetching reader, and
starting labels built tile by tile (equal to the in-memory labels)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import tifffile

from GeneSegNet.data.nuclei import (
    PolygonSet,
    expand_labels_um,
    rasterize_polygons,
    segment_nuclei,
)
from GeneSegNet.errors import InputError
from GeneSegNet.vendors.tiled_labels import segment_tiled, write_polygon_labels
from GeneSegNet.vendors.transcripts import TranscriptSink, prefetched
from preprocess import import_bundle as import_script
from preprocess import make_starting_labels as labels_script
from tests import vendor_bundles as vb


# ------------------------------------------------------------------ transcripts
def test_sink_counts_and_splits(tmp_path: Path) -> None:
    """Ten hand-placed transcripts on a 10 x 20 px image, each with a known fate."""
    rows = [  # x, y, gene, qv -> fate
        (1.5, 1.5, "A", 30.0),                  # spot
        (19.9, 9.9, "B", 25.0),                 # spot (last pixel)
        (20.0, 5.0, "A", 30.0),                 # gene outside (x = W)
        (-0.1, 5.0, "B", 30.0),                 # gene outside
        (np.nan, 5.0, "A", 30.0),               # invalid
        (3.0, np.inf, "A", 30.0),               # invalid
        (2.0, 2.0, "A", 10.0),                  # low qv
        (np.nan, 2.0, "A", 5.0),                # low qv (qv is checked first)
        (4.0, 4.0, "NegControlProbe_7", 30.0),  # control inside
        (40.0, 4.0, "BLANK_1", 30.0),           # control outside (kept, counted)
    ]
    x, y, gene, qv = (list(c) for c in zip(*rows, strict=True))
    sink = TranscriptSink(tmp_path / "s.parquet", tmp_path / "c.parquet", (10, 20),
                          tmp_path / "tx.parquet", min_qv=20.0, max_outside_fraction=0.9)
    table = pa.table({"x": x, "y": y, "gene": gene, "qv": pa.array(qv, pa.float32()),
                      "k": list(range(10))})
    sink.add(table.slice(0, 5))
    sink.add(table.slice(5))  # a second batch with its own gene dictionary
    counts = sink.close(table.schema).to_dict()
    assert counts["read"] == 10 and counts["spots"] == 2
    assert counts["dropped_low_qv"] == 2 and counts["dropped_invalid"] == 2
    assert counts["dropped_outside_image"] == 2
    assert counts["controls"] == {"BLANK": 1, "NegControlProbe": 1}
    assert counts["controls_outside_image"] == 1
    spots = pd.read_parquet(tmp_path / "s.parquet")
    controls = pd.read_parquet(tmp_path / "c.parquet")
    assert spots["k"].tolist() == [0, 1] and spots["gene"].tolist() == ["A", "B"]
    assert controls["k"].tolist() == [8, 9]
    assert controls["category"].astype(str).tolist() == ["NegControlProbe", "BLANK"]


def test_sink_refuses_a_wrong_transform(tmp_path: Path) -> None:
    sink = TranscriptSink(tmp_path / "s.parquet", tmp_path / "c.parquet", (10, 10),
                          tmp_path / "tx.parquet", max_outside_fraction=0.05)
    sink.add(pa.table({"x": [50.0, 1.0], "y": [1.0, 1.0], "gene": ["A", "A"]}))
    with pytest.raises(InputError, match="outside"):
        sink.close()


def test_prefetched_order_errors_and_early_stop() -> None:
    assert list(prefetched(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise InputError("broken table")

    got = []
    with pytest.raises(InputError, match="broken table"):
        for item in prefetched(failing()):
            got.append(item)
    assert got == [1]
    gen = prefetched(iter(range(10**6)))
    assert next(gen) == 0
    gen.close()  # the producer thread stops instead of reading everything


# ------------------------------------------------------------------ polygons
def _random_cells(rng: np.random.Generator, shape: tuple[int, int], n: int) -> list:
    cells = []
    for k in range(n):
        cx, cy = rng.uniform(-5, shape[1] + 5), rng.uniform(-5, shape[0] + 5)
        m = int(rng.integers(3, 9))
        ang = np.sort(rng.uniform(0, 2 * np.pi, m))
        rad = rng.uniform(4, 14, m)
        ring = np.column_stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)])
        holes = []
        if k % 7 == 0:
            holes = [vb.square(cx, cy, 2.0)]
        exteriors = [ring] if k % 11 else [ring, vb.square(cx + 30, cy, 4.0)]
        cells.append((f"c{k}", exteriors, holes))
    return cells


@pytest.mark.parametrize("expand_um", [0.0, 1.5])
def test_polygons_in_strips_equal_in_memory(tmp_path: Path, rng: np.random.Generator,
                                            expand_um: float) -> None:
    shape = (1300, 700)  # strips of 512 rows: cells are cut at rows 512 and 1024
    cells = _random_cells(rng, shape, 900)
    whole, ids = rasterize_polygons(cells, shape)
    whole = expand_labels_um(whole, expand_um, 0.5)
    polys = PolygonSet.from_cells(cells)
    path = write_polygon_labels(tmp_path / "l.tif", polys, shape, expand_um, 0.5,
                                strip_rows=512)
    with tifffile.TiffFile(path) as tif:
        assert tif.pages[0].is_tiled
        tiled = tif.asarray()
    assert polys.ids == ids
    np.testing.assert_array_equal(tiled, whole)  # same ids: input order in both
    crossing = [i + 1 for i in range(len(ids)) if
                {512, 1024} & set(range(*_rows_of(whole, i + 1)))]
    assert len(crossing) > 20  # the strips did cut cells


def _rows_of(labels: np.ndarray, value: int) -> tuple[int, int]:
    rows = np.flatnonzero((labels == value).any(axis=1))
    return (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0)


def test_polygon_rectangle_pixel_centre_rule(tmp_path: Path) -> None:
    # x in (2.2, 5.6) -> cols 2..5; y in (509.7, 514.1) -> rows 510..513 (across row 512)
    ring = np.array([[2.2, 509.7], [5.6, 509.7], [5.6, 514.1], [2.2, 514.1]])
    polys = PolygonSet.from_cells([("a", [ring], [])])
    path = write_polygon_labels(tmp_path / "r.tif", polys, (1030, 8), strip_rows=512)
    rows, cols = np.nonzero(tifffile.imread(path))
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (510, 513, 2, 5)
    assert len(rows) == 16


# ------------------------------------------------------------------ segmentation
def _nuclei_image(rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """(1100, 1100) uint16 with bright discs of radius 7 px, many centred on the tile
    edges (rows/cols 512 and 1024); returns the image and the disc centres (row, col)."""
    size = 1100
    centres = []
    for r in range(40, size - 30, 59):
        for c in range(40, size - 30, 59):
            centres.append((r, c))
    for edge in (512, 1024):
        for t in range(60, size - 40, 97):
            centres += [(edge, t), (t, edge)]
    centres.append((512, 512))
    centres = [p for i, p in enumerate(centres)
               if all(np.hypot(p[0] - q[0], p[1] - q[1]) > 24 for q in centres[:i])]
    rr, cc = np.mgrid[0:size, 0:size]
    img = np.full((size, size), 300.0)
    for r, c in centres:
        img[(rr - r) ** 2 + (cc - c) ** 2 <= 49] = 2500.0
    img += rng.normal(0, 40, img.shape) + 100 * rr / size
    return np.clip(img, 0, 65535).astype(np.uint16), centres


def test_segmentation_by_tiles_equals_whole_image(tmp_path: Path,
                                                  rng: np.random.Generator) -> None:
    img, centres = _nuclei_image(rng)
    tifffile.imwrite(tmp_path / "img.tif", img, tile=(256, 256))
    whole = segment_nuclei(img, pixel_size_um=0.5, diameter_um=8.0)
    n = segment_tiled(tmp_path / "img.tif", tmp_path / "lab.tif", pixel_size_um=0.5,
                      diameter_um=8.0, tile=512)
    tiled = tifffile.imread(tmp_path / "lab.tif")
    # every disc found once (independent answer), in both
    at = np.array(centres)
    assert len(np.unique(whole[at[:, 0], at[:, 1]])) == len(centres) == whole.max()
    assert n == len(centres) and (tiled[at[:, 0], at[:, 1]] > 0).all()
    # the same labels up to renumbering: a one-to-one map of ids
    pairs = np.unique(np.stack([whole.ravel(), tiled.ravel().astype(np.int64)]), axis=1)
    assert pairs.shape[1] == len(np.unique(whole)) == len(np.unique(tiled))
    # discs on a tile edge: one id each, identical pixel sets, on both sides of the edge
    cut = [(r, c) for r, c in centres if r in (512, 1024) or c in (512, 1024)]
    assert len(cut) > 20
    for r, c in cut:
        mine, ref = tiled == tiled[r, c], whole == whole[r, c]
        assert np.array_equal(mine, ref)
        rows, cols = np.nonzero(mine)
        assert 0.7 * np.pi * 49 < len(rows) < 1.5 * np.pi * 49
        assert (r not in (512, 1024) or rows.min() < r <= rows.max())
        assert (c not in (512, 1024) or cols.min() < c <= cols.max())


def test_segmentation_by_tiles_with_expansion(tmp_path: Path,
                                              rng: np.random.Generator) -> None:
    img, _ = _nuclei_image(rng)
    tifffile.imwrite(tmp_path / "img.tif", img)
    whole = expand_labels_um(segment_nuclei(img, 0.5, 8.0), 2.0, 0.5)
    segment_tiled(tmp_path / "img.tif", tmp_path / "lab.tif", 0.5, 8.0, expand_um=2.0,
                  tile=512)
    tiled = tifffile.imread(tmp_path / "lab.tif")
    pairs = np.unique(np.stack([whole.ravel(), tiled.ravel().astype(np.int64)]), axis=1)
    assert pairs.shape[1] == len(np.unique(whole)) == len(np.unique(tiled))


# ------------------------------------------------------------------ command line
def _imported_xenium(tmp_path: Path) -> tuple[Path, Path]:
    """(a synthetic Xenium bundle, the raw folder it was imported into as sample "s")."""
    bundle = vb.xenium_bundle(tmp_path / "xb")
    base = tmp_path / "raw"
    assert import_script.main(["xenium", str(bundle), "--base_dir", str(base), "--sample",
                               "s"]) == 0
    return bundle, base


def test_make_starting_labels_tiled_equals_in_memory(tmp_path: Path) -> None:
    bundle, base = _imported_xenium(tmp_path)
    got = {}
    for mode in ("no", "yes"):
        assert labels_script.main(["--base_dir", str(base), "--sample", "s", "--bundle",
                                   str(bundle), "--expand_um", "2", "--tiled", mode,
                                   "--overwrite"]) == 0
        got[mode] = (tifffile.imread(base / "labels" / "s.tif"),
                     (base / "nuclei" / "s_ids.csv").read_text())
    np.testing.assert_array_equal(got["yes"][0], got["no"][0])
    assert got["yes"][1] == got["no"][1]
    assert set(np.unique(got["yes"][0])) == {0, 1, 2, 3}


def test_expansion_in_column_blocks_equals_whole(rng: np.random.Generator) -> None:
    from scipy import ndimage

    from GeneSegNet.vendors.tiled_labels import expand_in_blocks

    labels = np.zeros((60, 700), np.uint32)
    labels.ravel()[rng.integers(0, labels.size, 150)] = np.arange(1, 151)
    labels = ndimage.grey_dilation(labels, size=(3, 3))
    whole = expand_labels_um(labels, 2.0, 0.25)  # 8 px
    np.testing.assert_array_equal(expand_in_blocks(labels, 2.0, 0.25, 10, block=64), whole)


def test_make_starting_labels_segment_tiled(tmp_path: Path) -> None:
    bundle, base = _imported_xenium(tmp_path)
    got = {}
    for mode in ("no", "yes"):
        assert labels_script.main(["--base_dir", str(base), "--sample", "s", "--segment",
                                   "--tiled", mode, "--overwrite"]) == 0
        got[mode] = tifffile.imread(base / "labels" / "s.tif").astype(np.int64)
    assert sorted(p.name for p in (base / "labels").iterdir()) == ["s.tif"]  # no scratch
    pairs = np.unique(np.stack([got["no"].ravel(), got["yes"].ravel()]), axis=1)
    assert pairs.shape[1] == 4  # background + the bundle's 3 nuclei, one to one
    spots = pd.read_parquet(base / "spots" / "s.parquet")
    nuc = spots[spots["gene"] != "Gene9"]
    ids = got["yes"][np.floor(nuc["y"]).astype(int), np.floor(nuc["x"]).astype(int)]
    assert (ids > 0).all() and len(set(ids)) == 3
