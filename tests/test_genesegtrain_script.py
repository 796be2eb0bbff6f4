"""Tests for the GeneSeg_train.py script: upstream's README command, --help, bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import GeneSeg_train
from GeneSegNet.model.checkpoint import save_checkpoint
from GeneSegNet.model.net import GeneSegUNet, NetConfig
from tests.test_recursive import tree_digest, write_dataset

TINY = ["--nbase", "8", "16", "16", "--n_epochs", "2", "--diam_mean", "20", "--diameter", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_dataset(root / "train", {"a": 2}, seed=1)
    write_dataset(root / "val", {"b": 1}, seed=2)
    write_dataset(root / "test", {"c": 1}, seed=3)
    return root


def _readme_command(data: Path, out: Path) -> list[str]:
    return [
        "--use_gpu",
        "--train_dir",
        str(data / "train"),
        "--val_dir",
        str(data / "val"),
        "--test_dir",
        str(data / "test"),
        "--pretrained_model",
        "None",
        "--save_png",
        "--save_each",
        "--img_filter",
        "_image",
        "--mask_filter",
        "_label",
        "--all_channels",
        "--verbose",
        "--metrics",
        "--dir_above",
        "--save_model_dir",
        str(out),
    ]


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as exc:
        GeneSeg_train.main(["--help"])
    assert exc.value.code == 0
    assert "--recursive_num" in capsys.readouterr().out


def test_upstream_readme_command_runs(data, tmp_path):
    out = tmp_path / "run"
    test_before = tree_digest(data / "test")
    argv = _readme_command(data, out) + TINY + ["--recursive_num", "2", "--min_train_masks", "0"]
    assert GeneSeg_train.main(argv) == 0
    manifests = list(out.glob("run_*.json"))
    assert len(manifests) == 1
    manifest = json.loads(manifests[0].read_text())
    assert manifest["status"] == "finished" and len(manifest["rounds"]) == 2
    assert manifest["config"]["argv"] == argv
    assert manifest["config"]["net"]["nbase"] == [8, 16, 16]
    assert manifest["config"]["net"]["style_on"] is False  # upstream training default
    models = sorted(p.name for p in (out / "models").iterdir())
    # per round: _best, _epoch_1 (save_each; e % 100 == 1 and last epoch), _last
    assert len(models) == 6 and sum(n.endswith("_epoch_1.pt") for n in models) == 2
    assert all(
        n.startswith("GeneSegNet_residual_on_style_off_concatenation_off_run_") for n in models
    )
    figures = list((out / f"run_{manifest['run_id']}").rglob("*_cp_output.png"))
    assert len(figures) == 2  # --save_png: one figure per test crop and round
    assert (out / "GeneSeg_train.log").stat().st_size > 0
    assert tree_digest(data / "test") == test_before
    assert (data / "train" / "a" / "newlabels" / "0_label.png").is_file()


def test_train_dir_without_images_exits_2(tmp_path, caplog):
    (tmp_path / "train" / "s" / "images").mkdir(parents=True)
    argv = ["--train_dir", str(tmp_path / "train"), "--save_model_dir", str(tmp_path / "o")]
    with caplog.at_level(logging.ERROR):
        assert GeneSeg_train.main(argv + TINY) == 2
    assert "no images" in caplog.text
    assert not (tmp_path / "o" / "models").exists()


def test_pretrained_model_of_wrong_architecture_exits_2(data, tmp_path, caplog):
    wrong = save_checkpoint(tmp_path / "wrong.pt", GeneSegUNet(NetConfig(nbase=(8, 16, 32))))
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    for path, message in ((wrong, "different architecture"), (corrupt, "not a readable")):
        out = tmp_path / f"out_{path.stem}"
        argv = [
            "--train_dir",
            str(data / "train"),
            "--save_model_dir",
            str(out),
            "--pretrained_model",
            str(path),
        ]
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert GeneSeg_train.main(argv + TINY) == 2
        assert message in caplog.text
        assert not (out / "models").exists()
        assert not list(out.glob("run_*.json"))
