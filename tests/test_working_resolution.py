"""--working_pixel_size: resampling of image, labels and spots; crops and inference at a
working resolution, results on the input grid."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from GeneSegNet.data.resample import (
    resample_image,
    resample_labels,
    scale_spots,
    spot_pixels_at,
    working_shape,
)
from GeneSegNet.data.simulate import TissueConfig, write_simulated_dataset
from GeneSegNet.errors import InputError
from GeneSegNet.evaluation.metrics import match
from GeneSegNet.io import read_image, read_label, read_spots, spot_pixels
from GeneSegNet.slide import pipeline as slide_pipeline
from Inference.slidingwindows_gradient import main as infer
from preprocess.Generate_Image_Label_locationMap import main as preprocess
from tests.test_blockwise import network_like
from tests.tiny_runs import tiny_model


def test_working_shape_keeps_the_extent_in_micrometres():
    assert working_shape((1000, 400), 0.2125, 0.5) == (425, 170)
    assert working_shape((3, 3), 0.1, 10.0) == (1, 1)
    with pytest.raises(InputError):
        working_shape((10, 10), 0.0, 0.5)


def test_label_down_and_up_sampling_by_an_integer_factor_are_inverse():
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 50, (30, 40))
    fine = np.kron(coarse, np.ones((3, 3), dtype=coarse.dtype))  # each id a 3x3 block
    np.testing.assert_array_equal(resample_labels(coarse, (90, 120)), fine)
    np.testing.assert_array_equal(resample_labels(fine, (30, 40)), coarse)


def test_a_spot_stays_in_its_cell_at_any_working_resolution():
    """Spots at known cell centres (x = col, y = row): after scaling spots and labels to a
    non-integer factor, each spot's working pixel still holds its cell."""
    shape = (301, 377)
    rr, cc = np.indices(shape)
    labels = np.zeros(shape, np.int32)
    centres = [(60.3, 80.7), (150.0, 200.2), (250.9, 330.5)]
    for k, (r, c) in enumerate(centres, start=1):
        labels[(rr - r) ** 2 + (cc - c) ** 2 <= 20 ** 2] = k
    y = np.array([r for r, _ in centres])
    x = np.array([c for _, c in centres])
    for new_shape in [(128, 160), (640, 801)]:
        small = resample_labels(labels, new_shape)
        xs, ys = scale_spots(x, y, shape, new_shape)
        rows, cols, _ = spot_pixels(xs, ys, new_shape)
        np.testing.assert_array_equal(small[rows, cols], [1, 2, 3])
        r_int, c_int, _ = spot_pixels(x, y, shape)
        rows2, cols2 = spot_pixels_at(r_int, c_int, shape, new_shape)
        np.testing.assert_array_equal(small[rows2, cols2], [1, 2, 3])


def test_image_shrinking_averages_the_area():
    """A 2x2 block pattern shrunk by 2 becomes the blocks' means; the dtype is kept."""
    rng = np.random.default_rng(1)
    coarse = rng.integers(0, 60000, (20, 30)).astype(np.uint16)
    fine = np.kron(coarse, np.ones((4, 4), dtype=np.uint16))
    back = resample_image(fine, (20, 30))
    assert back.dtype == np.uint16
    interior = (slice(2, -2), slice(2, -2))  # the anti-aliasing blur reaches ~1 px in
    assert abs(back[interior].astype(float).mean() - coarse[interior].astype(float).mean()) \
        < 0.01 * coarse.mean()
    rgb = np.stack([fine] * 3, axis=-1)
    assert resample_image(rgb, (20, 30)).shape == (20, 30, 3)


@pytest.fixture
def raw(tmp_path):
    return write_simulated_dataset(tmp_path / "raw", 2, TissueConfig(height=240, width=320),
                                   seed=5)


