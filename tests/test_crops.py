"""Preprocessing: crop offsets, crop contents, heatmaps, splits and the script's errors."""

from __future__ import annotations

import logging
import random

import cv2
import numpy as np
import pandas as pd
import pytest

from GeneSegNet.data.crops import (
    CropConfig,
    RawSample,
    crop_offsets,
    split_samples,
    write_sample_crops,
)
from GeneSegNet.data.heatmap import heatmap_to_uint8
from GeneSegNet.io import read_image, read_label
from preprocess import Generate_Image_Label_locationMap as prep
from tests.test_heatmap import brute_force


def test_offsets_are_upstreams_random_draws():
    draw = random.Random(1)
    expected = []
    for _ in range(7):
        row = draw.randint(0, 300 - 256)  # row first, then column, inclusive bounds
        col = draw.randint(0, 420 - 256)
        expected.append((row, col))
    assert crop_offsets(300, 420, 256, 7, seed=1) == expected


def _raw_sample(rng, height=70, width=90, n_spots=150):
    image = rng.integers(0, 65535, size=(height, width), dtype=np.uint16)
    labels = np.zeros((height, width), np.int32)
    labels[10:30, 10:40] = 3
    labels[40:60, 50:85] = 70000  # needs 32-bit storage
    x = rng.uniform(-5, width + 5, n_spots)
    y = rng.uniform(-5, height + 5, n_spots)
    spots = pd.DataFrame({"x": x, "y": y, "gene": rng.choice(["a", "b", "c"], n_spots)})
    return RawSample("s1", image, labels, spots, {})


