"""Tests for GeneSegNet.training.recursive: two rounds end to end on a tiny dataset written here.

The dataset is easy (bright disks on a dark background, heatmap on the cells), so a tiny
network trained for a few dozen epochs finds every cell: the rounds' test scores and the
refined labels are checked against floors computed here from the files written.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from GeneSegNet.errors import InputError
from GeneSegNet.io import read_label, write_image, write_label
from GeneSegNet.model.net import NetConfig
from GeneSegNet.model.predict import EvalConfig
from GeneSegNet.training.config import RecursiveConfig, TrainConfig
from GeneSegNet.training.label_folders import MARKER
from GeneSegNet.training.recursive import run_recursive_training
from GeneSegNet.training.relabel import postprocess_pseudo_labels

NET = NetConfig(nbase=(8, 16, 16), diam_mean=20.0)
TRAIN = TrainConfig(n_epochs=40, batch_size=2, tile=64, learning_rate=0.01, min_train_masks=0)
EVAL = EvalConfig(tile_size=64, diameter=0.0)
RELABEL_MIN_SIZE = 150  # px; the disks hold about 317 px
AP_FLOOR = 0.6  # of 5 test cells in 2 crops; the trained model finds all of them


def write_dataset(root: Path, samples: dict[str, int], seed: int) -> None:
    """Sample folders of 64x64 crops with 2-3 disk cells, heatmaps and spot tables."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    for name, n_crops in samples.items():
        folder = root / name
        for k in range(n_crops):
            labels = np.zeros((64, 64), np.int32)
            for cell, (cy, cx) in enumerate([(18, 18), (44, 42), (16, 48)][: 2 + k % 2]):
                cy, cx = cy + rng.integers(-3, 4), cx + rng.integers(-3, 4)
                labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= 100] = cell + 1
            image = np.where(labels > 0, 180, 30).astype(np.uint8)
            write_image(folder / "images" / f"{k}_image.png", image)
            write_label(folder / "labels" / f"{k}_label.png", labels)
            heat = np.where(labels > 0, 200, 0).astype(np.uint8)
            write_image(folder / "HeatMaps" / "HeatMap_all" / f"{k}_gaumap_all.png", heat)
            ys, xs = np.nonzero(labels)
            pick = rng.choice(len(ys), 5, replace=False)
            rows = "".join(f"{xs[i]},{ys[i]},g{i % 2}\n" for i in pick)
            (folder / "spots").mkdir(parents=True, exist_ok=True)
            (folder / "spots" / f"{k}_spot.csv").write_text("spotX,spotY,gene\n" + rows)


