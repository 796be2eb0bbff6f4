"""Tests of relabelling method "grow" in recursive training (GeneSegNet.training.relabel).

A tiny dataset is written here: 80x80 crops at 0.5 µm/px with three cells of radius 10 px
whose transcripts fill the cell, and starting labels that are only the nuclei (radius
4 px). Training runs one epoch of a tiny network; the model's predictions are replaced
by a stand-in (``predict_crop`` monkeypatched) that returns chosen cells, so the
relabelling is deterministic and the tests are fast.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import ndimage

from GeneSegNet.data.dataset import load_dataset
from GeneSegNet.errors import InputError
from GeneSegNet.growth.params import GrowParams
from GeneSegNet.io import read_label, read_spots, write_image, write_label
from GeneSegNet.model.net import NetConfig
from GeneSegNet.model.predict import EvalConfig
from GeneSegNet.training import relabel
from GeneSegNet.training.config import RecursiveConfig, TrainConfig
from GeneSegNet.training.recursive import run_recursive_training

NET = NetConfig(nbase=(8, 16), diam_mean=20.0)
TRAIN = TrainConfig(n_epochs=1, batch_size=2, tile=64, min_train_masks=0, save_every=1)
EVAL = EvalConfig(tile_size=64, diameter=0.0)
SIZE = 80
PIXEL_UM = 0.5
CENTRES = [(20, 20), (22, 58), (58, 38)]
CELL_R, NUCLEUS_R = 10, 4


def write_dataset(root: Path, samples: dict[str, int], seed: int) -> dict[Path, np.ndarray]:
    """Sample folders of crops with nuclei as labels; returns the true cells per image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    truth: dict[Path, np.ndarray] = {}
    for name, n_crops in samples.items():
        folder = root / name
        for k in range(n_crops):
            cells = np.zeros((SIZE, SIZE), np.int32)
            nuclei = np.zeros((SIZE, SIZE), np.int32)
            for cell, (cy, cx) in enumerate(CENTRES):
                cy, cx = cy + rng.integers(-2, 3), cx + rng.integers(-2, 3)
                d2 = (yy - cy) ** 2 + (xx - cx) ** 2
                cells[d2 <= CELL_R**2] = cell + 1
                nuclei[d2 <= NUCLEUS_R**2] = cell + 1
            image = np.where(nuclei > 0, 200, 20).astype(np.uint8)
            write_image(folder / "images" / f"{k}_image.png", image)
            write_label(folder / "labels" / f"{k}_label.png", nuclei)
            write_image(folder / "HeatMaps" / "HeatMap_all" / f"{k}_gaumap_all.png",
                        np.where(cells > 0, 200, 0).astype(np.uint8))  # fmt: skip
            rows = []
            for cell in range(1, len(CENTRES) + 1):
                ys, xs = np.nonzero(cells == cell)
                for i in rng.choice(len(ys), 150, replace=False):
                    rows.append(f"{xs[i] + 0.5},{ys[i] + 0.5},gene{cell}_{i % 3}")
            for x, y in rng.uniform(0, SIZE, size=(15, 2)):
                rows.append(f"{x},{y},noise")
            (folder / "spots").mkdir(parents=True, exist_ok=True)
            (folder / "spots" / f"{k}_spot.csv").write_text("spotX,spotY,gene\n" + "\n".join(rows))
            truth[(folder / "images" / f"{k}_image.png").resolve()] = cells
    return truth


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("growdata")
    truth = write_dataset(root / "train", {"s0": 2, "s1": 1}, seed=1)
    truth |= write_dataset(root / "val", {"s2": 1}, seed=2)
    return root, truth


def _config(root: Path, out: Path, **kw) -> RecursiveConfig:
    kw = {"refine_method": "grow", "pixel_size_um": PIXEL_UM, "relabel_min_size": 20,
          "recursive_num": 2, **kw}
    return RecursiveConfig(train_dir=root / "train", val_dir=root / "val",
                           save_model_dir=out, **kw)  # fmt: skip


def _stand_in(truth: dict[Path, np.ndarray], keep: int):
    """A ``predict_crop`` returning the crop's first ``keep`` true cells."""

    def predict(net, crop, cfg, **kw):
        cells = truth[Path(crop.image_path).resolve()]
        return SimpleNamespace(masks=np.where(cells <= keep, cells, 0).astype(np.int32))

    return predict


def _run(rc: RecursiveConfig):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_recursive_training(rc, NET, TRAIN, EVAL)
    finally:
        torch.set_num_threads(threads)