@pytest.mark.parametrize("context", ["global", "crop"])
def test_crop_contents_match_independent_computation(tmp_path, rng, context):
    sample = _raw_sample(rng)
    cfg = CropConfig(n_crops=4, crop_size=32, sigma=3.0, seed=5, heatmap_context=context)
    folder = write_sample_crops(sample, tmp_path, cfg)
    offsets = pd.read_csv(folder / "crops.csv")
    assert list(zip(offsets.row_offset, offsets.col_offset, strict=True)) == crop_offsets(
        70, 90, 32, 4, 5)
    xi, yi = sample.spots.x.to_numpy(), sample.spots.y.to_numpy()
    for i, r0, c0 in offsets.itertuples(index=False):
        np.testing.assert_array_equal(read_image(folder / "images" / f"{i}_image.png"),
                                      sample.image[r0:r0 + 32, c0:c0 + 32])
        label_files = list((folder / "labels").glob(f"{i}_label.*"))
        np.testing.assert_array_equal(read_label(label_files[0]),
                                      sample.labels[r0:r0 + 32, c0:c0 + 32])
        # spots: pixel (floor(y), floor(x)) (= upstream's int(float()) inside the image;
        # x = -0.5 is outside, not column 0), then the half-open crop window
        inside = [(fx - c0, fy - r0, g) for fx, fy, g in zip(np.floor(xi).astype(int).tolist(),
                                                           np.floor(yi).astype(int).tolist(),
                                                           sample.spots.gene, strict=True)
                  if c0 <= fx < c0 + 32 and r0 <= fy < r0 + 32]
        table = pd.read_csv(folder / "spots" / f"{i}_spot.csv")
        assert list(table.columns) == ["spotX", "spotY", "gene"]
        assert list(table.itertuples(index=False, name=None)) == inside
        heat = cv2.imread(str(folder / "HeatMaps" / "HeatMap_all" / f"{i}_gaumap_all.png"),
                          cv2.IMREAD_UNCHANGED)
        if context == "crop":
            expected = brute_force([s[1] for s in inside], [s[0] for s in inside], (32, 32), 3.0)
        else:
            # every spot inside the image counts (those outside it do not, as at inference)
            in_image = (xi >= 0) & (xi < 90) & (yi >= 0) & (yi < 70)
            all_r = np.floor(yi[in_image]).astype(int) - r0
            all_c = np.floor(xi[in_image]).astype(int) - c0
            expected = brute_force(all_r, all_c, (32, 32), 3.0)
        np.testing.assert_array_equal(heat, heatmap_to_uint8(expected))
        incell = [s for s in inside if sample.labels[s[1] + r0, s[0] + c0] != 0]
        heat_in = cv2.imread(str(folder / "HeatMaps" / "HeatMap" / f"{i}_gaumap.png"),
                             cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(heat_in, heatmap_to_uint8(
            brute_force([s[1] for s in incell], [s[0] for s in incell], (32, 32), 3.0)))


def test_jpeg_option_writes_upstream_jpegs(tmp_path, rng):
    cfg = CropConfig(n_crops=2, crop_size=32, image_format="jpg", heatmap_format="jpg")
    folder = write_sample_crops(_raw_sample(rng), tmp_path, cfg)
    assert (folder / "images" / "0_image.jpg").exists()
    assert read_image(folder / "images" / "0_image.jpg").dtype == np.uint8
    assert (folder / "HeatMaps" / "HeatMap_all" / "1_gaumap_all.jpg").exists()


def test_split_keeps_whole_samples_and_is_reproducible():
    names = [f"s{i}" for i in range(10)]
    split = split_samples(names, (0.6, 0.2, 0.2), seed=3)
    assert sorted(split) == sorted(names)
    counts = pd.Series(split).value_counts().to_dict()
    assert counts == {"train": 6, "val": 2, "test": 2}
    assert split == split_samples(list(reversed(names)), (0.6, 0.2, 0.2), seed=3)
    small = split_samples(["a", "b", "c"], (0.8, 0.1, 0.1))
    assert sorted(small.values()) == ["test", "train", "val"]


def _write_raw(base, rng, names=("a", "b"), size=(40, 48)):
    for sub in ("images", "labels", "spots"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for name in names:
        cv2.imwrite(str(base / "images" / f"{name}.png"),
                    rng.integers(0, 255, size=size, dtype=np.uint8))
        labels = np.zeros(size, np.uint16)
        labels[5:15, 5:15] = 1
        cv2.imwrite(str(base / "labels" / f"{name}.png"), labels)
        pd.DataFrame({"spotX": rng.uniform(0, size[1], 20), "spotY": rng.uniform(0, size[0], 20),
                      "gene": "g"}).to_csv(base / "spots" / f"{name}.csv", index=False)


def test_script_writes_upstream_layout_with_split(tmp_path, rng):
    _write_raw(tmp_path / "raw", rng, names=("a", "b", "c"))
    code = prep.main(["--base_dir", str(tmp_path / "raw"), "--save_crop_dir",
                      str(tmp_path / "out"), "--n_crops", "3", "--crop_size", "32",
                      "--split", "0.34", "0.33", "0.33"])
    assert code == 0
    folders = sorted(p.relative_to(tmp_path / "out").as_posix()
                     for p in (tmp_path / "out").glob("*/*"))
    assert len(folders) == 3 and {f.split("/")[0] for f in folders} == {"train", "val", "test"}
    one = next((tmp_path / "out").glob("*/a"))
    for rel in ("images/2_image.png", "labels/2_label.png", "spots/2_spot.csv",
                "HeatMaps/HeatMap_all/2_gaumap_all.png", "HeatMaps/HeatMap/2_gaumap.png"):
        assert (one / rel).is_file(), rel


def _expect_failure(tmp_path, caplog, argv, *fragments):
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR):
        code = prep.main(["--save_crop_dir", str(out), "--n_crops", "2", "--crop_size", "32",
                          *argv])
    assert code == 2
    message = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    # nothing half-written: only complete sample folders, no staging leftovers
    if out.exists():
        assert not [p for p in out.rglob("*") if ".partial" in p.name]
    return out


def test_missing_folder(tmp_path, caplog):
    _expect_failure(tmp_path, caplog, ["--base_dir", str(tmp_path / "nope")], "nope",
                    "not found")


def test_unreadable_image(tmp_path, caplog, rng):
    _write_raw(tmp_path / "raw", rng)
    (tmp_path / "raw" / "images" / "b.png").write_bytes(b"garbage bytes")
    out = _expect_failure(tmp_path, caplog, ["--base_dir", str(tmp_path / "raw")], "b.png",
                          "cannot read image")
    assert (out / "a" / "crops.csv").exists() and not (out / "b").exists()


def test_empty_image(tmp_path, caplog, rng):
    _write_raw(tmp_path / "raw", rng)
    (tmp_path / "raw" / "images" / "a.png").write_bytes(b"")
    out = _expect_failure(tmp_path, caplog, ["--base_dir", str(tmp_path / "raw")], "a.png",
                          "empty")
    assert not (out / "a").exists()


def test_spot_table_without_usable_columns(tmp_path, caplog, rng):
    _write_raw(tmp_path / "raw", rng)
    (tmp_path / "raw" / "spots" / "a.csv").write_text("only\n1\n2\n")
    _expect_failure(tmp_path, caplog, ["--base_dir", str(tmp_path / "raw")], "a.csv",
                    "no usable x/y columns")


def test_non_numeric_coordinates(tmp_path, caplog, rng):
    _write_raw(tmp_path / "raw", rng)
    (tmp_path / "raw" / "spots" / "a.csv").write_text("spotX,spotY,gene\n1,2,g\n3,oops,g\n")
    _expect_failure(tmp_path, caplog, ["--base_dir", str(tmp_path / "raw")], "a.csv",
                    "non-numeric", "line 3")


def test_image_smaller_than_crop(tmp_path, caplog, rng):
    _write_raw(tmp_path / "raw", rng, size=(20, 48))
    _expect_failure(tmp_path, caplog, ["--base_dir", str(tmp_path / "raw")], "a.png",
                    "smaller than the 32 px crop")


def test_label_shape_differs_from_image(tmp_path, caplog, rng):
    _write_raw(tmp_path / "raw", rng)
    cv2.imwrite(str(tmp_path / "raw" / "labels" / "b.png"), np.zeros((40, 47), np.uint16))
    out = _expect_failure(tmp_path, caplog, ["--base_dir", str(tmp_path / "raw")], "b.png",
                          "label shape (40, 47) differs")
    assert not (out / "b").exists()


def test_unpaired_file_is_named(tmp_path, caplog, rng):
    _write_raw(tmp_path / "raw", rng)
    (tmp_path / "raw" / "spots" / "b.csv").rename(tmp_path / "raw" / "spots" / "z.csv")
    _expect_failure(tmp_path, caplog, ["--base_dir", str(tmp_path / "raw")], "z.csv",
                    "no matching file")


def test_existing_output_is_not_overwritten(tmp_path, caplog, rng):
    _write_raw(tmp_path / "raw", rng)
    (tmp_path / "out" / "a").mkdir(parents=True)
    (tmp_path / "out" / "a" / "mine.txt").write_text("keep")
    _expect_failure(tmp_path, caplog, ["--base_dir", str(tmp_path / "raw")], "already exist")
    assert (tmp_path / "out" / "a" / "mine.txt").read_text() == "keep"
