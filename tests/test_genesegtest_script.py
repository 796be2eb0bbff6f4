"""End-to-end tests of GeneSeg_test.py (and the shared CLI groups of GeneSegNet.cli).

A tiny dataset is written per test: sample A with labels (crop 0 with three disks,
crop 1 with an empty label image), sample B without labels/.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from scipy import ndimage
from torch import nn

import GeneSeg_test
from GeneSegNet.cli.args import add_common_args, eval_config_from_args
from GeneSegNet.cli.upstream import check_unsupported
from GeneSegNet.dynamics.flow_targets import masks_to_flows
from GeneSegNet.io import read_label
from GeneSegNet.model import checkpoint as checkpoint_mod
from GeneSegNet.model.checkpoint import save_checkpoint
from GeneSegNet.model.net import GeneSegUNet, NetConfig
from GeneSegNet.model.predict import EvalConfig

SIDE = 64
CENTRES = [(16, 16), (40, 44), (18, 47)]


def disks(centres, radius=7) -> np.ndarray:
    rows, cols = np.indices((SIDE, SIDE))
    labels = np.zeros((SIDE, SIDE), np.uint16)
    for k, (r, c) in enumerate(centres, start=1):
        labels[(rows - r) ** 2 + (cols - c) ** 2 <= radius**2] = k
    return labels


def write_sample(root: Path, name: str, labelled: bool) -> None:
    # labelled sample: crop 1 has an empty label image (no cell); unlabelled: one disk
    second = np.zeros((SIDE, SIDE), np.uint16) if labelled else disks([(30, 30)])
    crops = {"0": disks(CENTRES), "1": second}
    for key, labels in crops.items():
        image = np.where(labels > 0, 200, 10).astype(np.uint8)
        heat = np.zeros((SIDE, SIDE), np.uint8)
        heat[16, 16] = heat[60, 5] = 255
        for sub, fname, data in (
            ("images", f"{key}_image.png", image),
            ("HeatMaps/HeatMap_all", f"{key}_gaumap_all.png", heat),
            ("labels", f"{key}_label.png", labels),
        ):
            if sub == "labels" and not labelled:
                continue
            (root / name / sub).mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(root / name / sub / fname), data)
        (root / name / "spots").mkdir(exist_ok=True)
        (root / name / "spots" / f"{key}_spot.csv").write_text(
            "x,y,gene\n16,16,A\n5,60,B\n47,18,A\n"
        )


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "test"
    write_sample(root, "A", labelled=True)
    write_sample(root, "B", labelled=False)
    return root


@pytest.fixture
def model(tmp_path) -> Path:
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "model.pt", GeneSegUNet(NetConfig(nbase=(8, 16, 16, 16))))


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def input_files(hashes: dict[str, str]) -> dict[str, str]:
    """Entries of ``tree_hashes`` that are inputs (not outputs, metrics or the log)."""
    return {k: v for k, v in hashes.items() if "/" in k and "visresults" not in k.split("/")}


class LabelNet(nn.Module):
    """Perfect network: cells = connected components of channel 0 > 0.5; flows 5x their
    unit flows, logits +5 inside and -5 outside."""

    def __init__(self) -> None:
        super().__init__()
        self.config = NetConfig(nchan=2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = []
        for img in x[:, 0].cpu().numpy():
            labels, _ = ndimage.label(img > 0.5)
            logits = np.where(labels > 0, 5.0, -5.0)[None]
            outs.append(np.concatenate([5.0 * masks_to_flows(labels), logits]))
        return torch.from_numpy(np.stack(outs).astype(np.float32)), torch.ones(x.shape[0], 4)


def test_outputs_metrics_and_untouched_inputs(dataset, model, caplog):
    before = tree_hashes(dataset)
    argv = [
        "--test_dir",
        str(dataset),
        "--pretrained_model",
        str(model),
        "--all_channels",
        "--save_png",
        "--save_tif",
        "--save_txt",
        "--save_flows",
        "--save_outlines",
        "--metrics",
        "--diameter",
        "34",
    ]
    with caplog.at_level(logging.INFO):
        assert GeneSeg_test.main(argv) == 0
    after = tree_hashes(dataset)
    assert input_files(after) == input_files(before)  # nothing changed, added or deleted
    for sample in ("A", "B"):
        out = dataset / sample / "visresults"
        for key in ("0", "1"):
            masks = read_label(out / f"{key}_label.png")
            assert masks.shape == (SIDE, SIDE) and np.issubdtype(masks.dtype, np.integer)
            np.testing.assert_array_equal(read_label(out / f"{key}_label.tif"), masks)
            fig = cv2.imread(str(out / f"{key}_cp_output.png"), cv2.IMREAD_UNCHANGED)
            assert fig.ndim == 3 and fig.dtype == np.uint8 and fig.shape[0] > SIDE
            assert tifffile.imread(out / f"{key}_dP.tif").shape == (2, SIDE, SIDE)
            assert tifffile.imread(out / f"{key}_dP.tif").dtype == np.float32
            rgb = tifffile.imread(out / f"{key}_flows.tif")
            assert rgb.shape == (SIDE, SIDE, 3) and rgb.dtype == np.uint8
            assert cv2.imread(str(out / f"{key}_outlines.png")).shape == (SIDE, SIDE, 3)
            lines = (out / f"{key}_cp_outlines.txt").read_text().splitlines()
            assert len(lines) == masks.max()
    table = pd.read_csv(dataset / "metrics_per_image.csv")
    assert list(table["sample"]) == ["A"] and list(table["key"].astype(str)) == ["0"]
    assert {"AP@0.5", "AP@0.75", "AP@0.9", "TP@0.5", "FN@0.9", "AJI", "gene_IoU"} <= set(
        table.columns
    )
    assert "AP@0.25" not in table.columns
    summary = json.loads((dataset / "metrics_summary.json").read_text())
    assert summary["n_images"] == 1 and summary["n_images_skipped_empty_labels"] == 1
    assert "AP@0.5" in summary and "AP@0.25" in summary["upstream_comparison"]
    assert summary["run"]["eval_config"]["diameter"] == 34.0
    assert list(pd.read_csv(dataset / "metrics_summary.csv")["n_images"]) == [1]
    log = (dataset / GeneSeg_test.LOG_NAME).read_text()
    assert re.search(r"B: no label files in .*; its 2 crop\(s\) are predicted", log)
    assert "skipped from metrics because their label image has no cell: A/1" in log


def test_perfect_network_scores_ap_one(dataset, tmp_path, monkeypatch):
    meta = {"diam_mean": 34.0, "diam_labels": 34.0, "net_config": NetConfig().to_dict()}
    monkeypatch.setattr(checkpoint_mod, "load_checkpoint", lambda *a, **k: (LabelNet(), meta))
    savedir = tmp_path / "out"
    argv = [
        "--test_dir",
        str(dataset),
        "--pretrained_model",
        "fake.pt",
        "--metrics",
        "--diameter",
        "34",
        "--savedir",
        str(savedir),
        "--in_folders",
        "--save_txt",
    ]
    assert GeneSeg_test.main(argv) == 0
    summary = json.loads((savedir / "metrics_summary.json").read_text())
    assert summary["AP@0.5"] == 1.0 and summary["AP@0.75"] == 1.0
    assert summary["TP@0.5"] == 3 and summary["FP@0.5"] == 0 and summary["FN@0.5"] == 0
    assert summary["upstream_comparison"]["AP@0.25"] == 1.0
    assert summary["gene_IoU"] == 1.0  # spots at (16,16) and (47,18) lie in cells 1 and 3
    assert 0.85 < summary["mean_best_IoU"] <= 1.0
    # savedir keeps samples apart; --in_folders puts masks under masks/
    assert (savedir / "A" / "masks" / "0_label.png").is_file()
    assert (savedir / "B" / "masks" / "0_label.png").is_file()
    assert not (dataset / "A" / "visresults").exists()
    assert not (dataset / "metrics_summary.json").exists()
    # ImageJ outlines: one line per cell, x,y pairs on that cell's boundary
    masks = read_label(savedir / "A" / "masks" / "0_label.png")
    lines = (savedir / "A" / "txt_outlines" / "0_cp_outlines.txt").read_text().splitlines()
    assert masks.max() == 3 and len(lines) == 3
    for cell, line in enumerate(lines, start=1):
        xy = np.array(line.split(","), dtype=int).reshape(-1, 2)
        assert len(xy) > 4
        assert np.all(masks[xy[:, 1], xy[:, 0]] == cell)
        inner = ndimage.binary_erosion(masks == cell)
        assert not inner[xy[:, 1], xy[:, 0]].any()


class HeatmapProbe(nn.Module):
    """Records the largest heatmap-channel value of every batch it sees; predicts nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.config = NetConfig(nchan=2)
        self.heat_max: list[float] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.heat_max.append(float(x[:, 1].max()))
        out = torch.zeros(x.shape[0], 3, *x.shape[2:])
        out[:, 2] = -5.0
        return out, torch.ones(x.shape[0], 4)


