"""Loading preprocessed sample folders: pairing by crop key, label rounds, no deletions."""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import pytest

from GeneSegNet.data.dataset import load_dataset, load_sample_folder, network_input
from GeneSegNet.errors import InputError
from GeneSegNet.io.layout import label_folder_for_round


def _write_crop(folder, key, rng, size=(24, 32), with_label=True, label_dir="labels", value=1):
    for sub in ("images", "labels", "spots", "HeatMaps/HeatMap_all"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    image = rng.integers(0, 255, size=(*size, 3), dtype=np.uint8)
    cv2.imwrite(str(folder / "images" / f"{key}_image.png"), image)
    heat = rng.integers(0, 255, size=size, dtype=np.uint8)
    cv2.imwrite(str(folder / "HeatMaps" / "HeatMap_all" / f"{key}_gaumap_all.png"), heat)
    labels = np.zeros(size, np.uint16)
    labels[2:8, 3:9] = value
    if with_label:
        (folder / label_dir).mkdir(exist_ok=True)
        cv2.imwrite(str(folder / label_dir / f"{key}_label.png"), labels)
    pd.DataFrame({"spotX": [1.7, 5.0], "spotY": [2.2, 3.9], "gene": ["a", "b"]}).to_csv(
        folder / "spots" / f"{key}_spot.csv", index=False)
    return image, heat, labels


def test_pairs_by_key_in_natural_order(tmp_path, rng):
    written = {k: _write_crop(tmp_path / "s", k, rng, value=int(k) + 1) for k in ("10", "2", "1")}
    crops = load_sample_folder(tmp_path / "s", chan=4)
    assert [c.key for c in crops] == ["1", "2", "10"]
    for crop in crops:
        image, heat, labels = written[crop.key]
        np.testing.assert_array_equal(crop.image, image)
        np.testing.assert_array_equal(crop.heatmap, heat)
        np.testing.assert_array_equal(crop.labels, labels)
        np.testing.assert_array_equal(crop.spots_xy, [[1, 2], [5, 3]])  # int(float())
    grey = load_sample_folder(tmp_path / "s", chan=2)[0]
    np.testing.assert_array_equal(grey.image, cv2.cvtColor(written["1"][0], cv2.COLOR_BGR2GRAY))
    x = network_input(grey)
    assert x.shape == (2, 24, 32) and x.dtype == np.float32
    np.testing.assert_array_equal(x[1], written["1"][1])


def test_missing_label_and_mismatched_files_are_named(tmp_path, rng):
    _write_crop(tmp_path / "s", "0", rng)
    _write_crop(tmp_path / "s", "1", rng, with_label=False)
    with pytest.raises(InputError, match=r"1_image\.png.*has no matching file in labels"):
        load_sample_folder(tmp_path / "s")
    (tmp_path / "t" / "images").mkdir(parents=True)
    with pytest.raises(InputError, match="no images"):
        load_sample_folder(tmp_path / "t")


def test_labels_optional_when_not_required(tmp_path, rng):
    _write_crop(tmp_path / "s", "0", rng, with_label=False)
    crops = load_sample_folder(tmp_path / "s", require_labels=False)
    assert crops[0].labels is None and crops[0].label_path is None


def test_rounds_read_refined_labels_and_never_delete(tmp_path, rng):
    root = tmp_path / "train"
    _write_crop(root / "a", "0", rng, value=1)
    _write_crop(root / "a", "0", rng, label_dir="newlabels", value=7)
    assert label_folder_for_round(root / "a", 1) == "labels"
    assert label_folder_for_round(root / "a", 2) == "newlabels"
    assert load_dataset(root, round_index=1)[0].labels.max() == 1
    assert load_dataset(root, round_index=2)[0].labels.max() == 7
    assert (root / "a" / "newlabels" / "0_label.png").exists()  # round 1 deleted nothing


def test_shape_mismatch_between_image_and_heatmap(tmp_path, rng):
    _write_crop(tmp_path / "s", "0", rng)
    cv2.imwrite(str(tmp_path / "s" / "HeatMaps" / "HeatMap_all" / "0_gaumap_all.png"),
                np.zeros((5, 5), np.uint8))
    with pytest.raises(InputError, match="heatmap shape"):
        load_sample_folder(tmp_path / "s")