def _stats_from_files(root: Path, sample_names: list[str], folder: str) -> dict:
    """Label statistics recomputed from the written label files and the spot tables."""
    areas, n_cells, n_in, n_spots = [], 0, 0, 0
    for name in sample_names:
        for path in sorted((root / name / folder).glob("*_label.png")):
            labels = read_label(path)
            key = path.name.removesuffix("_label.png")
            spots = read_spots(root / name / "spots" / f"{key}_spot.csv")
            cols = np.floor(np.asarray(spots["x"], float)).astype(int)
            rows = np.floor(np.asarray(spots["y"], float)).astype(int)
            ok = (rows >= 0) & (cols >= 0) & (rows < labels.shape[0]) & (cols < labels.shape[1])
            ids = np.unique(labels[labels > 0])
            n_cells += len(ids)
            areas += [int((labels == i).sum()) for i in ids]
            n_in += int((labels[rows[ok], cols[ok]] > 0).sum())
            n_spots += int(ok.sum())
    return {"n_cells": n_cells, "median_area": float(np.median(areas)) * PIXEL_UM**2,
            "fraction": n_in / n_spots, "n_spots": n_spots}  # fmt: skip


@pytest.fixture(scope="module")
def grow_run(data, tmp_path_factory):
    root, truth = data
    out = tmp_path_factory.mktemp("growrun")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(relabel, "predict_crop", _stand_in(truth, keep=2))  # the model misses cell 3
        manifest = _run(_config(root, out, overwrite_newlabels=True))
    return manifest, out, root


def test_grow_makes_cells_larger_than_the_nuclei_and_keeps_them(grow_run):
    manifest, out, root = grow_run
    start = manifest.start_labels["train"].stats
    nuclei = manifest.rounds[0].input_labels  # round 1 trains on the grown starting labels
    assert manifest.rounds[0].label_folders == {"train": ["newlabels"], "val": ["newlabels"]}
    assert nuclei["train"] == start
    nucleus_area = np.pi * NUCLEUS_R**2 * PIXEL_UM**2
    assert start.n_cells >= 3 * 3 and start.median_area > 2 * nucleus_area
    after = manifest.rounds[0].relabelled["train"]
    assert after.method == "grow" and after.n_cells >= start.n_cells
    assert after.stats.median_area > 2 * nucleus_area
    # the model missed cell 3 of every crop; the transcripts bring it back
    assert after.merge["kept"] == 2 * 3 and after.merge["added_back"] >= 3
    assert after.merge["dropped"] == 0
    # labels/ is never modified
    for path in (root / "train").rglob("labels/*_label.png"):
        assert int(read_label(path).max()) == 3
        assert (read_label(path) > 0).sum() < 3 * np.pi * (NUCLEUS_R + 1) ** 2


def test_manifest_stats_match_the_written_labels(grow_run):
    manifest, out, root = grow_run
    on_disk = json.loads((out / manifest.file_name).read_text())
    rec = on_disk["rounds"][0]["relabelled"]["train"]
    # newlabels/ holds the labels written after round 1 (round 0's were replaced)
    expect = _stats_from_files(root / "train", ["s0", "s1"], "newlabels")
    assert rec["n_cells"] == rec["stats"]["n_cells"] == expect["n_cells"]
    assert rec["stats"]["area_unit"] == "um2"
    assert rec["stats"]["median_area"] == pytest.approx(expect["median_area"])
    assert rec["stats"]["fraction_transcripts_in_cells"] == pytest.approx(expect["fraction"])
    assert rec["stats"]["n_transcripts"] == expect["n_spots"]
    assert set(rec["merge"]) == {"kept", "split", "added_back", "dropped"}
    # round 2 trains on them
    assert on_disk["rounds"][1]["input_labels"]["train"] == rec["stats"]
    nuclei = _stats_from_files(root / "train", ["s0", "s1"], "labels")
    assert on_disk["start_labels"]["train"]["stats"]["n_cells"] >= nuclei["n_cells"]
    assert on_disk["config"]["grow_params"] == GrowParams().to_dict()
    assert on_disk["config"]["recursive"]["refine_method"] == "grow"


def test_collapse_logs_a_warning_and_grow_prevents_it(data, tmp_path, monkeypatch, caplog):
    root, truth = data
    monkeypatch.setattr(relabel, "predict_crop", _stand_in(truth, keep=1))  # 1 of 3 cells
    rc = _config(root, tmp_path / "a", refine_method="morphology", overwrite_newlabels=True,
                 recursive_num=1, relabel_last_round=True)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="GeneSegNet.training.relabel"):
        manifest = _run(rc)
    rec = manifest.rounds[0].relabelled["train"]
    assert rec.n_cells == 3 and manifest.rounds[0].input_labels["train"].n_cells == 9
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("round 1 relabelling (train, morphology)" in m and "3 cells" in m
               and "9 cells" in m for m in warned), warned  # fmt: skip
    caplog.clear()
    rc = _config(root, tmp_path / "b", overwrite_newlabels=True, recursive_num=1,
                 relabel_last_round=True)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="GeneSegNet.training.relabel"):
        manifest = _run(rc)
    rec = manifest.rounds[0].relabelled["train"]
    assert rec.merge["added_back"] == 2 * 3 and rec.n_cells >= 9
    assert not [r for r in caplog.records if "max_cell_loss" in r.getMessage()]