@pytest.mark.parametrize(
    ("trained", "flags", "heat_max"),
    [
        # the dataset's heatmaps are two 255-px spots in 64x64: percentile scaling (1-99 %)
        # zeroes them, fixed scaling (/255) keeps them at 1
        ("percentile", [], 0.0),
        ("fixed", [], 1.0),
        (None, [], 1.0),  # a checkpoint without training settings: fixed
        ("percentile", ["--heatmap_norm", "fixed"], 1.0),  # the flag wins
    ],
)
def test_heatmap_scaling_follows_the_checkpoint(dataset, tmp_path, monkeypatch, caplog,
                                                trained, flags, heat_max):  # fmt: skip
    probe = HeatmapProbe()
    meta = {
        "diam_mean": 34.0,
        "diam_labels": 34.0,
        "net_config": NetConfig().to_dict(),
        "train_config": None if trained is None else {"heatmap_mode": trained},
    }
    monkeypatch.setattr(checkpoint_mod, "load_checkpoint", lambda *a, **k: (probe, meta))
    argv = ["--test_dir", str(dataset), "--pretrained_model", "fake.pt", "--diameter", "34",
            "--metrics", "--savedir", str(tmp_path / "out"), *flags]  # fmt: skip
    with caplog.at_level(logging.WARNING):
        assert GeneSeg_test.main(argv) == 0
    assert probe.heat_max and all(m == heat_max for m in probe.heat_max)
    summary = json.loads((tmp_path / "out" / "metrics_summary.json").read_text())
    assert summary["run"]["eval_config"]["heatmap_mode"] == ("fixed" if heat_max else "percentile")
    assert ("differs from the model's training setting" in caplog.text) == bool(flags)


