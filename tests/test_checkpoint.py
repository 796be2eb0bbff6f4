"""GeneSegNet.model.checkpoint: round trips, upstream state dicts, refusal of bad files."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

import GeneSegNet
from GeneSegNet.errors import InputError
from GeneSegNet.model import checkpoint as ckpt_mod
from GeneSegNet.model.checkpoint import load_checkpoint, save_checkpoint
from GeneSegNet.model.net import GeneSegUNet, NetConfig


def _net(cfg: NetConfig | None = None, seed: int = 0) -> GeneSegUNet:
    """A network with random weights and non-trivial BN statistics, in eval mode."""
    torch.manual_seed(seed)
    net = GeneSegUNet(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.num_batches_tracked.fill_(7)
        net.diam_labels.fill_(17.25)
    return net.eval()


def _outputs(net: GeneSegUNet, nchan: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(1, nchan, 32, 32, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        return net(x.to(net.device))


class _Sneaky:
    """Harmless stand-in for a malicious pickle: unpickling would call ``list()``."""

    def __reduce__(self):
        return (list, ())


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize(
    "cfg",
    [
        NetConfig(),
        NetConfig(nchan=4, style_on=False, diam_mean=30.0),
        NetConfig(concatenation=True, upsample_mode="nearest"),
        NetConfig(residual_on=False),
    ],
)
def test_save_load_reproduces_outputs_bit_for_bit(tmp_path, cfg):
    net = _net(cfg)
    path = save_checkpoint(tmp_path / "model", net, train_config={"lr": 1e-3}, extra={"epoch": 5})
    assert path == tmp_path / "model" and path.is_file()
    loaded, meta = load_checkpoint(path)
    assert not loaded.training
    assert loaded.config == cfg
    out0, s0 = _outputs(net, cfg.nchan)
    out1, s1 = _outputs(loaded, cfg.nchan)
    assert torch.equal(out0, out1) and torch.equal(s0, s1)
    assert meta["source"] == "genesegnet"
    assert meta["net_config"] == cfg.to_dict()
    assert meta["diam_mean"] == cfg.diam_mean and meta["diam_labels"] == 17.25
    assert meta["train_config"] == {"lr": 1e-3}
    assert meta["extra"] == {"epoch": 5}
    assert meta["package_version"] == GeneSegNet.__version__ and meta["format_version"] == 1


def test_checkpoint_is_readable_with_plain_weights_only_load(tmp_path):
    net = _net()
    opt = torch.optim.AdamW(net.output.parameters(), lr=1e-3)  # small optimizer state
    net.output(torch.randn(2, 32, 4, 4)).square().mean().backward()
    opt.step()
    train_config = {"save_dir": tmp_path / "x", "n": np.int64(3), "arr": np.arange(3)}
    path = save_checkpoint(
        tmp_path / "m.pth", net, train_config=train_config, extra={"optimizer": opt.state_dict()}
    )
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "GeneSegNet-checkpoint" and raw["version"] == 1
    assert raw["net_config"] == NetConfig().to_dict()
    assert raw["train_config"]["save_dir"] == str(tmp_path / "x")
    assert raw["train_config"]["n"] == 3 and torch.equal(
        raw["train_config"]["arr"], torch.arange(3)
    )
    assert set(raw["state_dict"]) == set(net.state_dict())
    _, meta = load_checkpoint(path)
    restored = torch.optim.AdamW(GeneSegUNet().output.parameters(), lr=1e-3)
    restored.load_state_dict(meta["extra"]["optimizer"])  # a usable optimizer state
    exp_avg = restored.state_dict()["state"][0]["exp_avg"]
    assert torch.equal(exp_avg, opt.state_dict()["state"][0]["exp_avg"])


def test_save_refuses_unsafe_extras_and_reserved_keys(tmp_path):
    net = GeneSegUNet()
    with pytest.raises(TypeError, match="train_config"):
        save_checkpoint(tmp_path / "a", net, train_config={"obj": object()})
    with pytest.raises(ValueError, match="state_dict"):
        save_checkpoint(tmp_path / "b", net, extra={"state_dict": {}})
    assert list(tmp_path.iterdir()) == []


def test_interrupted_save_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "model", _net(seed=0))
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, _net(seed=1))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_load_on_requested_device(tmp_path):
    path = save_checkpoint(tmp_path / "m", _net())
    net, _ = load_checkpoint(path, device=torch.device("cpu"))
    assert net.device == torch.device("cpu")


# ---------------------------------------------------------------- upstream state dicts


@pytest.mark.parametrize(
    "cfg",
    [NetConfig(diam_mean=30.0), NetConfig(nchan=4), NetConfig(concatenation=True)],
)
def test_bare_upstream_state_dict_loads_and_reproduces(tmp_path, cfg):
    net = _net(cfg)  # style on, bilinear: how upstream ran every model
    path = tmp_path / "upstream_model"
    torch.save(net.state_dict(), path)  # upstream's save format (spec §3.3)
    loaded, meta = load_checkpoint(path)
    assert meta["source"] == "upstream-state-dict"
    assert loaded.config == cfg  # nchan, concatenation and diam_mean inferred
    assert meta["diam_mean"] == cfg.diam_mean and meta["diam_labels"] == 17.25
    assert meta["train_config"] is None and meta["extra"] == {}
    out0, s0 = _outputs(net, cfg.nchan)
    out1, s1 = _outputs(loaded, cfg.nchan)
    assert torch.equal(out0, out1) and torch.equal(s0, s1)


def test_bare_state_dict_of_style_off_net_loads_with_style_on(tmp_path):
    net = _net(NetConfig(style_on=False))
    torch.save(net.state_dict(), tmp_path / "m")
    loaded, meta = load_checkpoint(tmp_path / "m")
    assert loaded.config.style_on and meta["net_config"]["style_on"] is True


# ---------------------------------------------------------------- refusals


def _assert_refused(path: Path, match: str, **kwargs) -> InputError:
    with pytest.raises(InputError, match=match) as info:
        load_checkpoint(path, **kwargs)
    assert str(path) in str(info.value)
    assert info.value.path == path
    return info.value


def test_missing_file(tmp_path):
    _assert_refused(tmp_path / "nope", "not found")


def test_random_bytes_truncated_and_corrupted_files(tmp_path):
    rng = np.random.default_rng(0)
    good = save_checkpoint(tmp_path / "good", _net()).read_bytes()
    cases = {
        "random": rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        "empty": b"",
        "text": b"hello, this is not a checkpoint\n",
        "truncated": good[: len(good) // 2],
    }
    corrupted = bytearray(good)
    corrupted[100:4000] = rng.integers(0, 256, 3900, dtype=np.uint8).tobytes()
    cases["corrupted"] = bytes(corrupted)
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        _assert_refused(tmp_path / name, "not a readable torch checkpoint")


def test_pickle_with_custom_object_is_refused(tmp_path):
    path = tmp_path / "sneaky"
    net = _net()
    torch.save({"state_dict": net.state_dict(), "payload": _Sneaky()}, path)
    assert isinstance(pickle.loads(pickle.dumps(_Sneaky())), list)  # what it would run
    _assert_refused(path, "unsafe checkpoint")

    path2 = tmp_path / "sneaky_bare"
    sd = dict(net.state_dict())
    sd["diam_mean"] = _Sneaky()
    torch.save(sd, path2)
    _assert_refused(path2, "unsafe checkpoint")


def test_non_dict_and_foreign_dicts_are_refused(tmp_path):
    torch.save(torch.zeros(3), tmp_path / "tensor")
    _assert_refused(tmp_path / "tensor", "not a GeneSegNet checkpoint")
    torch.save({"foo": torch.zeros(3)}, tmp_path / "foreign")
    _assert_refused(tmp_path / "foreign", "not a GeneSegNet checkpoint")
    torch.save({"format": "something-else", "state_dict": {}}, tmp_path / "fmt")
    _assert_refused(tmp_path / "fmt", "unknown checkpoint format")


def test_wrong_architecture_state_dicts_are_refused(tmp_path):
    sd = dict(_net().state_dict())
    del sd["upsample.up.res_up_2.conv.conv_3.full.bias"]
    torch.save(sd, tmp_path / "missing")
    err = _assert_refused(tmp_path / "missing", "missing keys")
    assert "res_up_2.conv.conv_3.full.bias" in str(err)

    sd = dict(_net().state_dict())
    sd["extra_layer.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "unexpected")
    _assert_refused(tmp_path / "unexpected", "unexpected keys.*extra_layer.weight")

    sd = dict(_net().state_dict())
    sd["upsample.up.res_up_1.proj.1.weight"] = torch.zeros(64, 128, 3, 3)
    torch.save(sd, tmp_path / "shape")
    _assert_refused(tmp_path / "shape", r"shape mismatches.*res_up_1\.proj\.1\.weight")


def test_our_format_with_mismatched_config_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "m", _net(NetConfig(nchan=2)))
    raw = torch.load(path, weights_only=True)
    raw["net_config"]["nchan"] = 4
    torch.save(raw, tmp_path / "m4")
    _assert_refused(tmp_path / "m4", r"do not match the architecture.*shape mismatches")
    raw["net_config"]["bogus"] = 1
    torch.save(raw, tmp_path / "bogus")
    _assert_refused(tmp_path / "bogus", "bad net_config.*bogus")
    raw["version"] = 2
    torch.save(raw, tmp_path / "v2")
    _assert_refused(tmp_path / "v2", "version 2 is not supported")


def test_expect_nchan_mismatch(tmp_path):
    path = save_checkpoint(tmp_path / "m", _net(NetConfig(nchan=4)))
    _assert_refused(path, "checkpoint has 4 input channels but --chan 2 was given", expect_nchan=2)
    net, _ = load_checkpoint(path, expect_nchan=4)
    assert net.config.nchan == 4
    torch.save(_net().state_dict(), tmp_path / "bare")
    _assert_refused(tmp_path / "bare", "has 2 input channels but --chan 4", expect_nchan=4)


@pytest.mark.gpu
def test_load_to_cuda(tmp_path):
    net = _net()
    path = save_checkpoint(tmp_path / "m", net.to("cuda"))
    loaded, _ = load_checkpoint(path, device="cuda")
    assert loaded.device.type == "cuda"
    stored = torch.load(path, weights_only=True)["state_dict"]
    assert all(v.device.type == "cpu" for v in stored.values())
    torch.testing.assert_close(_outputs(loaded)[0], _outputs(net)[0])


def test_save_creates_parent_folders(tmp_path):
    save_checkpoint(tmp_path / "sub" / "dir" / "model", _net())
    assert sorted(os.listdir(tmp_path / "sub" / "dir")) == ["model"]
