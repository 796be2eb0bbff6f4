"""Vendor bundles -> raw layout: coordinates, controls, labels, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from GeneSegNet.errors import InputError
from GeneSegNet.vendors import import_bundle, open_bundle
from GeneSegNet.vendors.transcripts import control_category
from preprocess import import_bundle as import_script
from preprocess import make_starting_labels as labels_script
from tests import vendor_bundles as vb


def _read(base: Path, sample: str) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, dict]:
    spots = pd.read_parquet(base / "spots" / f"{sample}.parquet")
    image = tifffile.imread(base / "images" / f"{sample}.tif")
    labels = tifffile.imread(base / "labels" / f"{sample}.tif")
    meta = json.loads((base / "metadata" / f"{sample}.json").read_text())
    return spots, image, labels, meta


def _label_at(labels: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return labels[np.floor(y).astype(int), np.floor(x).astype(int)]


def test_control_categories() -> None:
    assert control_category("NegControlProbe_00042") == "NegControlProbe"
    assert control_category("Blank-12") == "Blank"
    assert control_category("BLANK_0001") == "BLANK"
    assert control_category("NegPrb7") == "NegPrb"
    assert control_category("antisense_ACTB") == "antisense"
    assert control_category("DeprecatedCodeword_3") == "DeprecatedCodeword"
    assert control_category("EPCAM") == ""


@pytest.mark.parametrize("level", [0, 1, 2])
@pytest.mark.parametrize("variant", ["boundaries", "masks", "focus_ome_only"])
def test_xenium_centre_lands_in_its_nucleus(tmp_path: Path, level: int, variant: str) -> None:
    bundle = vb.xenium_bundle(tmp_path / "xb", masks=variant == "masks",
                              focus=variant == "focus_ome_only",
                              experiment=variant != "focus_ome_only")
    base = tmp_path / "raw"
    argv = ["xenium", str(bundle), "--base_dir", str(base), "--sample", "s", "--labels",
            "--level", str(level)]
    assert import_script.main(argv) == 0
    spots, image, labels, meta = _read(base, "s")
    scale = 2 ** level
    assert image.shape == (vb.H0 // scale, vb.W0 // scale)
    assert meta["pixel_size_um"] == pytest.approx(vb.PS * scale)
    assert meta["platform"] == "xenium"
    # qv: one low-qv transcript per nucleus dropped; controls split off and counted
    tx = meta["transcripts"]
    assert tx["dropped_low_qv"] == 3
    assert tx["controls"] == {"BLANK": 1, "NegControlProbe": 3, "UnassignedCodeword": 1}
    assert set(spots["gene"]) == {"Gene0", "Gene1", "Gene2", "Gene9"}
    controls = pd.read_parquet(base / "controls" / "s.parquet")
    assert len(controls) == 5 and "category" in controls
    # x -> column, y -> row: each gene at a nucleus centre is inside that nucleus
    ids = pd.read_csv(base / "nuclei" / "s_ids.csv")
    nuc = spots[spots["gene"] != "Gene9"]
    got = _label_at(labels, nuc["x"].to_numpy(), nuc["y"].to_numpy())
    assert (got > 0).all()
    if variant != "masks":
        vendor = ids.set_index("label").loc[got, "vendor_id"].to_numpy()
        assert list(vendor) == list(nuc["cell_id"])
    # the DAPI is bright there, dark at the gene off any nucleus
    assert (_label_at(image, nuc["x"].to_numpy(), nuc["y"].to_numpy()) == 4000).all()
    off = spots[spots["gene"] == "Gene9"]
    assert _label_at(labels, off["x"].to_numpy(), off["y"].to_numpy())[0] == 0
    np.testing.assert_allclose(spots["x"], spots["x_um"] / (vb.PS * scale), rtol=1e-6)


def test_xenium_labels_by_make_starting_labels(tmp_path: Path) -> None:
    bundle = vb.xenium_bundle(tmp_path / "xb")
    base = tmp_path / "raw"
    assert import_script.main(["xenium", str(bundle), "--base_dir", str(base), "--sample",
                               "s", "--level", "1"]) == 0
    assert not (base / "labels").exists()
    assert labels_script.main(["--base_dir", str(base), "--sample", "s", "--bundle",
                               str(bundle), "--expand_um", "2"]) == 0
    spots, _, labels, _ = _read(base, "s")
    nuc = spots[spots["gene"] != "Gene9"]
    assert (_label_at(labels, nuc["x"].to_numpy(), nuc["y"].to_numpy()) > 0).all()
    # nucleus of 8 µm = 8 px at level 1, expanded by 2 µm = 2 px each side -> 12 px
    rows, cols = np.nonzero(labels == 1)
    assert np.ptp(rows) + 1 == 12 and np.ptp(cols) + 1 == 12
    assert 8 * 8 < len(rows) < 12 * 12  # Euclidean growth: rounded corners


def test_merscope_translation_holes_and_multipolygons(tmp_path: Path) -> None:
    bundle, points = vb.merscope_bundle(tmp_path / "mb")
    base = tmp_path / "raw"
    assert import_script.main(["merscope", str(bundle), "--base_dir", str(base),
                               "--sample", "m", "--labels"]) == 0
    spots, image, labels, meta = _read(base, "m")
    assert image.shape == vb.MERSCOPE_SHAPE and int(image[0, 0]) == 53  # middle plane z3
    assert meta["pixel_size_um"] == pytest.approx(0.25)
    assert meta["um_to_px"][0][2] == pytest.approx(-400.0)
    assert meta["transcripts"]["controls"] == {"Blank": 1}
    ids = pd.read_csv(base / "nuclei" / "m_ids.csv").set_index("label")["vendor_id"]
    got = _label_at(labels, spots["x"].to_numpy(), spots["y"].to_numpy())
    vendor = [0 if g == 0 else int(ids.loc[g]) for g in got]
    assert vendor == [p[2] for p in points]
    # the fov-local x/y of the vendor file are not what was written
    np.testing.assert_allclose(spots["x"], [40.5, 40.5, 110.2, 110.2, 150.5], atol=1e-6)


def test_cosmx_global_and_per_fov(tmp_path: Path) -> None:
    bundle, rows = vb.cosmx_bundle(tmp_path / "cb")
    base = tmp_path / "raw"
    assert import_script.main(["cosmx", str(bundle), "--base_dir", str(base), "--sample",
                               "g", "--labels"]) == 0
    spots, image, labels, meta = _read(base, "g")
    assert image.shape == (10 + 50, 64 + 64)
    assert meta["transcripts"]["controls"] == {"NegPrb": 1}
    ids = pd.read_csv(base / "nuclei" / "g_ids.csv").set_index("label")["vendor_id"]
    got = _label_at(labels, spots["x"].to_numpy(), spots["y"].to_numpy())
    assert [ids.loc[g] for g in got] == [f"{f}_{k}" for f, _, _, k in rows]
    assert list(_label_at(image, spots["x"].to_numpy(), spots["y"].to_numpy())) == [
        5000 + f for f, *_ in rows]
    assert import_script.main(["cosmx", str(bundle), "--base_dir", str(base), "--sample",
                               "f2", "--fov", "2", "--labels"]) == 0
    spots, image, labels, _ = _read(base, "f2")
    assert image.shape == vb.COSMX_FOV_SHAPE
    np.testing.assert_allclose(spots["x"], [20.5])
    assert _label_at(labels, spots["x"].to_numpy(), spots["y"].to_numpy())[0] == 1


def test_generic_with_origin(tmp_path: Path) -> None:
    img = np.zeros((40, 50), np.uint16)
    img[10:20, 30:40] = 900
    tifffile.imwrite(tmp_path / "dapi.tif", img)
    # pixel (row 15, col 35) centre at µm = origin + (35.5, 15.5) * 0.4
    pd.DataFrame({"gx": [100 + 35.5 * 0.4], "gy": [-7 + 15.5 * 0.4], "name": ["G"],
                  "extra": [1]}).to_csv(tmp_path / "tx.csv", index=False)
    base = tmp_path / "raw"
    assert import_script.main(["generic", "--image", str(tmp_path / "dapi.tif"),
                               "--transcripts", str(tmp_path / "tx.csv"), "--x_col", "gx",
                               "--y_col", "gy", "--gene_col", "name", "--pixel_size", "0.4",
                               "--origin_um", "100", "-7", "--base_dir", str(base),
                               "--sample", "q"]) == 0
    spots = pd.read_parquet(base / "spots" / "q.parquet")
    np.testing.assert_allclose(spots[["x", "y"]].to_numpy(), [[35.5, 15.5]], atol=1e-9)
    assert list(spots["extra"]) == [1]
    from GeneSegNet.io.spots import read_spots

    assert read_spots(base / "spots" / "q.parquet")["x"].tolist() == pytest.approx([35.5])


# ------------------------------------------------------------------ bad input
def _nothing_written(base: Path) -> bool:
    return not base.exists() or not any(p.is_file() for p in base.rglob("*"))


def test_missing_transcripts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bundle = vb.xenium_bundle(tmp_path / "xb")
    (bundle / "transcripts.parquet").unlink()
    base = tmp_path / "raw"
    assert import_script.main(["xenium", str(bundle), "--base_dir", str(base),
                               "--sample", "s"]) == 2
    assert _nothing_written(base)


def test_zero_pixel_size(tmp_path: Path) -> None:
    bundle = vb.xenium_bundle(tmp_path / "xb")
    (bundle / "experiment.xenium").write_text(json.dumps({"pixel_size": 0}))
    with pytest.raises(InputError, match="experiment.xenium"):
        open_bundle("xenium", bundle=bundle)
    bundle2 = vb.xenium_bundle(tmp_path / "xb2", experiment=False, ome_pixel=None)
    with pytest.raises(InputError, match="pixel size unknown"):
        open_bundle("xenium", bundle=bundle2)


def test_transform_outside_image(tmp_path: Path) -> None:
    wrong = vb.MERSCOPE_A.copy()
    wrong[0, 2] += 5000
    bundle, _ = vb.merscope_bundle(tmp_path / "mb", transform=wrong)
    base = tmp_path / "raw"
    with pytest.raises(InputError, match="detected_transcripts.csv.*outside"):
        import_bundle(open_bundle("merscope", bundle=bundle), base, "m")
    assert _nothing_written(base)


def test_cosmx_fov_mismatch(tmp_path: Path) -> None:
    bundle, _ = vb.cosmx_bundle(tmp_path / "cb", bad_fov=True)
    base = tmp_path / "raw"
    with pytest.raises(InputError, match="fov ids .*fov_positions"):
        import_bundle(open_bundle("cosmx", bundle=bundle), base, "g")
    assert _nothing_written(base)
    bundle2, _ = vb.cosmx_bundle(tmp_path / "cb2")
    next((bundle2 / "Morphology2D").glob("*F002.TIF")).unlink()
    with pytest.raises(InputError, match="Morphology2D"):
        open_bundle("cosmx", bundle=bundle2)


def test_existing_output_kept(tmp_path: Path) -> None:
    bundle = vb.xenium_bundle(tmp_path / "xb")
    base = tmp_path / "raw"
    argv = ["xenium", str(bundle), "--base_dir", str(base), "--sample", "s"]
    assert import_script.main(argv) == 0
    before = (base / "spots" / "s.parquet").read_bytes()
    assert import_script.main(argv) == 2
    assert (base / "spots" / "s.parquet").read_bytes() == before
    assert import_script.main(argv + ["--overwrite"]) == 0