def test_chan_mismatch_and_corrupt_checkpoint_exit_2(dataset, model, tmp_path, caplog):
    with caplog.at_level(logging.ERROR):
        code = GeneSeg_test.main(
            ["--test_dir", str(dataset), "--pretrained_model", str(model), "--chan", "4"]
        )
    assert code == 2
    assert "the network takes 2 input channels but --chan 4" in caplog.text
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all" * 10)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        code = GeneSeg_test.main(["--test_dir", str(dataset), "--pretrained_model", str(bad)])
    assert code == 2
    assert "not a readable torch checkpoint" in caplog.text
    assert not (dataset / "A" / "visresults").exists()


def test_missing_test_dir_exits_2_without_creating_it(tmp_path, model):
    missing = tmp_path / "nowhere"
    assert GeneSeg_test.main(["--test_dir", str(missing), "--pretrained_model", str(model)]) == 2
    assert not missing.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--unet"], "--unet is not supported"),
        (["--nclasses", "3"], "--nclasses 3 is not supported"),
        (["--do_3D"], "--do_3D is not supported"),
        (["--no_interp"], "--no_interp is not supported: only interpolated"),
        (["--channel_axis", "0"], "--channel_axis 0 is not supported"),
        (["--no_norm", "--invert"], "--invert cannot be combined with --no_norm"),
        ([], "--pretrained_model is required"),
    ],
)
def test_refused_flags_stop_with_a_clear_message(dataset, model, capsys, flags, message):
    argv = ["--test_dir", str(dataset), *flags]
    if message != "--pretrained_model is required":
        argv += ["--pretrained_model", str(model)]
    with pytest.raises(SystemExit) as exc:
        GeneSeg_test.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as exc:
        GeneSeg_test.main(["--help"])
    assert exc.value.code == 0
    assert "--test_dir" in capsys.readouterr().out


