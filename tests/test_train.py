"""Tests for GeneSegNet.training.loop: schedule, loss, reproducibility, resume, checkpoints."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch

from GeneSegNet.data.dataset import Crop
from GeneSegNet.errors import InputError
from GeneSegNet.model.checkpoint import load_checkpoint, save_checkpoint
from GeneSegNet.model.net import GeneSegUNet, NetConfig
from GeneSegNet.training.config import TrainConfig
from GeneSegNet.training.loop import learning_rate_schedule, loss_fn, model_name_for, train_network

TINY = NetConfig(nbase=(8, 16, 16), diam_mean=15.0)


def disk_crop(key: str, centres: list[tuple[int, int, int]], size: int = 64) -> Crop:
    """A crop with disks (cy, cx, r) as cells, a bright image and a heatmap over them."""
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((size, size), np.int32)
    for k, (cy, cx, r) in enumerate(centres):
        labels[((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (labels == 0)] = k + 1
    image = np.where(labels > 0, 200, 20).astype(np.uint8)
    heat = np.where(labels > 0, 150, 0).astype(np.uint8)
    return Crop(
        "s0",
        key,
        image,
        heat,
        labels,
        np.zeros((0, 2), np.int64),
        Path(f"/nowhere/{key}_image.png"),
        Path(f"/nowhere/{key}_label.png"),
    )


CROPS = [
    disk_crop("0", [(16, 16, 7), (40, 44, 8), (48, 14, 6)]),
    disk_crop("1", [(20, 40, 8), (44, 20, 7)]),
    disk_crop("2", [(32, 32, 9), (10, 52, 5)]),
]


def _train(tmp_path: Path, name: str, crops=CROPS[:2], val=None, **cfg):
    settings = {"n_epochs": 2, "batch_size": 2, "tile": 64, "learning_rate": 0.01}
    settings.update(cfg)
    return train_network(
        crops,
        val,
        TINY,
        TrainConfig(**settings),
        device="cpu",
        model_dir=tmp_path / "models",
        model_name=name,
    )


def _weights(path: Path) -> dict[str, torch.Tensor]:
    net, _ = load_checkpoint(path)
    return net.state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- schedule and loss


def test_learning_rate_schedule_500_epochs_entry_by_entry():
    lr = 1e-3
    table = learning_rate_schedule(lr, 500)
    assert len(table) >= 500
    assert table[0] == 0.0
    for e in range(1, 10):
        assert table[e] == pytest.approx(lr * e / 9, rel=1e-12)
    for e in range(10, 410):
        assert table[e] == lr
    for e in range(410, 500):
        block = (e - 410) // 10 + 1  # 410-419: lr/2 ... 490-499: lr/512
        assert table[e] == pytest.approx(lr / 2**block, rel=1e-12)
    assert table[499] == pytest.approx(lr / 512)


@pytest.mark.parametrize("n_epochs", [3, 10, 100, 250])
def test_learning_rate_schedule_short_runs_have_no_decay(n_epochs):
    lr = 0.02
    table = learning_rate_schedule(lr, n_epochs)
    assert len(table) >= n_epochs
    assert table[0] == 0.0
    for e in range(1, min(n_epochs, 10)):
        assert table[e] == pytest.approx(lr * e / 9)
    for e in range(10, n_epochs):
        assert table[e] == lr


def test_loss_fn_matches_hand_computation():
    gen = torch.Generator().manual_seed(3)
    out = torch.randn(2, 3, 4, 5, generator=gen)
    target = torch.zeros(2, 3, 4, 5)
    target[:, 0] = (torch.rand(2, 4, 5, generator=gen) > 0.5).float()
    target[:, 1:] = torch.randn(2, 2, 4, 5, generator=gen)
    o, t = out.numpy().astype(np.float64), target.numpy().astype(np.float64)
    mse = np.mean((o[:, :2] - 5.0 * t[:, 1:3]) ** 2)
    p = 1.0 / (1.0 + np.exp(-o[:, 2]))
    y = t[:, 0] > 0.5
    bce = np.mean(-np.where(y, np.log(p), np.log(1.0 - p)))
    assert float(loss_fn(out, target)) == pytest.approx(mse + bce, rel=1e-5)


def test_model_name_follows_upstream_pattern(tmp_path):
    cfg = NetConfig(style_on=False)
    name = model_name_for(cfg, tmp_path / "runs", datetime(2024, 1, 2, 3, 4, 5, 6))
    assert name == (
        "GeneSegNet_residual_on_style_off_concatenation_off_runs_2024_01_02_03_04_05.000006"
    )


# ---------------------------------------------------------------- training runs


def test_training_reduces_the_loss(tmp_path):
    res = _train(tmp_path, "fit", n_epochs=30, learning_rate=0.01, save_every=100)
    losses = [h["train_loss"] for h in res.history]
    assert [h["epoch"] for h in res.history] == list(range(30))
    assert res.history[0]["lr"] == 0.0
    assert np.mean(losses[-5:]) < 0.7 * losses[0]


def test_seeded_runs_are_reproducible_and_seed_matters(tmp_path):
    a = _train(tmp_path, "a", seed=7)
    b = _train(tmp_path, "b", seed=7)
    c = _train(tmp_path, "c", seed=8)
    wa, wb, wc = _weights(a.last_path), _weights(b.last_path), _weights(c.last_path)
    assert _same(wa, wb)
    assert not _same(wa, wc)
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]


def test_loader_workers_do_not_change_the_result(tmp_path):
    a = _train(tmp_path, "w0", n_epochs=1, num_workers=0)
    b = _train(tmp_path, "w2", n_epochs=1, num_workers=2)
    assert _same(_weights(a.last_path), _weights(b.last_path))


def test_resume_continues_exactly(tmp_path):
    full = _train(tmp_path, "full", n_epochs=4, crops=CROPS, val=CROPS[2:], save_every=100)
    half = _train(tmp_path, "half", n_epochs=2, crops=CROPS, val=CROPS[2:], save_every=100)
    resumed = train_network(
        CROPS,
        CROPS[2:],
        TINY,
        TrainConfig(n_epochs=4, batch_size=2, tile=64, learning_rate=0.01),
        model_dir=tmp_path / "models",
        model_name="ignored",
        resume=half.last_path,
    )
    assert resumed.last_path == half.last_path  # the run keeps its own file names
    assert _same(_weights(full.last_path), _weights(resumed.last_path))
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in full.history]
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    _, meta = load_checkpoint(resumed.last_path)
    assert meta["extra"]["epoch"] == 3 and meta["extra"]["schedule_position"] == 4


def test_resume_refuses_changed_settings(tmp_path):
    half = _train(tmp_path, "half", n_epochs=2)
    changed = TrainConfig(n_epochs=4, batch_size=2, tile=64, learning_rate=0.01, seed=5)
    with pytest.raises(InputError, match="seed: 0 in the checkpoint vs 5"):
        train_network(
            CROPS[:2],
            None,
            TINY,
            changed,
            model_dir=tmp_path / "models",
            model_name="x",
            resume=half.last_path,
        )


def test_min_train_masks_drops_crops(tmp_path):
    empty = disk_crop("e", [])
    single = disk_crop("s", [(30, 30, 8)])
    res = _train(
        tmp_path,
        "m",
        crops=[empty, single, CROPS[0]],
        val=[empty, CROPS[1]],
        n_epochs=1,
        min_train_masks=2,
    )
    assert res.n_train == 1 and res.n_val == 1
    assert res.dropped == {"train": 2, "val": 1}
    with pytest.raises(InputError, match="no training crop has at least 1 cell"):
        _train(tmp_path, "none", crops=[empty, empty], n_epochs=1)


def test_checkpoint_carries_config_and_diameters(tmp_path):
    res = _train(tmp_path, "ck", crops=CROPS, val=CROPS[:1], n_epochs=2, seed=3)
    net, meta = load_checkpoint(res.last_path, expect_nchan=2)
    assert meta["net_config"] == TINY.to_dict()
    cfg = TrainConfig(n_epochs=2, batch_size=2, tile=64, learning_rate=0.01, seed=3)
    assert meta["train_config"] == cfg.to_dict()
    assert meta["extra"]["epoch"] == 1
    assert len(meta["extra"]["history"]) == 2
    assert "optimizer" in meta["extra"]
    # Per-crop diameter: median over cells of 2*sqrt(area/pi); diam_labels = their mean.
    per_crop = []
    for crop in CROPS:
        _, counts = np.unique(crop.labels[crop.labels > 0], return_counts=True)
        per_crop.append(np.median(2.0 * np.sqrt(counts / np.pi)))
    assert meta["diam_labels"] == pytest.approx(np.mean(per_crop), rel=1e-5)
    assert res.diam_labels == pytest.approx(np.mean(per_crop), rel=1e-9)
    assert meta["diam_mean"] == 15.0
    # Validation ran at epoch 0 only: best is epoch 0's model.
    assert res.best_epoch == 0
    _, best_meta = load_checkpoint(res.best_path)
    assert best_meta["extra"]["epoch"] == 0 and best_meta["extra"]["kind"] == "best"


def test_save_each_writes_epoch_files_and_nothing_is_overwritten(tmp_path):
    res = _train(tmp_path, "each", n_epochs=3, save_every=2, save_each=True)
    names = sorted(p.name for p in (tmp_path / "models").glob("each*"))
    # Saves at e % 2 == 1 and at the last epoch (2); no validation -> no _best file.
    assert names == ["each_epoch_1.pt", "each_epoch_2.pt", "each_last.pt"]
    assert res.best_path == res.last_path
    before = res.last_path.read_bytes()
    with pytest.raises(InputError, match="refusing to overwrite"):
        _train(tmp_path, "each", n_epochs=1)
    assert res.last_path.read_bytes() == before


def test_warm_start_copies_weights_and_checks_architecture(tmp_path):
    source = GeneSegUNet(TINY)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.5)
    pre = save_checkpoint(tmp_path / "pre.pt", source)
    # One epoch runs at lr 0 (warm-up), so the weights must stay those of the source.
    res = train_network(
        CROPS[:2],
        None,
        TINY,
        TrainConfig(n_epochs=1, batch_size=2, tile=64),
        model_dir=tmp_path / "models",
        model_name="warm",
        pretrained=pre,
    )
    got = _weights(res.last_path)
    want = source.state_dict()
    for key, value in want.items():
        if key.endswith(("weight", "bias")):
            assert torch.equal(got[key], value), key
    other = save_checkpoint(tmp_path / "other.pt", GeneSegUNet(NetConfig(nbase=(8, 16, 32))))
    with pytest.raises(InputError, match="different architecture"):
        train_network(
            CROPS[:2],
            None,
            TINY,
            TrainConfig(n_epochs=1, batch_size=2, tile=64),
            model_dir=tmp_path / "models",
            model_name="bad",
            pretrained=other,
        )
    assert not (tmp_path / "models" / "bad_last.pt").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("bf16", [False, True])
def test_training_on_cuda(tmp_path, bf16):
    res = train_network(
        CROPS[:2],
        CROPS[2:],
        TINY,
        TrainConfig(n_epochs=3, batch_size=2, tile=64, learning_rate=0.01, bf16=bf16),
        device="cuda",
        model_dir=tmp_path,
        model_name="gpu",
    )
    assert all(np.isfinite(h["train_loss"]) for h in res.history)
    net, meta = load_checkpoint(res.last_path, device="cpu")
    assert meta["train_config"]["bf16"] is bf16
    assert net.device.type == "cpu"


def test_bf16_on_cpu_is_ignored_with_a_warning(tmp_path, caplog):
    res = _train(tmp_path, "bf", n_epochs=1, bf16=True)
    assert "only used on CUDA" in caplog.text
    assert np.isfinite(res.history[0]["train_loss"])
