"""GeneSeg_train.py under torchrun: 2 gloo processes train like one process.

The script is launched as ``python -m torch.distributed.run --nproc_per_node 2
--standalone GeneSeg_train.py ...`` on a tiny dataset (two rounds, a relabelling in
between) and as one plain process with the same arguments on a second copy of the data.
Augmentation is drawn per crop from the batch generator advanced to the crop's position,
so both runs see the same global batches of patches: their final weights agree up to
float round-off (summation order of the all-reduces), except the biases that feed a
BatchNorm (see :func:`test_final_weights_match_one_process`), and the relabelled crops
match. A 2-process run of one round continued with --resume under 2 processes ends as an
uninterrupted 2-process run (fixture ``resumed``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from GeneSegNet.io import read_label
from GeneSegNet.model.checkpoint import load_checkpoint
from GeneSegNet.training.augment import random_rotate_and_resize
from GeneSegNet.training.ddp import DRAWS_PER_CROP, DistEnv, shard_by_group, shard_loss_weight
from tests.test_recursive import write_dataset

ROOT = Path(__file__).resolve().parents[1]
TRAIN = {"s0": 3, "s1": 2}  # 5 crops: global batches of 4 and 1 (an empty shard)
ARGS = ["--nbase", "8", "16", "16", "--n_epochs", "3", "--diam_mean", "20", "--diameter",
        "0", "--train_tile_size", "64", "--batch_size", "4", "--learning_rate", "0.01",
        "--recursive_num", "2", "--min_train_masks", "0", "--relabel_min_size", "150",
        "--refine_method", "merge", "--seed", "3"]


def _data(root: Path) -> Path:
    write_dataset(root / "train", TRAIN, seed=1)
    write_dataset(root / "val", {"s2": 2}, seed=2)
    write_dataset(root / "test", {"s3": 1}, seed=3)
    return root


def _args(**changed: str) -> list[str]:
    """ARGS with the values of some options replaced (``n_epochs="4"``)."""
    out = list(ARGS)
    for name, value in changed.items():
        out[out.index(f"--{name}") + 1] = value
    return out


def _run(data: Path, out: Path, launcher: list[str], args: list[str] = ARGS,
         timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    argv = ["--train_dir", str(data / "train"), "--val_dir", str(data / "val"), "--test_dir",
            str(data / "test"), "--save_model_dir", str(out), *args]
    return subprocess.run([sys.executable, *launcher, str(ROOT / "GeneSeg_train.py"), *argv],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout,
                          check=False)


TORCHRUN = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp_script")
    ddp_data, one_data = _data(base / "d2"), _data(base / "d1")
    two = _run(ddp_data, base / "out2", TORCHRUN)
    one = _run(one_data, base / "out1", [])
    return base, two, one


def _manifest(out: Path) -> dict:
    manifests = list(out.glob("run_*.json"))
    assert len(manifests) == 1, manifests
    return json.loads(manifests[0].read_text())


def test_two_process_run_writes_one_set_of_outputs(runs):
    base, two, one = runs
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    manifest = _manifest(base / "out2")
    assert manifest["status"] == "finished" and len(manifest["rounds"]) == 2
    # one model name per round (rank 0's), _last and _best each
    models = sorted(p.name for p in (base / "out2" / "models").iterdir())
    assert len(models) == 4 and len({m.rsplit("_", 1)[0] for m in models}) == 2
    assert not [p for p in (base / "out2").rglob("*") if ".gsn-tmp" in p.name]
    log = (base / "out2" / "GeneSeg_train.log").read_text()
    assert log.count("finished 2 round(s)") == 1 and "2 processes (DDP)" in log
    relabelled = manifest["rounds"][0]["relabelled"]
    assert relabelled["train"]["n_crops"] == 5 and relabelled["val"]["n_crops"] == 2


def test_refined_labels_written_for_every_train_crop(runs):
    base, _, _ = runs
    for data in ("d2", "d1"):
        for sample, n in TRAIN.items():
            folder = base / data / "train" / sample
            names = sorted(p.name for p in (folder / "newlabels").glob("*_label.png"))
            assert names == [f"{k}_label.png" for k in range(n)], (data, sample)
    for sample, n in TRAIN.items():  # the same relabelling as one process
        for k in range(n):
            a = read_label(base / "d2" / "train" / sample / "newlabels" / f"{k}_label.png")
            b = read_label(base / "d1" / "train" / sample / "newlabels" / f"{k}_label.png")
            assert np.array_equal(a, b), (sample, k)


def test_final_weights_match_one_process(runs):
    """Every weight (conv kernels, BatchNorm scales) and the network function (batch
    statistics, as in training) match; biases that feed a BatchNorm have a zero gradient in
    exact arithmetic, which AdamW turns into lr-sized steps of round-off's random sign in
    either run, so they (and the running means that follow them) are not compared."""
    base, _, _ = runs
    two, one = _manifest(base / "out2"), _manifest(base / "out1")
    for r2, r1 in zip(two["rounds"], one["rounds"], strict=True):
        _assert_same_network(r2["model_used"], r1["model_used"])
        for key in ("first_train_loss", "final_train_loss", "final_val_loss"):
            assert r2["training"][key] == pytest.approx(r1["training"][key], rel=1e-5), key


def _assert_same_network(path_a: str | Path, path_b: str | Path) -> None:
    """Weights (not the BatchNorm-fed biases, see the test above) and the network function
    (batch statistics) of two checkpoints agree up to float round-off."""
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(4, 2, 64, 64)).astype(np.float32))
    a = load_checkpoint(path_a, device="cpu")[0]
    b = load_checkpoint(path_b, device="cpu")[0]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    weights = [k for k in sb if k.endswith(".weight")]
    assert len(weights) > 50
    for name in weights:
        torch.testing.assert_close(sa[name], sb[name], rtol=1e-4, atol=1e-5, msg=name)
    assert a.config.nchan == x.shape[1]
    with torch.no_grad():
        out_a, out_b = a.train()(x)[0], b.train()(x)[0]
    torch.testing.assert_close(out_a, out_b, rtol=1e-4, atol=1e-4)
    assert float(out_b.abs().max()) > 0.1


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """2 processes train 2 epochs, then 2 processes continue that run to 4 epochs with
    --resume of its _last checkpoint (same output folder, as an interrupted run is
    continued); a reference run trains 4 epochs uninterrupted on a second copy of the data.
    One round: --resume continues the round its checkpoint belongs to (and the rounds
    after it), so the only round of a run is where 2 and 4 epochs can be compared. The
    learning rates of epochs 0, 1 are the same for 2 and 4 epochs (warm-up)."""
    base = tmp_path_factory.mktemp("ddp_resume")
    full_data, res_data = _data(base / "d_full"), _data(base / "d_res")
    four, two = _args(n_epochs="4", recursive_num="1"), _args(n_epochs="2", recursive_num="1")
    full = _run(full_data, base / "out_full", TORCHRUN, four)
    half = _run(res_data, base / "out_res", TORCHRUN, two)
    assert half.returncode == 0, half.stderr[-3000:]
    lasts = list((base / "out_res" / "models").glob("*_last.pt"))
    assert len(lasts) == 1, lasts
    shutil.copy(lasts[0], base / "half_last.pt")  # the state the resumed run starts from
    again = _run(res_data, base / "out_res", TORCHRUN, [*four, "--resume", str(lasts[0])])
    return base, full, again, lasts[0]


def test_resume_under_ddp_writes_one_set_of_outputs(resumed):
    base, full, again, last = resumed
    assert full.returncode == 0, full.stderr[-3000:]
    assert again.returncode == 0, again.stderr[-3000:]
    manifest = _manifest(base / "out_res")
    assert manifest["status"] == "finished" and len(manifest["rounds"]) == 1
    assert [r["checkpoint"] for r in manifest["resumed"]] == [str(last)]
    assert manifest["rounds"][0]["started_from"] == str(last)
    assert manifest["rounds"][0]["model_last"] == str(last)  # the run keeps its file names
    stem = last.name.removesuffix("_last.pt")
    models = sorted(p.name for p in (base / "out_res" / "models").iterdir())
    assert models == [f"{stem}_best.pt", f"{stem}_last.pt"]
    assert not [p for p in (base / "out_res").rglob("*") if ".gsn-tmp" in p.name]
    log = (base / "out_res" / "GeneSeg_train.log").read_text()
    assert log.count("finished 1 round(s)") == 2 and log.count("resuming ") == 1
    assert f"resuming {last} at epoch 2" in log
    meta = load_checkpoint(last, device="cpu")[1]
    assert meta["extra"]["epoch"] == 3 and meta["extra"]["schedule_position"] == 4


def test_resumed_run_equals_uninterrupted_run(resumed):
    base, _, _, last = resumed
    (ref,), (res,) = _manifest(base / "out_full")["rounds"], _manifest(base / "out_res")["rounds"]
    _assert_same_network(res["model_last"], ref["model_last"])
    for key in ("first_train_loss", "final_train_loss", "final_val_loss", "best_val_loss"):
        assert res["training"][key] == pytest.approx(ref["training"][key], rel=1e-5), key
    assert res["training"]["epochs_run"] == ref["training"]["epochs_run"] == 4
    history = {k: load_checkpoint(p, device="cpu")[1]["extra"]["history"]
               for k, p in (("ref", ref["model_last"]), ("res", last),
                            ("half", base / "half_last.pt"))}
    assert [h["epoch"] for h in history["res"]] == [h["epoch"] for h in history["ref"]]
    assert [h["epoch"] for h in history["half"]] == [0, 1]
    for a, b in zip(history["res"], history["ref"], strict=True):
        assert a["lr"] == b["lr"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5), a["epoch"]
        assert (a["val_loss"] is None) == (b["val_loss"] is None)
        if a["val_loss"] is not None:
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5), a["epoch"]
    # the comparison is not trivial: epochs 2 and 3 changed the weights of the 2-epoch run
    half = load_checkpoint(base / "half_last.pt", device="cpu")[0].state_dict()
    final = load_checkpoint(last, device="cpu")[0].state_dict()
    moved = [k for k in final if k.endswith(".weight")
             and not torch.allclose(half[k], final[k], rtol=1e-4, atol=1e-5)]
    assert len(moved) > 20


def test_resume_with_changed_seed_fails_on_every_rank(resumed):
    base = resumed[0]
    half = base / "half_last.pt"
    bad = _run(base / "d_res", base / "out_bad", TORCHRUN,
               [*_args(n_epochs="4", recursive_num="1", seed="4"), "--resume", str(half)],
               timeout=300)  # a rank left waiting in a collective would hang: TimeoutExpired
    assert bad.returncode != 0
    message = "--resume checkpoint does not match this run: seed: 3 in the checkpoint vs 4"
    assert bad.stderr.count(message) == 2, bad.stderr[-3000:]  # raised by both ranks
    assert not (base / "out_bad" / "models").exists()
    assert not list((base / "out_bad").glob("run_*.json"))


def test_shard_draws_equal_the_full_batch_draws():
    rng = np.random.default_rng(7)
    images = [rng.normal(size=(2, 40 + 3 * i, 50)).astype(np.float32) for i in range(5)]
    labels = [rng.normal(size=(3, 40 + 3 * i, 50)).astype(np.float32) for i in range(5)]
    rescale = np.linspace(0.8, 1.3, 5)
    full, full_lbl, _ = random_rotate_and_resize(images, labels, rescale=rescale, xy=(32, 32),
                                                 rng=np.random.default_rng([1, 1, 2, 3]))
    for pos in range(5):
        g = np.random.default_rng([1, 1, 2, 3])
        g.bit_generator.advance(DRAWS_PER_CROP * pos)
        one, one_lbl, _ = random_rotate_and_resize([images[pos]], [labels[pos]],
                                                   rescale=rescale[[pos]], xy=(32, 32), rng=g)
        assert np.array_equal(one[0], full[pos]) and np.array_equal(one_lbl[0], full_lbl[pos])


def test_shards_cover_groups_and_weights_average_to_the_global_mean():
    items = ["a", "a", "a", "b", "c", "c"]
    parts = [shard_by_group(items, str, DistEnv(r, 2)) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(items)
    assert not set(parts[0]) & set(parts[1])
    # mean over ranks of weight x (mean over shard) = global mean
    values = np.arange(5.0)
    shards = [values[r::2] for r in range(2)]
    got = np.mean([shard_loss_weight(len(s), 5, 2) * s.mean() for s in shards])
    assert got == pytest.approx(values.mean())