def test_crops_at_a_working_pixel_size_record_it_and_keep_spots_in_their_cells(raw, tmp_path):
    out = tmp_path / "crops"
    code = preprocess(["--base_dir", str(raw), "--save_crop_dir", str(out), "--n_crops", "2",
                       "--crop_size", "96", "--working_pixel_size", "1.0",
                       "--transcript_input", "density", "--gene_channels", "0"])
    assert code == 0
    info = json.loads((out / "sample_00" / "sample.json").read_text())
    assert info["pixel_size_um"] == 1.0  # the simulator writes 0.5 µm/px metadata
    image = read_image(out / "sample_00" / "images" / "0_image.png", "unchanged")
    assert image.shape[:2] == (96, 96)
    # the raw labels at half resolution, cropped, are the crop's labels; each crop spot lies
    # where the resampled raw spots put it
    raw_labels = read_label(raw / "labels" / "sample_00.png")
    small = resample_labels(raw_labels, (120, 160))
    offsets = pd.read_csv(out / "sample_00" / "crops.csv")
    r0, c0 = int(offsets.row_offset[0]), int(offsets.col_offset[0])
    crop_labels = read_label(out / "sample_00" / "labels" / "0_label.png")
    np.testing.assert_array_equal(crop_labels, small[r0:r0 + 96, c0:c0 + 96])
    spots = read_spots(raw / "spots" / "sample_00.csv")
    xs, ys = scale_spots(spots.x, spots.y, (240, 320), (120, 160))
    inside = (ys >= r0) & (ys < r0 + 96) & (xs >= c0) & (xs < c0 + 96)
    crop_spots = read_spots(out / "sample_00" / "spots" / "0_spot.csv")
    assert len(crop_spots) == int(inside.sum())


def test_crops_refuse_a_working_pixel_size_without_pixel_sizes(raw, tmp_path, caplog):
    for meta in (raw / "metadata").iterdir():
        meta.unlink()
    code = preprocess(["--base_dir", str(raw), "--save_crop_dir", str(tmp_path / "c"),
                       "--n_crops", "1", "--crop_size", "64", "--working_pixel_size", "0.5",
                       "--transcript_input", "heatmap"])
    assert code != 0 and "--working_pixel_size" in caplog.text
    assert not (tmp_path / "c").exists()


def test_inference_at_half_resolution_writes_full_resolution_results(raw, tmp_path,
                                                                    monkeypatch):
    """The network is replaced by the flows of the true cells AT THE WORKING GRID; the
    written labels are on the input grid, match the truth, and the mapping reads them at
    the spots' input pixels."""
    model = tiny_model(tmp_path / "tiny.pt")
    real = slide_pipeline.predict_slide
    seen = []

    def truth_flows(net, image, index, cfg, **kwargs):
        name = f"sample_0{len(seen)}"
        seen.append(image.shape[:2])
        truth = resample_labels(read_label(raw / "truth" / f"{name}_cells.png"),
                                image.shape[:2])
        flows, logits = network_like(truth, 0.0, 0)
        result = real(net, image, index, cfg, **kwargs)
        result.field[:] = np.concatenate([flows, logits[None]])
        return result

    monkeypatch.setattr(slide_pipeline, "predict_slide", truth_flows)
    out = tmp_path / "out"
    code = infer(["--root_dir", str(raw), "--save_dir", str(out), "--model_file", str(model),
                  "--mapping", "--working_pixel_size", "1.0",
                  "--no_transcript_refine"])
    assert code == 0
    assert seen == [(120, 160), (120, 160)]
    for name in ("sample_00", "sample_01"):
        labels = read_label(out / f"label_{name}.png")
        truth = read_label(raw / "truth" / f"{name}_cells.png")
        assert labels.shape == truth.shape == (240, 320)
        assert match(truth, labels, thresholds=(0.5,)).ap[0.5] >= 0.9
        table = pd.read_csv(out / "mapping" / f"{name}.csv")
        assert len(table) == len(read_spots(raw / "spots" / f"{name}.csv"))
        under = labels[table.spotY.astype(int), table.spotX.astype(int)]
        np.testing.assert_array_equal(table.cell_id, under)


def test_inference_refuses_a_working_pixel_size_without_pixel_sizes_before_any_work(
        raw, tmp_path, caplog):
    for meta in (raw / "metadata").iterdir():
        meta.unlink()
    model = tiny_model(tmp_path / "tiny.pt")
    out = tmp_path / "out"
    code = infer(["--root_dir", str(raw), "--save_dir", str(out), "--model_file", str(model),
                  "--working_pixel_size", "1.0"])
    assert code != 0 and "--working_pixel_size" in caplog.text and "sample_00" in caplog.text
    assert not list(out.glob("label_*"))
