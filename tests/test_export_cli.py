"""``--outputs`` on the inference script and on Analysis/generate_MappingRelationships.py."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from Analysis.generate_MappingRelationships import main as mapping_main
from GeneSegNet.data.simulate import TissueConfig, write_simulated_dataset
from Inference.slidingwindows_gradient import main as inference_main
from tests.tiny_runs import tiny_model


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return write_simulated_dataset(tmp_path_factory.mktemp("sim") / "raw", 1,
                                   TissueConfig(height=96, width=128), seed=5)


def test_mapping_script_outputs(raw, tmp_path):
    import anndata

    out = tmp_path / "mapping"
    assert mapping_main(["--label_dir", str(raw / "labels"), "--spot_dir", str(raw / "spots"),
                         "--save_dir", str(out), "--metadata_dir", str(raw),
                         "--image_dir", str(raw / "images"),
                         "--outputs", "csv,h5ad,geojson,geoparquet,xenium,qc"]) == 0
    table = pd.read_csv(out / "sample_00.csv")
    assert list(table.columns) == ["cell_id", "spotX", "spotY", "gene", "boundary_distance_um",
                                   "nearest_cell_id"]
    adata = anndata.read_h5ad(out / "sample_00.h5ad")
    meta = json.loads((raw / "metadata" / "sample_00.json").read_text())
    assert adata.uns["genesegnet"]["pixel_size_um"] == meta["pixel_size_um"]
    assert np.isfinite(adata.obs["mean_dapi"]).all() and adata.n_obs > 0
    for name in ("sample_00_cells.geojson", "sample_00_cells.parquet", "sample_00_qc/qc.html",
                 "xenium/sample_00_cells.tif"):
        assert (out / name).is_file(), name


def test_mapping_script_default_is_upstream(raw, tmp_path):
    out = tmp_path / "m"
    assert mapping_main(["--label_dir", str(raw / "labels"), "--spot_dir", str(raw / "spots"),
                         "--save_dir", str(out)]) == 0
    assert list(pd.read_csv(out / "sample_00.csv").columns) == ["cell_id", "spotX", "spotY",
                                                                "gene"]


def test_mapping_script_bad_outputs(raw, tmp_path, capsys):
    assert mapping_main(["--label_dir", str(raw / "labels"), "--spot_dir", str(raw / "spots"),
                         "--save_dir", str(tmp_path), "--outputs", "csv,shapefile"]) != 0
    assert mapping_main(["--label_dir", str(raw / "labels"), "--spot_dir", str(raw / "spots"),
                         "--save_dir", str(tmp_path), "--outputs", "h5ad"]) != 0
    err = capsys.readouterr().err
    assert "shapefile" in err and "pixel size" in err


def test_inference_script_outputs(raw, tmp_path):
    import anndata

    model = tiny_model(tmp_path / "tiny.pt")
    out = tmp_path / "out"
    assert inference_main(["--root_dir", str(raw), "--save_dir", str(out), "--model_file",
                           str(model), "--outputs", "csv,h5ad,geojson,qc"]) == 0
    table = pd.read_csv(out / "mapping" / "sample_00.csv")
    assert list(table.columns)[:4] == ["cell_id", "spotX", "spotY", "gene"]
    assert list(table.columns)[4:] == ["cell_probability", "boundary_distance_um",
                                       "nearest_cell_id"]
    assert table["cell_probability"].between(0, 1).all()
    adata = anndata.read_h5ad(out / "mapping" / "sample_00.h5ad")
    labels_max = int(json.loads((out / "mapping" / "sample_00_qc" / "qc.json").read_text())
                     ["n_cells"])
    assert adata.n_obs == labels_max
    assert (out / "mapping" / "sample_00_cells.geojson").is_file()