def tree_digest(root: Path) -> str:
    """Hash of every path and file content under ``root``."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_dataset(root / "train", {"s0": 3, "s1": 2}, seed=1)
    write_dataset(root / "val", {"s2": 2}, seed=2)
    write_dataset(root / "test", {"s3": 2}, seed=3)
    return root


def _config(root: Path, out: Path, **kw) -> RecursiveConfig:
    return RecursiveConfig(
        train_dir=root / "train",
        val_dir=root / "val",
        test_dir=root / "test",
        save_model_dir=out,
        recursive_num=2,
        relabel_min_size=RELABEL_MIN_SIZE,
        **kw,
    )


def average_precision_05(truth: np.ndarray, pred: np.ndarray) -> float:
    """AP at IoU 0.5 by brute force: TP / (TP + FP + FN). Above IoU 0.5 a cell overlaps at
    most one other that well, so counting pairs with IoU > 0.5 is the matching."""
    t_ids, p_ids = np.unique(truth[truth > 0]), np.unique(pred[pred > 0])
    tp = sum(
        1
        for t in t_ids
        for q in p_ids
        if np.sum((truth == t) & (pred == q)) / np.sum((truth == t) | (pred == q)) > 0.5
    )
    total = len(t_ids) + len(p_ids) - tp
    return 1.0 if total == 0 else tp / total


@pytest.fixture(scope="module")
def two_rounds(dataset, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    test_before = tree_digest(dataset / "test")
    out = tmp_path_factory.mktemp("run")
    try:
        manifest = run_recursive_training(_config(dataset, out), NET, TRAIN, EVAL)
    finally:
        torch.set_num_threads(threads)
    return manifest, out, test_before


def test_manifest_records_two_rounds(two_rounds):
    manifest, out, _ = two_rounds
    on_disk = json.loads((out / f"run_{manifest.run_id}.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest.to_dict(), default=str))
    assert on_disk["status"] == "finished"
    rounds = on_disk["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["label_folders"] == {"train": ["labels"], "val": ["labels"]}
    assert rounds[1]["label_folders"] == {"train": ["newlabels"], "val": ["newlabels"]}
    assert rounds[0]["n_crops"] == {"train": 5, "val": 2}
    for r in rounds:
        assert Path(r["model_last"]).is_file() and Path(r["model_best"]).is_file()
        assert r["training"]["epochs_run"] == TRAIN.n_epochs
        assert r["training"]["final_train_loss"] < r["training"]["first_train_loss"]
    assert rounds[0]["relabelled"]["train"]["n_crops"] == 5
    assert rounds[0]["relabelled"]["train"]["n_cells"] > 0
    assert rounds[1]["relabelled"] is None  # no refinement after the last round
    assert on_disk["config"]["train"]["n_epochs"] == TRAIN.n_epochs


def test_test_set_is_scored_against_its_original_labels_and_left_untouched(two_rounds, dataset):
    manifest, _, test_before = two_rounds
    assert tree_digest(dataset / "test") == test_before
    assert not list((dataset / "test").rglob("newlabels"))
    original_cells = sum(
        int(read_label(p).max()) for p in (dataset / "test").rglob("labels/*_label.png")
    )
    for r in manifest.rounds:
        assert r.test.metrics["n_true_cells"] == original_cells


def test_each_round_scores_above_a_floor_recomputed_from_its_masks(two_rounds, dataset):
    manifest, _, _ = two_rounds
    truth_files = sorted((dataset / "test").rglob("labels/*_label.png"))
    assert len(truth_files) == 2
    for r in manifest.rounds:
        aps = []
        for truth_file in truth_files:
            sample = truth_file.parent.parent.name
            pred = read_label(Path(r.test.output_dir) / sample / truth_file.name)
            aps.append(average_precision_05(read_label(truth_file), pred))
        assert r.test.metrics["AP@0.5"] == pytest.approx(np.mean(aps))
        assert np.mean(aps) >= AP_FLOOR, (r.round, aps)


def test_refined_labels_written_for_train_and_val_only(two_rounds, dataset):
    manifest, _, _ = two_rounds
    for split, samples in (("train", ["s0", "s1"]), ("val", ["s2"])):
        n_cells = 0
        for sample in samples:
            folder = dataset / split / sample / "newlabels"
            marker = json.loads((folder / MARKER).read_text())
            assert marker["run_id"] == manifest.run_id and marker["round"] == 1
            originals = sorted(p.name for p in (folder.parent / "labels").iterdir())
            assert sorted(p.name for p in folder.glob("*_label.png")) == originals
            for name in originals:
                refined = read_label(folder / name)
                assert refined.shape == (64, 64)
                ids = np.unique(refined[refined > 0])
                np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))  # renumbered
                sizes = np.bincount(refined.ravel())[1:]
                assert np.all(sizes >= RELABEL_MIN_SIZE)  # min_size of the refinement
                # each refined cell covers one original disk
                original = read_label(folder.parent / "labels" / name)
                assert average_precision_05(original, refined) >= 0.5
                n_cells += len(ids)
        assert n_cells > 0
        assert manifest.rounds[0].relabelled[split].n_cells == n_cells


def test_resume_continues_the_run_in_its_round(two_rounds, dataset):
    manifest, out, _ = two_rounds
    last_round = manifest.rounds[1]
    longer = TrainConfig(
        n_epochs=TRAIN.n_epochs + 2, batch_size=2, tile=64, learning_rate=0.01, min_train_masks=0
    )
    cfg = _config(dataset, out)
    resumed = run_recursive_training(cfg, NET, longer, EVAL, resume=last_round.model_last)
    assert resumed.run_id == manifest.run_id
    on_disk = json.loads((out / f"run_{manifest.run_id}.json").read_text())
    assert [r["round"] for r in on_disk["rounds"]] == [1, 2]
    assert on_disk["rounds"][0]["model_last"] == str(manifest.rounds[0].model_last)
    assert on_disk["rounds"][1]["training"]["epochs_run"] == TRAIN.n_epochs + 2
    assert on_disk["rounds"][1]["model_last"] == str(last_round.model_last)
    assert on_disk["resumed"][0]["round"] == 2


def test_foreign_newlabels_folder_is_refused_then_moved_aside(dataset, tmp_path):
    user = dataset / "val" / "s2" / "newlabels"
    (user / MARKER).unlink(missing_ok=True)  # now not written by any GeneSegNet run
    user.mkdir(parents=True, exist_ok=True)
    (user / "mine.txt").write_text("user data")
    with pytest.raises(InputError, match="overwrite_newlabels"):
        run_recursive_training(_config(dataset, tmp_path / "out"), NET, TRAIN, EVAL)
    assert (user / "mine.txt").read_text() == "user data"
    assert not (tmp_path / "out" / "models").exists()
    one_epoch = TrainConfig(n_epochs=1, batch_size=2, tile=64, min_train_masks=0)
    cfg = _config(dataset, tmp_path / "out", overwrite_newlabels=True, warm_start_rounds=True)
    manifest = run_recursive_training(cfg, NET, one_epoch, EVAL)
    rounds = manifest.rounds
    assert rounds[0].started_from is None
    assert rounds[1].started_from == str(rounds[0].model_used)
    backups = list(user.parent.glob("newlabels.backup_*"))
    assert len(backups) == 1 and (backups[0] / "mine.txt").read_text() == "user data"
    assert json.loads((user / MARKER).read_text())["round"] == 1


def test_postprocess_fills_holes_drops_small_cells_and_grows(tmp_path):
    masks = np.zeros((60, 60), np.int32)
    masks[10:30, 10:30] = 7  # 400 px square ...
    masks[18:20, 18:20] = 0  # ... with a 2x2 hole
    masks[45:50, 45:50] = 3  # 25 px: below min_size 300
    want = np.zeros((60, 60), np.int32)
    want[8:32, 8:32] = 1  # filled, then grown by 1 px in each of 2 passes
    got = postprocess_pseudo_labels(masks, 1, min_size=300)
    np.testing.assert_array_equal(got, want)
    unchanged = np.zeros((60, 60), np.int32)
    unchanged[10:30, 10:30] = 1
    np.testing.assert_array_equal(postprocess_pseudo_labels(masks, 3, min_size=300), unchanged)
    assert got.dtype == np.int32
