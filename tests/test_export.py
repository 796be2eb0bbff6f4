"""Export formats: confidence columns, polygons, GeoJSON/GeoParquet, h5ad, Xenium inputs,
SpatialData and QC, each read back with the library that reads the format."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import tifffile

from GeneSegNet.errors import InputError
from GeneSegNet.export import parse_outputs
from GeneSegNet.export.confidence import transcript_confidence
from GeneSegNet.export.controls import control_mask
from GeneSegNet.export.polygons import cell_polygons
from GeneSegNet.export.sample import SampleOutput, write_sample_outputs

ODD_GENES = ["Actb", "Gene,with,commas", 'Quote"d', "Gène-ü", "NegControlProbe_7", "BLANK_0001"]


def _labels() -> np.ndarray:
    lab = np.zeros((60, 80), np.int32)
    yy, xx = np.mgrid[:60, :80]
    lab[(yy - 20) ** 2 + (xx - 20) ** 2 <= 81] = 3
    lab[10:30, 35:55] = 7
    lab[40:55, 10:70] = 9
    lab[45:50, 30:35] = 0  # a hole
    lab[2, 78] = 11  # single pixel cell
    lab[57, 2] = 12  # diagonal pair: two components touching at a corner
    lab[58, 3] = 12
    return lab


def _spots(n: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    spots = pd.DataFrame({"x": rng.uniform(0, 80, n), "y": rng.uniform(0, 60, n),
                          "gene": rng.choice(ODD_GENES, n)})
    spots.loc[0, ["x", "y"]] = [-3.0, 5.0]  # outside the image
    spots.loc[1, ["x", "y"]] = [np.nan, 5.0]
    return spots


def _rasterise(polygon, shape) -> np.ndarray:
    import shapely

    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return shapely.contains_xy(polygon, xx.ravel() + 0.5, yy.ravel() + 0.5).reshape(shape)


def test_parse_outputs():
    assert parse_outputs(None) == ("csv",)
    assert parse_outputs("qc, h5ad,csv,h5ad") == ("csv", "h5ad", "qc")
    with pytest.raises(InputError, match="--outputs"):
        parse_outputs("csv,shp")


def test_control_names():
    names = np.array(["NegControlProbe_1", "NegControlCodeword_0502", "UnassignedCodeword_3",
                      "BLANK_0001", "Blank-12", "NegPrb5", "FalseCode1", "SystemControl9",
                      "antisense_X", "DeprecatedCodeword_2", "Actb", "blank_gene", "NegCtrl"])
    assert control_mask(names).tolist() == [True] * 10 + [False] * 3


def test_polygons_rasterise_back():
    import shapely

    lab = _labels()
    ids, polys = cell_polygons(lab)
    assert ids.tolist() == [3, 7, 9, 11, 12]
    for cell_id, poly in zip(ids, polys, strict=True):
        assert poly.is_valid and poly.geom_type == "Polygon"
        assert len(poly.exterior.coords) - 1 >= 4
        mask = lab == cell_id
        back = _rasterise(poly, lab.shape)
        if cell_id == 12:  # largest component only: one of the two pixels
            assert back.sum() == 1 and (back & mask).sum() == 1
            continue
        iou = (back & mask).sum() / (back | mask).sum()
        assert iou > 0.95, (cell_id, iou)
    unsimplified = cell_polygons(lab, simplify=0.0)[1]
    assert shapely.area(unsimplified[ids.tolist().index(7)]) == 400.0
    assert shapely.equals(unsimplified[ids.tolist().index(11)], shapely.box(78, 2, 79, 3))


def test_confidence_columns():
    lab = np.zeros((20, 30), np.int32)
    lab[5:15, 2:10] = 1
    lab[5:15, 10:18] = 2
    lab[5:15, 25:29] = 3
    x = np.array([3.5, 9.5, 12.5, 22.5, 50.0, 26.2])
    y = np.array([9.5, 9.5, 9.5, 9.5, 1.0, 9.7])
    logit = np.zeros(lab.shape, np.float32)
    logit[9, 3] = 2.0
    out = transcript_confidence(lab, x, y, cell_logit=logit, pixel_size_um=0.5)
    assert list(out.columns) == ["cell_probability", "boundary_distance_um", "nearest_cell_id"]
    assert out["cell_probability"].iloc[0] == pytest.approx(1 / (1 + np.exp(-2.0)))
    assert np.isnan(out["cell_probability"].iloc[4])
    # (9, 3): 1.5 px from the left edge of cell 1 -> 1.5 px * 0.5 µm
    assert out["boundary_distance_um"].iloc[0] == pytest.approx(0.75)
    assert out["boundary_distance_um"].iloc[1] == pytest.approx(0.25)  # at the 1|2 contact
    assert out["boundary_distance_um"].iloc[3] < 0  # background
    assert out["nearest_cell_id"].tolist()[:5] == [2, 2, 1, 3, 0]
    assert out["nearest_cell_id"].iloc[5] == 2
    px = transcript_confidence(lab, x, y)
    assert "boundary_distance_px" in px and "cell_probability" not in px
    empty = transcript_confidence(np.zeros((5, 5), np.int32), np.array([1.0]), np.array([1.0]))
    assert np.isnan(empty.iloc[0, 0]) and empty["nearest_cell_id"].iloc[0] == 0


def test_all_outputs_round_trip(tmp_path):
    import anndata
    import pyarrow.parquet as pq
    import shapely

    lab = _labels()
    rng = np.random.default_rng(1)
    image = rng.integers(0, 4000, lab.shape).astype(np.uint16)
    spots = _spots()
    spots["transcript_id"] = np.arange(len(spots)) + 1000
    logit = rng.normal(size=lab.shape).astype(np.float32)
    sample = SampleOutput(lab, image, 0.5, logit, settings={"run": "test"})
    kinds = ["csv", "h5ad", "geojson", "geoparquet", "xenium", "qc"]
    written = write_sample_outputs(sample, spots, tmp_path, "s1", ",".join(kinds))
    assert sorted(written) == sorted(kinds)
    assert not [p for p in tmp_path.rglob(".*")]  # no temporary files left
    # csv
    table = pd.read_csv(tmp_path / "s1.csv", keep_default_na=False, na_values=[""])
    assert list(table.columns) == ["cell_id", "spotX", "spotY", "gene", "cell_probability",
                                   "boundary_distance_um", "nearest_cell_id"]
    assert set(table["gene"]) == set(ODD_GENES)
    assert len(table) == len(spots)
    # h5ad
    adata = anndata.read_h5ad(tmp_path / "s1.h5ad")
    assert adata.obs_names.tolist() == ["3", "7", "9", "11", "12"]
    assert adata.obs["cell_id"].tolist() == [3, 7, 9, 11, 12]
    assert "NegControlProbe_7" not in adata.var_names and "Gène-ü" in adata.var_names
    assert "Gene,with,commas" in adata.var_names
    assert adata.X.dtype.kind == "i"
    in_cells = table[(table.cell_id > 0) & ~table.gene.isin(["NegControlProbe_7", "BLANK_0001"])]
    assert int(adata.X.sum()) == len(in_cells)
    assert adata.obs["transcript_count"].sum() == len(in_cells)
    uns = adata.uns["genesegnet"]
    assert uns["pixel_size_um"] == 0.5
    assert uns["control_probes_total"] == int(table.gene.isin(["NegControlProbe_7",
                                                                "BLANK_0001"]).sum())
    assert adata.obsm["chromatin"].shape == (5, len(uns["chromatin_features"]))
    row7 = adata.obs.loc["7"]
    assert row7["area_um2"] == pytest.approx(400 * 0.25)
    assert row7["centroid_x_um"] == pytest.approx(45.0 * 0.5)
    assert row7["mean_dapi"] == pytest.approx(image[lab == 7].mean())
    np.testing.assert_allclose(adata.obsm["spatial"][1], [22.5, 10.0])
    # geojson
    gj = json.loads((tmp_path / "s1_cells.geojson").read_text(encoding="utf-8"))
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == 5
    f0 = gj["features"][0]
    assert f0["properties"]["objectType"] == "cell" and f0["properties"]["name"] == "3"
    assert f0["properties"]["cell_id"] == 3
    poly = shapely.geometry.shape(f0["geometry"])
    back = _rasterise(poly, lab.shape)
    assert (back & (lab == 3)).sum() / (back | (lab == 3)).sum() > 0.95
    # geoparquet
    meta = json.loads(pq.read_schema(tmp_path / "s1_cells.parquet").metadata[b"geo"])
    assert meta["primary_column"] == "geometry" and meta["columns"]["geometry"]["crs"] is None
    gpd = pytest.importorskip("geopandas")
    gdf = gpd.read_parquet(tmp_path / "s1_cells.parquet")
    assert gdf["cell_id"].tolist() == [3, 7, 9, 11, 12] and gdf.geometry.is_valid.all()
    # xenium
    tif = tifffile.imread(tmp_path / "xenium" / "s1_cells.tif")
    assert tif.dtype == np.uint32 and np.array_equal(tif, lab)
    xa = pd.read_csv(tmp_path / "xenium" / "s1_transcript_assignment.csv",
                     keep_default_na=False)
    assert list(xa.columns)[:5] == ["transcript_id", "cell", "is_noise", "x", "y"]
    assert sorted(xa["transcript_id"]) == sorted(spots["transcript_id"].drop(index=1))  # NaN x
    row = xa[xa.transcript_id == 1002].iloc[0]
    cell = lab[int(spots.loc[2, "y"]), int(spots.loc[2, "x"])]
    assert row["cell"] == (f"cell-{cell}" if cell else "") and row["is_noise"] == int(cell == 0)
    assert row["x"] == pytest.approx(spots.loc[2, "x"] * 0.5, abs=1e-6)
    xg = json.loads((tmp_path / "xenium" / "s1_cell_polygons_um.geojson").read_text())
    assert xg["features"][0]["id"] == "cell-3"
    # qc
    html = (tmp_path / "s1_qc" / "qc.html").read_text(encoding="utf-8")
    for png in ("overlay.png", "cell_area.png", "transcripts_per_cell.png",
                "fraction_in_cells.png", "control_rate.png"):
        assert png in html
        import cv2
        assert cv2.imread(str(tmp_path / "s1_qc" / png)) is not None


def test_spatialdata_round_trip(tmp_path):
    spatialdata = pytest.importorskip("spatialdata")
    lab = _labels()
    image = np.random.default_rng(2).integers(0, 255, lab.shape).astype(np.uint8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_sample_outputs(SampleOutput(lab, image, 0.5), _spots(), tmp_path, "s",
                             ("spatialdata",))
    # anndata's per-array notice about zarr v3 sharding is not passed on to the user
    assert not [w for w in caught if "autosharding" in str(w.message)]
    sdata = spatialdata.read_zarr(tmp_path / "s.zarr")
    assert "genesegnet_boundaries" in sdata.shapes and "genesegnet_labels" in sdata.labels
    table = sdata.tables["table"]
    attrs = table.uns["spatialdata_attrs"]
    assert attrs == {"region": "genesegnet_boundaries", "region_key": "region",
                     "instance_key": "cell_id"}
    assert sorted(sdata.shapes["genesegnet_boundaries"].index) == [3, 7, 9, 11, 12]
    points = sdata.points["transcripts"].compute()
    assert "genesegnet_cell_id" in points and len(points) == len(_spots()) - 1  # NaN dropped
    assert np.array_equal(np.asarray(sdata.labels["genesegnet_labels"]), lab)


def test_bad_inputs(tmp_path):
    empty = np.zeros((30, 30), np.int32)
    spots = _spots(50)
    spots["x"] *= 0.3
    spots["y"] *= 0.4
    written = write_sample_outputs(SampleOutput(empty, None, 0.5), spots, tmp_path, "e",
                                   "csv,h5ad,geojson,geoparquet,xenium,qc")
    import anndata

    adata = anndata.read_h5ad(written["h5ad"][0])
    assert adata.n_obs == 0
    assert json.loads(written["geojson"][0].read_text())["features"] == []
    assert (pd.read_csv(written["csv"][0])["cell_id"] == 0).all()
    with pytest.raises(InputError, match="pixel size"):
        write_sample_outputs(SampleOutput(_labels()), _spots(), tmp_path, "p", "h5ad")
    with pytest.raises(InputError, match="labels"):
        write_sample_outputs(SampleOutput(np.zeros((3, 3), np.float32)), None, tmp_path, "f")