def test_grow_without_pixel_size_names_the_option(data, tmp_path):
    root, _ = data
    with pytest.raises(InputError) as err:
        _run(_config(root, tmp_path, pixel_size_um=None))
    assert "--pixel_size" in str(err.value) and "µm are asked for" in str(err.value)
    assert err.value.path is not None and err.value.path.parent == root / "train"
    assert not list(tmp_path.glob("run_*.json"))


def test_auto_method_chooses_grow_only_with_pixel_sizes(data, caplog):
    root, _ = data
    crops = load_dataset(root / "train")
    assert all(len(c.spots_xy) and c.pixel_size_um is None for c in crops)
    rc = _config(root, root / "unused", refine_method="auto", pixel_size_um=None)
    with caplog.at_level(logging.INFO, logger="GeneSegNet.training.relabel"):
        assert relabel.resolve_refine_method(rc, crops).refine_method == "merge"
    assert any("no pixel size" in r.getMessage() and "s0" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    rc = _config(root, root / "unused", refine_method="auto")
    assert relabel.resolve_refine_method(rc, crops).refine_method == "grow"
    assert RecursiveConfig(train_dir=root, save_model_dir=root).refine_method == "auto"


def test_postprocess_grow_keeps_every_cell_and_grows_it(data):
    root, truth = data
    crop = load_dataset(root / "train")[0]
    counts: dict[str, int] = {}
    out = relabel.postprocess_pseudo_labels(crop.labels, 1, method="grow", min_size=20,
                                            crop=crop, pixel_size_um=PIXEL_UM,
                                            merge_counts=counts)  # fmt: skip
    assert counts == {"kept": 3, "split": 0, "added_back": 0, "dropped": 0}
    for i in range(1, 4):
        nucleus = crop.labels == i
        assert np.unique(out[nucleus]).size == 1 and out[nucleus][0] > 0
        assert (out == out[nucleus][0]).sum() > 2 * nucleus.sum()


def test_script_options_reach_the_config(tmp_path):
    import GeneSeg_train

    parser = GeneSeg_train.build_parser()
    base = ["--train_dir", str(tmp_path), "--save_model_dir", str(tmp_path / "out")]
    _, _, _, rc = GeneSeg_train._configs(parser.parse_args(base))
    assert rc.refine_method == "auto" and rc.pixel_size_um is None and rc.grow_start_labels
    assert rc.grow == GrowParams() and rc.max_cell_loss == 0.1
    args = parser.parse_args([*base, "--refine_method", "grow", "--pixel_size", "0.2",
                              "--no_grow_start_labels", "--max_growth_um", "3",
                              "--max_cell_loss", "0.3"])  # fmt: skip
    _, _, _, rc = GeneSeg_train._configs(args)
    assert (rc.refine_method, rc.pixel_size_um, rc.grow_start_labels) == ("grow", 0.2, False)
    assert rc.grow.max_growth_um == 3.0 and rc.max_cell_loss == 0.3
    assert not rc.grows_start_labels()


def test_start_labels_can_stay_ungrown(data, tmp_path, monkeypatch):
    root, truth = data
    monkeypatch.setattr(relabel, "predict_crop", _stand_in(truth, keep=3))
    manifest = _run(_config(root, tmp_path, grow_start_labels=False, overwrite_newlabels=True,
                            recursive_num=1, relabel_last_round=True))  # fmt: skip
    assert manifest.start_labels is None
    assert manifest.rounds[0].label_folders == {"train": ["labels"], "val": ["labels"]}
    nucleus_area = np.pi * NUCLEUS_R**2 * PIXEL_UM**2
    assert manifest.rounds[0].input_labels["train"].median_area < 1.5 * nucleus_area
    assert manifest.rounds[0].relabelled["train"].merge["kept"] == 9


def test_merge_keeps_missed_cells_without_growth_or_transcripts(data):
    """Method "merge": predicted cells + previous cells the model missed, nothing grown,
    no transcripts needed, and no cell dropped for its size."""
    root, _ = data
    crop = load_dataset(root / "train")[0]
    # the model found cell 1, larger than its nucleus; cells 2 and 3 (nuclei of ~50 px,
    # below min_size) it missed
    predicted = (ndimage.binary_dilation(crop.labels == 1, iterations=4)).astype(np.int32)
    counts: dict[str, int] = {}
    no_spots = SimpleNamespace(**{**vars(crop), "spots_xy": np.zeros((0, 2), np.int64),
                                  "spot_genes": np.zeros(0, object), "pixel_size_um": None})
    out = relabel.postprocess_pseudo_labels(predicted, 1, method="merge", min_size=60,
                                            crop=no_spots, merge_counts=counts)
    assert counts == {"kept": 1, "split": 0, "added_back": 2, "dropped": 0}
    assert len(np.unique(out)) - 1 == 3
    np.testing.assert_array_equal(out > 0, (predicted > 0) | (crop.labels > 0))  # not grown
