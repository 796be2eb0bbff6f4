"""GeneSegNet.io.layout: the crop writer and reader agree through it; raw affixes are shared."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from GeneSegNet.data.crops import CropConfig, RawSample, discover_raw_samples, write_sample_crops
from GeneSegNet.data.dataset import load_dataset, network_input
from GeneSegNet.io import layout, write_image, write_label
from GeneSegNet.mapping import map_dataset


def _raw_sample(rng: np.random.Generator, name: str = "s1") -> RawSample:
    height, width = 60, 80
    image = rng.integers(0, 256, size=(height, width), dtype=np.uint8)
    labels = np.zeros((height, width), np.int32)
    labels[5:25, 5:30] = 4
    labels[30:55, 40:75] = 9
    x = rng.uniform(0, width, 200)
    y = rng.uniform(0, height, 200)
    spots = pd.DataFrame({"x": x, "y": y, "gene": rng.choice(["a", "b"], 200)})
    return RawSample(name, image, labels, spots, {})


def test_crops_written_by_preprocessing_read_back_by_the_dataset_loader(tmp_path, rng):
    sample = _raw_sample(rng)
    size = 24
    folder = write_sample_crops(sample, tmp_path / "root", CropConfig(n_crops=3, crop_size=size))
    # the writer used the layout's names ...
    for sub in (layout.IMAGES_DIR, layout.LABELS_DIR, layout.SPOTS_DIR, layout.HEATMAP_ALL_DIR):
        assert sorted(p.name for p in (folder / sub).iterdir()), sub
    assert (folder / layout.IMAGES_DIR / layout.image_name(2)).is_file()
    assert (folder / layout.SPOTS_DIR / layout.spot_name(0)).is_file()
    assert (folder / layout.HEATMAP_ALL_DIR / layout.heatmap_name(1)).is_file()
    assert (folder / layout.HEATMAP_IN_CELL_DIR / layout.in_cell_heatmap_name(1)).is_file()
    offsets = pd.read_csv(folder / layout.CROPS_TABLE)
    # ... and the reader, using the same constants, finds every crop with its content
    crops = load_dataset(tmp_path / "root")
    assert [c.key for c in crops] == ["0", "1", "2"]
    rows = np.trunc(sample.spots["y"].to_numpy()).astype(np.int64)
    cols = np.trunc(sample.spots["x"].to_numpy()).astype(np.int64)
    for crop, (_, r0, c0) in zip(crops, offsets.itertuples(index=False), strict=True):
        assert crop.sample == "s1"
        np.testing.assert_array_equal(crop.image, sample.image[r0:r0 + size, c0:c0 + size])
        np.testing.assert_array_equal(crop.labels, sample.labels[r0:r0 + size, c0:c0 + size])
        inside = (rows >= r0) & (rows < r0 + size) & (cols >= c0) & (cols < c0 + size)
        want = np.stack([cols[inside] - c0, rows[inside] - r0], axis=1)
        np.testing.assert_array_equal(crop.spots_xy, want)  # (x, y) pixels, file order
        assert network_input(crop).shape == (2, size, size)


@pytest.mark.parametrize(
    ("prefix", "suffix"),
    [("", "")]
    + [("", s) for s in layout.RAW_LABEL_SUFFIXES]
    + [(p, "") for p in layout.RAW_LABEL_PREFIXES],
)
def test_each_accepted_raw_label_name_pairs_in_preprocessing_and_mapping(tmp_path, prefix, suffix):
    labels = np.zeros((20, 30), np.int32)
    labels[2:10, 3:12] = 5
    write_image(tmp_path / "images" / "tissue.png", np.full((20, 30), 90, np.uint8))
    write_label(tmp_path / "labels" / f"{prefix}tissue{suffix}.png", labels)
    spot_file = tmp_path / "spots" / f"tissue{layout.RAW_SPOT_SUFFIXES[0]}.csv"
    spot_file.parent.mkdir()
    spot_file.write_text("spotX,spotY,gene\n4.5,3.2,a\n20,15,b\n")
    pairs = discover_raw_samples(tmp_path)
    assert [name for name, _ in pairs] == ["tissue"]
    assert pairs[0][1]["labels"].name == f"{prefix}tissue{suffix}.png"
    results = map_dataset(tmp_path / "labels", tmp_path / "spots", tmp_path / "mapped")
    assert [path.name for path, _ in results] == ["tissue.csv"]
    table = pd.read_csv(tmp_path / "mapped" / "tissue.csv")
    assert sorted(table["cell_id"]) == [0, 5]


def test_label_folder_for_round_and_channels(tmp_path):
    (tmp_path / layout.LABELS_DIR).mkdir()
    assert layout.label_folder_for_round(tmp_path, 2) == layout.LABELS_DIR  # nothing refined
    (tmp_path / layout.REFINED_LABELS_DIR).mkdir()
    assert layout.label_folder_for_round(tmp_path, 1) == layout.LABELS_DIR
    assert layout.label_folder_for_round(tmp_path, 2) == layout.REFINED_LABELS_DIR
    assert (layout.channels_for(2), layout.channels_for(4)) == ("gray", "color")
    with pytest.raises(ValueError, match="--chan"):
        layout.channels_for(3)


def test_no_raw_affix_is_hidden_by_an_earlier_one():
    """The first matching affix is removed, so an earlier one must not end a later one."""
    for affixes, ends in ((layout.RAW_LABEL_SUFFIXES, str.endswith),
                          (layout.RAW_SPOT_SUFFIXES, str.endswith),
                          (layout.CROP_SPOT_SUFFIXES, str.endswith),
                          (layout.RAW_LABEL_PREFIXES, str.startswith)):
        for i, early in enumerate(affixes):
            assert not any(ends(late, early) for late in affixes[i + 1:]), affixes
