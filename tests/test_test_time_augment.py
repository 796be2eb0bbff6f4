"""Test-time augmentation (``--augment``): the network's outputs averaged over the four
flips of each tile, each flipped back with the sign of its flow component turned."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from GeneSegNet.model.predict import EvalConfig, forward_tiles, run_network


class GradientNet(nn.Module):
    """Outputs (dY, dX, logit) = central differences of channel 0 along rows and columns
    (zero padding) and channel 0 itself: exactly flip-equivariant, with flows that change
    sign under the flip of their axis."""

    def __init__(self) -> None:
        super().__init__()
        kernel = torch.tensor([-0.5, 0.0, 0.5])
        self.register_buffer("k_rows", kernel.view(1, 1, 3, 1))
        self.register_buffer("k_cols", kernel.view(1, 1, 1, 3))

    def forward(self, x: torch.Tensor):
        first = x[:, :1]
        d_rows = nn.functional.conv2d(first, self.k_rows, padding=(1, 0))
        d_cols = nn.functional.conv2d(first, self.k_cols, padding=(0, 1))
        return torch.cat([d_rows, d_cols, first], 1), first.mean(dim=(2, 3))


class SkewNet(nn.Module):
    """Not flip-equivariant: weights that differ by position."""

    def __init__(self, size: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("w", torch.rand(3, size, size, generator=generator))

    def forward(self, x: torch.Tensor):
        out = x[:, :1] * self.w[None] + x[:, 1:2].flip(-1)
        return out, out.mean(dim=(2, 3))


def _tiles(n=3, size=32, seed=1) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 2, size, size)).astype(np.float32)


def test_augment_leaves_an_equivariant_network_unchanged():
    tiles = _tiles()
    plain, _ = forward_tiles(GradientNet(), tiles, 2, "cpu")
    flipped, _ = forward_tiles(GradientNet(), tiles, 2, "cpu", augment=True)
    assert np.abs(plain[:, :2]).mean() > 0.05  # flows that a wrong sign would cancel
    np.testing.assert_allclose(flipped, plain, atol=1e-6)


def test_augment_is_the_mean_of_the_four_flipped_back_outputs():
    """Brute-force reference: each flip run by hand, flipped back, flows negated."""
    tiles = _tiles()
    net = SkewNet(32)
    expected = []
    for flip_rows in (False, True):
        for flip_cols in (False, True):
            x = tiles[..., ::-1, :] if flip_rows else tiles
            x = x[..., ::-1] if flip_cols else x
            with torch.no_grad():
                y = net(torch.from_numpy(np.ascontiguousarray(x)))[0].numpy()
            y = y[..., ::-1, :] if flip_rows else y
            y = (y[..., ::-1] if flip_cols else y).copy()
            y[:, 0] *= -1 if flip_rows else 1
            y[:, 1] *= -1 if flip_cols else 1
            expected.append(y)
    got, _ = forward_tiles(net, tiles, 2, "cpu", augment=True)
    np.testing.assert_allclose(got, np.mean(expected, axis=0), rtol=1e-5, atol=1e-6)
    plain, _ = forward_tiles(net, tiles, 2, "cpu")
    assert not np.allclose(got, plain, atol=1e-3)


def test_run_network_passes_the_setting_through():
    image = np.random.default_rng(2).random((2, 48, 40)).astype(np.float32)
    net = SkewNet(64)  # tiles of 64 px cover the padded image in one
    cfg = EvalConfig(tile_size=64, batch_size=4)
    plain = run_network(net, image, rescale=1.0, cfg=cfg, device="cpu")
    again = run_network(net, image, rescale=1.0, cfg=cfg, device="cpu")
    flipped = run_network(net, image, rescale=1.0,
                          cfg=EvalConfig(tile_size=64, batch_size=4, augment=True),
                          device="cpu")
    np.testing.assert_array_equal(plain[0], again[0])
    assert not np.allclose(plain[0], flipped[0], atol=1e-3)


def test_inference_script_flag_reaches_every_window(tmp_path, monkeypatch):
    """``--augment`` on Inference/slidingwindows_gradient.py: recorded in the run's config
    and passed to every window batch, in memory and out of core."""
    import json

    import GeneSegNet.slide.windows as windows
    from tests.tiny_runs import inference_runner, tiny_slides

    raw, model = tiny_slides(tmp_path)
    run = inference_runner(raw, model)
    seen = []
    original = windows.forward_tiles

    def spy(net, tiles, batch_size, device, augment=False):
        seen.append(augment)
        return original(net, tiles, batch_size, device, augment)

    monkeypatch.setattr(windows, "forward_tiles", spy)
    for out, extra in (("plain", []), ("tta", ["--augment"]),
                       ("tta_ooc", ["--augment", "--out_of_core", "on"])):
        seen.clear()
        assert run(tmp_path / out, *extra) == 0
        config = json.loads((tmp_path / out / "slidingwindows_gradient_config.json")
                            .read_text())
        assert config["slide"]["evaluation"]["augment"] is bool(extra)
        assert seen and set(seen) == {bool(extra)}