def test_no_function_named_test_in_the_script():
    assert not [n for n in vars(GeneSeg_test) if n.startswith("test")]


# ---------------------------------------------------------------- shared CLI groups


def parser_for(training: bool):
    import argparse

    parser = argparse.ArgumentParser()
    add_common_args(parser, training=training)
    return parser


def test_help_defaults_match_eval_config():
    parser = parser_for(training=False)
    fields = {
        "diameter": "diameter",
        "flow_threshold": "flow_threshold",
        "confidence_threshold": "confidence_threshold",
        "min_size": "min_size",
        "niter": "niter",
        "batch_size": "batch_size",
        "tile_overlap": "tile_overlap",
    }
    defaults = EvalConfig()
    actions = {a.dest: a for a in parser._actions}
    for dest, field in fields.items():
        stated = re.search(r"\(default ([^)]+)\)", actions[dest].help).group(1)
        value = getattr(defaults, field)
        assert (stated == value) if isinstance(value, str) else float(stated) == value, dest
    assert "default: the model's training setting; fixed" in actions["heatmap_norm"].help
    assert defaults.heatmap_mode == "fixed"
    assert eval_config_from_args(parser.parse_args([]), None) == defaults
    percentile = {"heatmap_mode": "percentile"}
    assert eval_config_from_args(parser.parse_args([]), percentile).heatmap_mode == "percentile"


def test_filter_defaults_are_the_layout_suffixes():
    from GeneSegNet.io import layout

    args = parser_for(training=False).parse_args([])
    assert args.img_filter == layout.IMAGE_SUFFIX
    assert args.mask_filter == layout.LABEL_SUFFIX
    assert args.heatmap_filter == layout.HEATMAP_ALL_SUFFIX
    assert args.output_filename == layout.REFINED_LABELS_DIR


def test_eval_config_from_args_passes_given_flags():
    parser = parser_for(training=True)
    args = parser.parse_args(
        [
            "--diameter",
            "0",
            "--fast_mode",
            "--heatmap_norm",
            "percentile",
            "--batch_size",
            "2",
            "--no_norm",
        ]
    )
    cfg = eval_config_from_args(args, {"heatmap_mode": "fixed", "flow_target_mode": "isolated"})
    assert cfg == EvalConfig(
        diameter=0.0, resample=False, heatmap_mode="percentile", batch_size=2, normalize=False
    )
    assert eval_config_from_args(parser.parse_args(["--no_resample"]), None).resample is False


def test_model_args_defaults_differ_only_where_the_checkpoint_rules():
    train = parser_for(training=True).parse_args(["--pretrained_model", "None"])
    test = parser_for(training=False).parse_args([])
    assert train.pretrained_model is None
    assert (train.residual_on, train.style_on, train.concatenation, train.diam_mean) == (
        1,
        0,
        0,
        34.0,
    )
    assert (test.residual_on, test.style_on, test.concatenation, test.diam_mean) == (
        None,
        None,
        None,
        None,
    )


def test_no_effect_flags_give_notes_not_errors():
    parser = parser_for(training=True)
    args = parser.parse_args(
        [
            "--dir_above",
            "--look_one_level_down",
            "--no_npy",
            "--net_avg",
            "--all_channels",
            "--check_mkl",
        ]
    )
    notes = check_unsupported(args, parser)
    text = "\n".join(notes)
    for flag in ("--dir_above", "--look_one_level_down", "--no_npy", "--net_avg"):
        assert f"{flag} has no effect" in text
    assert "torch MKL available" in text
    assert "--all_channels" not in text
    assert check_unsupported(parser.parse_args([]), parser) == []


def test_architecture_flag_mismatch_is_reported():
    args = SimpleNamespace(residual_on=1, style_on=0, concatenation=None, diam_mean=30.0)
    meta = {"net_config": NetConfig(style_on=True).to_dict(), "diam_mean": 34.0}
    notes = GeneSeg_test._architecture_notes(args, meta)
    assert len(notes) == 2
    assert "--style_on 0 differs from the checkpoint" in notes[0]
    assert "--diam_mean 30.0 differs" in notes[1]
