"""Inference/slidingwindows_gradient.py: outputs, one-command mapping, bad input."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from scipy.io import loadmat

from GeneSegNet.data.heatmap import heatmap_to_uint8, render_heatmap
from GeneSegNet.data.simulate import TissueConfig, write_simulated_dataset
from GeneSegNet.dynamics.smoothing import smooth_outlines
from GeneSegNet.evaluation.metrics import match
from GeneSegNet.io import read_image, read_label, read_spots, spot_pixels
from GeneSegNet.io.metadata import metadata_path, read_metadata
from GeneSegNet.model.checkpoint import save_checkpoint
from GeneSegNet.model.net import GeneSegUNet, NetConfig
from GeneSegNet.slide import pipeline as slide_pipeline
from GeneSegNet.slide.files import write_label_outputs
from Inference.slidingwindows_gradient import main
from tests.test_blockwise import network_like

SHAPE = (200, 300)  # shorter than one 256-px window: exercises the padding


@pytest.fixture
def data(tmp_path):
    raw = write_simulated_dataset(
        tmp_path / "raw", 2, TissueConfig(height=SHAPE[0], width=SHAPE[1]), seed=3
    )
    torch.manual_seed(0)
    model = save_checkpoint(tmp_path / "tiny.pt", GeneSegUNet(NetConfig(nbase=(8, 16, 16, 16))))
    return raw, model, tmp_path / "out"


def args(raw, model, out, *extra):
    return ["--root_dir", str(raw), "--save_dir", str(out), "--model_file", str(model), *extra]


def test_help_exits_zero(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--window_local" in capsys.readouterr().out


def test_writes_upstreams_outputs_and_the_global_heatmap(data):
    raw, model, out = data
    assert main(args(raw, model, out)) == 0
    for name in ("sample_00", "sample_01"):
        labels = read_label(out / f"label_{name}.png")
        assert labels.shape == SHAPE
        np.testing.assert_array_equal(loadmat(out / f"label_{name}.mat")["CellMap"], labels)
        assert read_image(out / f"label_plt_{name}.jpg").shape[:2] == SHAPE
        spots = read_spots(raw / "spots" / f"{name}.csv")
        rows, cols, _ = spot_pixels(spots.x, spots.y, SHAPE)
        expected = heatmap_to_uint8(render_heatmap(rows, cols, SHAPE))
        np.testing.assert_array_equal(
            tifffile.imread(out / "HeatMap" / f"{name}_gaumap.tif"), expected
        )
    config = json.loads((out / "slidingwindows_gradient_config.json").read_text())
    assert config["slide"]["window"] == 256 and config["block_halo"] == 64
    assert (out / "slidingwindows_gradient.log").is_file()


def test_raw_image_and_spots_to_assigned_transcripts_in_one_command(data, monkeypatch):
    """The network is replaced by the flows of the true cells, so the masks and the
    mapping can be checked against the simulation's truth."""
    raw, model, out = data
    real = slide_pipeline.predict_slide

    def truth_flows(net, image, index, cfg, **kwargs):
        name = next(
            n
            for n in ("sample_00", "sample_01")
            if np.array_equal(read_image(raw / "images" / f"{n}.png", "gray"), image)
        )
        flows, logits = network_like(read_label(raw / "truth" / f"{name}_cells.png"), 0.0, 0)
        result = real(net, image, index, cfg, **kwargs)
        result.field[:] = np.concatenate([flows, logits[None]])
        return result

    monkeypatch.setattr(slide_pipeline, "predict_slide", truth_flows)
    assert main(args(raw, model, out, "--mapping", "--block_size", "96")) == 0
    for name in ("sample_00", "sample_01"):
        labels = read_label(out / f"label_{name}.png")
        truth = read_label(raw / "truth" / f"{name}_cells.png")
        assert match(truth, labels, thresholds=(0.5,)).ap[0.5] >= 0.95
        table = pd.read_csv(out / "mapping" / f"{name}.csv")
        spots = read_spots(raw / "spots" / f"{name}.csv")
        assert len(table) == len(spots) and list(table.columns)[:4] == [
            "cell_id",
            "spotX",
            "spotY",
            "gene",
        ]
        assert "cell_probability" in table and "nearest_cell_id" in table  # issue 12
        prob = table.cell_probability.to_numpy()
        assert prob[table.cell_id > 0].mean() > prob[table.cell_id == 0].mean()
        under = labels[table.spotY.astype(int), table.spotX.astype(int)]
        np.testing.assert_array_equal(table.cell_id, under)
        truth_spots = pd.read_csv(raw / "truth" / f"{name}_spots.csv")
        pairs = dict(match(truth, labels, thresholds=(0.5,)).pairs[0.5].tolist())
        in_true_cell = truth_spots.cell_id > 0
        mapped = labels[truth_spots.spotY.astype(int), truth_spots.spotX.astype(int)]
        agree = np.array([pairs.get(t, -1) for t in truth_spots.cell_id]) == mapped
        assert agree[in_true_cell].mean() >= 0.95
        counts = pd.read_csv(out / "mapping" / f"{name}_cell_by_gene.csv", index_col=0)
        assert counts.to_numpy().sum() == (table.cell_id > 0).sum()
        assert len(counts) == labels.max()


