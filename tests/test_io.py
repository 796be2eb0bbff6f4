"""Reading images, labels and spot tables; pairing by sample name; atomic writes."""

from __future__ import annotations

import gzip

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy.io import savemat

from GeneSegNet.errors import InputError
from GeneSegNet.io import (
    index_by_sample,
    pair_samples,
    read_image,
    read_label,
    read_spots,
    sample_name,
    staged_directory,
    write_label,
)


@pytest.mark.parametrize("suffix", [".png", ".tif", ".tiff"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_grey_images_round_trip_in_their_bit_depth(tmp_path, suffix, dtype, rng):
    image = rng.integers(0, np.iinfo(dtype).max, size=(13, 21), dtype=dtype)
    path = tmp_path / f"a{suffix}"
    if suffix == ".png":
        cv2.imwrite(str(path), image)
    else:
        tifffile.imwrite(path, image)
    out = read_image(path)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, image)


def test_colour_image_modes(tmp_path, rng):
    bgr = rng.integers(0, 255, size=(9, 11, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "c.png"), bgr)
    np.testing.assert_array_equal(read_image(tmp_path / "c.png", "color"), bgr)
    np.testing.assert_array_equal(read_image(tmp_path / "c.png", "gray"),
                                  cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY))


def test_jpeg_is_read(tmp_path):
    image = np.full((16, 16), 128, np.uint8)
    cv2.imwrite(str(tmp_path / "a.jpg"), image)
    assert np.abs(read_image(tmp_path / "a.jpg").astype(int) - 128).max() <= 2


def test_ome_tiff_channels_first_becomes_channels_last(tmp_path, rng):
    stack = rng.integers(0, 4000, size=(2, 10, 12), dtype=np.uint16)
    path = tmp_path / "s.ome.tif"
    tifffile.imwrite(path, stack, ome=True, metadata={"axes": "CYX"})
    out = read_image(path)
    assert out.shape == (10, 12, 2)
    np.testing.assert_array_equal(read_image(path, "gray"), stack[0])


def test_unreadable_and_empty_images_name_the_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    for name in ("empty.png", "junk.png", "missing.png"):
        with pytest.raises(InputError, match=name):
            read_image(tmp_path / name)


def test_label_formats_keep_wide_ids(tmp_path):
    labels = np.zeros((6, 7), np.int64)
    labels[1:3, 1:3] = 70000
    labels[4, 4] = 300
    tifffile.imwrite(tmp_path / "l.tif", labels.astype(np.uint32))
    savemat(tmp_path / "l.mat", {"CellMap": labels.astype(np.uint32)})
    np.save(tmp_path / "l.npy", labels)
    np.save(tmp_path / "seg.npy", {"masks": labels}, allow_pickle=True)
    for name in ("l.tif", "l.mat", "l.npy", "seg.npy"):
        out = read_label(tmp_path / name)
        np.testing.assert_array_equal(out, labels)
        assert out.max() == 70000


def test_16bit_png_label(tmp_path):
    labels = np.array([[0, 1, 65535], [300, 2, 0]], np.uint16)
    cv2.imwrite(str(tmp_path / "l.png"), labels)
    out = read_label(tmp_path / "l.png")
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, labels)


def test_mat_without_cellmap_key(tmp_path):
    savemat(tmp_path / "x.mat", {"masks": np.ones((3, 3))})
    with pytest.raises(InputError, match="CellMap"):
        read_label(tmp_path / "x.mat")


def test_write_label_chooses_a_lossless_type(tmp_path):
    small = np.array([[0, 255]], np.int32)
    wide = np.array([[0, 70000]], np.int64)
    assert write_label(tmp_path / "s.png", small).suffix == ".png"
    assert read_label(tmp_path / "s.png").dtype == np.uint8
    path = write_label(tmp_path / "w.png", wide)
    assert path.suffix == ".tif"  # PNG cannot hold ids above 65,535
    np.testing.assert_array_equal(read_label(path), wide)
    np.testing.assert_array_equal(read_label(write_label(tmp_path / "m.mat", wide)), wide)
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


@pytest.mark.parametrize(
    "header,scale",
    [
        ("spotX,spotY,gene", 1.0),
        ("x,y,gene", 1.0),
        ("x_location,y_location,feature_name,qv", 2.0),
        ("gene,global_x,global_y", 1.0),
        ("fov,x_global_px,y_global_px,target", 1.0),
    ],
)
def test_spot_layouts_are_recognised_by_header(tmp_path, header, scale):
    columns = header.split(",")
    values = {"spotX": 1.5, "x": 1.5, "x_location": 1.5, "global_x": 1.5, "x_global_px": 1.5,
              "spotY": 2.0, "y": 2.0, "y_location": 2.0, "global_y": 2.0, "y_global_px": 2.0,
              "gene": "Abc", "feature_name": "Abc", "target": "Abc", "qv": 40, "fov": 3}
    frame = pd.DataFrame({c: [values[c]] * 3 for c in columns})
    frame.to_csv(tmp_path / "s.csv", index=False)
    spots = read_spots(tmp_path / "s.csv", scale=scale)
    assert list(spots.columns) == ["x", "y", "gene"]
    np.testing.assert_allclose(spots["x"], 1.5 * scale)
    np.testing.assert_allclose(spots["y"], 2.0 * scale)
    assert list(spots["gene"]) == ["Abc"] * 3


