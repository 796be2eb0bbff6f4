"""Per-sample metadata: pixel size round trip and refusal of bad values."""

from __future__ import annotations

import json

import pytest

from GeneSegNet.errors import InputError
from GeneSegNet.io.metadata import (
    SampleMetadata,
    metadata_path,
    read_metadata,
    resolve_pixel_size,
    write_metadata,
)


def test_round_trip(tmp_path):
    meta = SampleMetadata(pixel_size_um=0.2125, platform="xenium",
                          um_to_px=((4.70588, 0.0, -12.5), (0.0, 4.70588, 3.0)), source="test")
    path = write_metadata(metadata_path(tmp_path, "s1"), meta)
    assert path == tmp_path / "metadata" / "s1.json"
    assert read_metadata(path) == meta


@pytest.mark.parametrize("value", [0, -0.5, float("nan"), float("inf"), "abc", None])
def test_bad_pixel_size_is_refused_naming_the_file(tmp_path, value):
    path = tmp_path / "metadata" / "s.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"pixel_size_um": value}))
    with pytest.raises(InputError, match="s.json"):
        read_metadata(path)


def test_missing_pixel_size_and_bad_affine(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"platform": "xenium"}))
    with pytest.raises(InputError, match="pixel_size_um"):
        read_metadata(path)
    path.write_text(json.dumps({"pixel_size_um": 0.5, "um_to_px": [[1, 0], [0, 1]]}))
    with pytest.raises(InputError, match="2x3"):
        read_metadata(path)
    path.write_text("{not json")
    with pytest.raises(InputError, match="m.json"):
        read_metadata(path)


def test_option_and_file_must_agree(tmp_path):
    write_metadata(metadata_path(tmp_path, "s"), SampleMetadata(pixel_size_um=0.5))
    assert resolve_pixel_size(tmp_path, "s", None) == 0.5
    assert resolve_pixel_size(tmp_path, "s", 0.5) == 0.5
    assert resolve_pixel_size(tmp_path, "other", None) is None
    assert resolve_pixel_size(tmp_path, "other", 0.25) == 0.25
    with pytest.raises(InputError, match="disagrees"):
        resolve_pixel_size(tmp_path, "s", 0.2125)
    with pytest.raises(InputError, match="--pixel_size"):
        resolve_pixel_size(tmp_path, "other", 0.0)