def test_outlines_are_smoothed_last_at_the_pixel_size_given(data, monkeypatch):
    """Default --smooth_um 1: the written labels are those of --smooth_um 0 put through
    smooth_outlines at 1 µm in pixels of the sample's metadata; cells of the true flows
    are found either way."""
    raw, model, out = data
    real = slide_pipeline.predict_slide

    def truth_flows(net, image, index, cfg, **kwargs):
        flows, logits = network_like(read_label(raw / "truth" / "sample_00_cells.png"), 0.0, 0)
        result = real(net, image, index, cfg, **kwargs)
        result.field[:] = np.concatenate([flows, logits[None]])
        return result

    monkeypatch.setattr(slide_pipeline, "predict_slide", truth_flows)
    assert main(args(raw, model, out / "off", "--smooth_um", "0", "--no_heatmap")) == 0
    assert main(args(raw, model, out / "on", "--no_heatmap")) == 0
    pixel_size = read_metadata(metadata_path(raw, "sample_00")).pixel_size_um
    plain = read_label(out / "off" / "label_sample_00.png")
    smoothed = read_label(out / "on" / "label_sample_00.png")
    np.testing.assert_array_equal(smoothed, smooth_outlines(plain, 1.0 / pixel_size))
    assert (smoothed != plain).any()
    truth = read_label(raw / "truth" / "sample_00_cells.png")
    assert match(truth, smoothed, thresholds=(0.5,)).ap[0.5] >= 0.95


def test_window_local_mode_writes_one_heatmap_per_window(data):
    raw, model, out = data
    assert main(args(raw, model, out, "--window_local")) == 0
    maps = sorted((out / "HeatMap" / "sample_00").glob("*_gaumap.png"))
    assert [p.name for p in maps] == ["0_gaumap.png", "1_gaumap.png"]  # columns 0 and 44
    spots = read_spots(raw / "spots" / "sample_00.csv")
    rows, cols = np.floor(spots.y).astype(int), np.floor(spots.x).astype(int)
    inside = cols >= 44  # window 1 spans columns 44..299 and rows 0..255
    expected = heatmap_to_uint8(render_heatmap(rows[inside], cols[inside] - 44, (256, 256)))
    np.testing.assert_array_equal(read_image(maps[1]), expected)


def test_more_than_65535_cells_go_to_a_32_bit_tiff(tmp_path):
    labels = np.arange(300 * 300, dtype=np.int32).reshape(300, 300)
    image = np.zeros((300, 300), np.uint8)
    (tmp_path / "label_x.png").write_bytes(b"stale")
    written = write_label_outputs(tmp_path, "x", labels, image)
    assert written[0].name == "label_x.tif" and not (tmp_path / "label_x.png").exists()
    np.testing.assert_array_equal(read_label(written[0]), labels)
    np.testing.assert_array_equal(loadmat(tmp_path / "label_x.mat")["CellMap"], labels)


def test_missing_model_file(data, caplog):
    raw, _, out = data
    assert main(args(raw, out.parent / "nope.pt", out)) == 2
    assert "nope.pt" in caplog.text and "not found" in caplog.text


def test_model_file_that_is_not_a_checkpoint(data, caplog):
    raw, _, out = data
    fake = out.parent / "weights.pt"
    fake.write_text("not a checkpoint")
    assert main(args(raw, fake, out)) == 2
    assert "weights.pt" in caplog.text and "checkpoint" in caplog.text


def test_output_folder_that_cannot_be_written(data, caplog):
    raw, model, out = data
    out.write_text("a file in the way")
    assert main(args(raw, model, out)) == 2
    assert str(out) in caplog.text and "not a folder" in caplog.text


def test_spots_outside_the_image_are_counted_and_warned(data, caplog):
    raw, model, out = data
    spots = pd.read_csv(raw / "spots" / "sample_00.csv")
    spots.loc[:9, "spotX"] = SHAPE[1] + 5.0  # 10 spots right of the image
    spots.loc[10:11, "spotY"] = -3.0  # 2 above it
    spots.to_csv(raw / "spots" / "sample_00.csv", index=False)
    assert main(args(raw, model, out, "--mapping")) == 0
    assert "sample_00.csv: 12 of" in caplog.text and "outside" in caplog.text
    table = pd.read_csv(out / "mapping" / "sample_00.csv")
    assert len(table) == len(spots) and (table.cell_id[table.spotX > SHAPE[1]] == 0).all()


def test_spots_all_outside_fail_before_any_work(data, caplog):
    raw, model, out = data
    spots = pd.read_csv(raw / "spots" / "sample_01.csv")
    spots["spotX"] += 10 * SHAPE[1]  # e.g. microns without --spot_scale
    spots.to_csv(raw / "spots" / "sample_01.csv", index=False)
    assert main(args(raw, model, out)) == 2
    assert "sample_01.csv" in caplog.text and "none of its" in caplog.text
    assert not (out / "label_sample_00.png").exists()  # sample_00 was not started


def test_image_without_spot_file_runs_with_a_warning(data, caplog):
    raw, model, out = data
    (raw / "spots" / "sample_01.csv").unlink()
    assert main(args(raw, model, out, "--mapping")) == 0
    assert "sample_01.png" in caplog.text and "image alone" in caplog.text
    assert (out / "label_sample_01.png").is_file()
    assert not tifffile.imread(out / "HeatMap" / "sample_01_gaumap.tif").any()  # no spots
    assert (out / "mapping" / "sample_00.csv").is_file()
    assert not (out / "mapping" / "sample_01.csv").exists()


def test_missing_images_folder_and_bad_window(data, caplog):
    raw, model, out = data
    assert main(args(raw / "nowhere", model, out)) == 2
    assert "images" in caplog.text and "folder not found" in caplog.text
    assert main(args(raw, model, out, "--window", "64")) == 2  # 64-px overlap does not fit
    assert "overlap" in caplog.text
    assert not (out / "label_sample_00.png").exists()