def test_spots_from_gzip_and_parquet(tmp_path):
    frame = pd.DataFrame({"x": [1.0, 2.0], "y": [3.0, 4.0], "gene": ["a", "b"]})
    with gzip.open(tmp_path / "s.csv.gz", "wt") as handle:
        frame.to_csv(handle, index=False)
    frame.to_parquet(tmp_path / "s.parquet")
    for name in ("s.csv.gz", "s.parquet"):
        spots = read_spots(tmp_path / name)
        np.testing.assert_allclose(spots["x"], [1, 2])
        assert list(spots["gene"]) == ["a", "b"]


def test_unrecognised_header_falls_back_to_upstream_positions(tmp_path):
    (tmp_path / "s.csv").write_text("col_a,col_b,name\n4.5,6,g1\n")
    spots = read_spots(tmp_path / "s.csv")
    assert spots["x"].tolist() == [4.5] and spots["y"].tolist() == [6.0]


def test_spot_table_errors_name_file_and_problem(tmp_path):
    (tmp_path / "one.csv").write_text("only_one_column\n1\n")
    with pytest.raises(InputError, match=r"one\.csv.*no usable x/y columns"):
        read_spots(tmp_path / "one.csv")
    (tmp_path / "bad.csv").write_text("spotX,spotY,gene\n1,2,a\nabc,4,b\n")
    with pytest.raises(InputError, match=r"bad\.csv.*non-numeric.*line 3"):
        read_spots(tmp_path / "bad.csv")
    relaxed = read_spots(tmp_path / "bad.csv", strict=False)
    assert np.isnan(relaxed["x"].iloc[1])
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(InputError, match="empty"):
        read_spots(tmp_path / "empty.csv")


def test_sample_names_and_pairing(tmp_path):
    assert sample_name("a/b/slide1.ome.tif") == "slide1"
    assert sample_name("label_slide1.png", prefixes=("label_",)) == "slide1"
    assert sample_name("slide1_label.png", suffixes=("_label",)) == "slide1"
    images = index_by_sample([tmp_path / "s2.png", tmp_path / "s10.png"])
    spots = index_by_sample([tmp_path / "s10.csv", tmp_path / "s2.csv"])
    pairs = pair_samples({"images": images, "spots": spots})
    assert [(n, p["spots"].name) for n, p in pairs] == [("s10", "s10.csv"), ("s2", "s2.csv")]
    with pytest.raises(InputError, match=r"s3\.png has no matching file in spots"):
        pair_samples({"images": index_by_sample([tmp_path / "s3.png"]), "spots": spots})
    # The same label in two formats (inference writes .png and .mat): the preferred wins.
    both = [tmp_path / "label_s1.mat", tmp_path / "label_s1.png"]
    assert index_by_sample(both, ("label_",), prefer=(".png", ".mat"))["s1"].suffix == ".png"
    with pytest.raises(InputError, match="share the sample name 's1'"):
        index_by_sample(both, ("label_",))
    with pytest.raises(InputError, match="share the sample name"):
        index_by_sample([tmp_path / "a.png", tmp_path / "a_label.png"], (), ("_label",),
                        prefer=(".png",))


def test_staged_directory_is_all_or_nothing(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with staged_directory(final) as stage:
            (stage / "half.txt").write_text("x")
            raise RuntimeError("boom")
    assert not final.exists() and not list(tmp_path.iterdir())
    with staged_directory(final) as stage:
        (stage / "done.txt").write_text("x")
    assert (final / "done.txt").exists()
    with pytest.raises(FileExistsError):
        with staged_directory(final):
            pass


def test_json_records_are_plain_json(tmp_path):
    import json
    from pathlib import Path

    from GeneSegNet.io.records import json_ready, write_json

    data = {1: np.float32(2.5), "path": Path("a/b"), "nan": float("nan"), "pair": (1, np.int64(2))}
    assert json_ready(data) == {"1": 2.5, "path": "a/b", "nan": None, "pair": [1, 2]}
    path = write_json(tmp_path / "r.json", data)
    assert json.loads(path.read_text()) == {"1": 2.5, "path": "a/b", "nan": None, "pair": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
