"""Tests for GeneSegNet.model.predict: tiled network pass, resize factors, masks of crops."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from scipy import ndimage
from torch import nn

from GeneSegNet.data.dataset import Crop
from GeneSegNet.data.transforms import pad_to_multiple
from GeneSegNet.dynamics.flow_targets import masks_to_flows
from GeneSegNet.dynamics.masks import renumber
from GeneSegNet.model.net import GeneSegUNet, NetConfig
from GeneSegNet.model.predict import (
    EvalConfig,
    predict_crop,
    prepare_input,
    run_network,
)

TINY = NetConfig(nbase=(8, 16, 16, 16))


class PointwiseNet(nn.Module):
    """Output depends on each pixel alone: (2a + b, a - b, a + 3) for channels (a, b).

    Tiling, blending and padding removal must then give exactly the pointwise map of
    the (resized) image, whatever the tile layout. Records every input shape.
    """

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(nchan=2, size_multiple=8)
        self.shapes: list[tuple[int, ...]] = []
        self.modes: list[bool] = []

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.shapes.append(tuple(x.shape))
        self.modes.append(self.training)
        a, b = x[:, 0], x[:, 1]
        out = torch.stack([2 * a + b, a - b, a + 3], dim=1)
        style = torch.tensor([[3.0, 4.0]]).repeat(x.shape[0], 1)
        return out, style


def pointwise(image: np.ndarray) -> np.ndarray:
    a, b = image[0], image[1]
    return np.stack([2 * a + b, a - b, a + 3])


class LabelNet(nn.Module):
    """Perfect network: cells are the connected components of channel 0 > 0.5; returns
    5x their unit flows and logits +5 inside / -5 outside."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(nchan=2, size_multiple=8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outs = []
        for img in x[:, 0].cpu().numpy():
            labels, _ = ndimage.label(img > 0.5)
            logits = np.where(labels > 0, 5.0, -5.0)[None]
            outs.append(np.concatenate([5.0 * masks_to_flows(labels), logits]))
        style = torch.ones(x.shape[0], 4)
        return torch.from_numpy(np.stack(outs).astype(np.float32)), style


def disk_image(shape: tuple[int, int], centres, radius: float) -> np.ndarray:
    rows, cols = np.indices(shape)
    labels = np.zeros(shape, np.int32)
    for k, (r, c) in enumerate(centres, start=1):
        labels[(rows - r) ** 2 + (cols - c) ** 2 <= radius**2] = k
    return labels


def make_crop(labels: np.ndarray, key: str = "0") -> Crop:
    image = np.where(labels > 0, 200, 0).astype(np.uint8)
    heat = np.zeros(labels.shape, np.uint8)
    return Crop("s", key, image, heat, labels, np.zeros((0, 2), np.int64), Path("x.png"), None)


def tiny_net(seed: int = 0) -> GeneSegUNet:
    torch.manual_seed(seed)
    return GeneSegUNet(TINY).eval()


@pytest.mark.parametrize(
    ("shape", "rescale", "tile"),
    [((50, 70), 1.0, 32), ((300, 90), 1.0625, 224), ((45, 33), 1.5, 48), ((20, 130), 0.7, 64)],
)
def test_tiled_pass_equals_pointwise_map_of_resized_image(rng, shape, rescale, tile):
    image = rng.random((2, *shape)).astype(np.float32)
    net = PointwiseNet()
    cfg = EvalConfig(tile_size=tile, batch_size=3)
    flows, cellprob, style = run_network(net, image, rescale=rescale, cfg=cfg, device="cpu")
    h, w = shape
    if rescale != 1.0:
        size = (int(w * rescale), int(h * rescale))  # cv2 takes (width, height)
        small = np.stack([cv2.resize(c, size, interpolation=cv2.INTER_LINEAR) for c in image])
        out = pointwise(small)
        expect = np.stack([cv2.resize(c, (w, h), interpolation=cv2.INTER_LINEAR) for c in out])
    else:
        expect = pointwise(image)
    assert flows.shape == (2, h, w) and flows.dtype == np.float32
    assert cellprob.shape == (h, w) and cellprob.dtype == np.float32
    np.testing.assert_allclose(flows, expect[:2], atol=2e-5)
    np.testing.assert_allclose(cellprob, expect[2], atol=2e-5)
    np.testing.assert_allclose(style, [0.6, 0.8], atol=1e-6)


def _spec_tile_count(length: int) -> int:
    """Tiles along one axis per spec 7.1 for a padded length (224-px tiles, 10 % overlap)."""
    return 1 if length <= 224 else math.ceil(1.2 * length / 224)


@pytest.mark.parametrize("shape", [(256, 256), (300, 90), (100, 500)])
def test_tile_layout_and_batches_follow_the_spec(shape):
    net = PointwiseNet()
    image = np.zeros((2, *shape), np.float32)
    run_network(net, image, rescale=1.0625, cfg=EvalConfig(batch_size=1), device="cpu")
    padded = []
    for length in shape:
        resized = int(length * 1.0625)
        padded.append(16 * math.ceil(resized / 16) + 16)
    n_tiles = _spec_tile_count(padded[0]) * _spec_tile_count(padded[1])
    assert len(net.shapes) == n_tiles  # batch_size 1: one forward per tile
    assert net.shapes[0][2:] == (min(224, padded[0]), min(224, padded[1]))
    if shape == (256, 256):
        assert padded == [288, 288] and n_tiles == 4  # the worked example of spec 7.1


def test_single_tile_pass_equals_direct_forward(rng):
    net = tiny_net()
    image = rng.random((2, 50, 70)).astype(np.float32)
    flows, cellprob, style = run_network(net, image, rescale=1.0, cfg=EvalConfig(), device="cpu")
    padded, crop = pad_to_multiple(image, 16, 8)
    assert padded.shape[1:] == (80, 96)  # fits one 224 tile
    with torch.no_grad():
        out, direct_style = net(torch.from_numpy(padded)[None])
    out = out[0].numpy()[:, crop[0], crop[1]]
    np.testing.assert_allclose(flows, out[:2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cellprob, out[2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(style, direct_style[0].numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(37, 90), (300, 40), (64, 64)])
def test_real_net_output_shapes_for_odd_sizes(rng, shape):
    net = tiny_net()
    image = rng.random((2, *shape)).astype(np.float32)
    flows, cellprob, style = run_network(
        net, image, rescale=34 / 32, cfg=EvalConfig(), device="cpu"
    )
    assert flows.shape == (2, *shape)
    assert cellprob.shape == shape
    assert style.shape == (16,)
    assert np.isclose(np.linalg.norm(style), 1.0, atol=1e-5)
    assert np.all(np.isfinite(flows)) and np.all(np.isfinite(cellprob))


def test_resample_false_keeps_network_resolution(rng):
    image = rng.random((2, 40, 30)).astype(np.float32)
    flows, cellprob, _ = run_network(
        PointwiseNet(), image, rescale=2.0, cfg=EvalConfig(resample=False), device="cpu"
    )
    assert flows.shape == (2, 80, 60) and cellprob.shape == (80, 60)


def test_train_mode_is_restored_and_forward_runs_in_eval_mode(rng):
    net = PointwiseNet()
    net.train()
    run_network(
        net, rng.random((2, 30, 30)).astype(np.float32), rescale=1.0, cfg=EvalConfig(), device="cpu"
    )
    assert net.modes == [False]
    assert net.training


@pytest.mark.parametrize(
    ("diameter", "diam_labels", "side"),
    [(0.0, 17.0, 144), (34.0, 17.0, 80), (17.0, 30.0, 144), (0.0, 34.0, 80)],
)
def test_resize_factor_uses_diam_labels_when_diameter_is_zero(diameter, diam_labels, side):
    # 64 px crop; factor 2 -> 128 -> padded 144; factor 1 -> 64 -> padded 80
    net = PointwiseNet()
    raw = np.zeros((2, 64, 64), np.float32)
    pred = predict_crop(
        net,
        raw,
        EvalConfig(diameter=diameter),
        diam_mean=34.0,
        diam_labels=diam_labels,
        device="cpu",
    )
    assert net.shapes == [(1, 2, side, side)]
    assert pred.masks.shape == (64, 64)


def test_predict_crop_recovers_cells_of_a_perfect_network():
    labels_a = disk_image((64, 64), [(16, 16), (40, 44), (18, 47)], 7)
    labels_b = disk_image((48, 80), [(20, 20), (25, 60)], 8)
    crops = [make_crop(labels_a, "a"), make_crop(labels_b, "b")]
    preds = [
        predict_crop(LabelNet(), crop, EvalConfig(diameter=34.0), diam_mean=34.0,
                     diam_labels=34.0, device="cpu")
        for crop in crops
    ]
    assert len(preds) == 2
    for pred, labels in zip(preds, (labels_a, labels_b), strict=True):
        assert pred.masks.dtype == np.int32
        assert pred.masks.shape == labels.shape
        assert pred.flows.shape == (2, *labels.shape) and pred.cellprob.shape == labels.shape
        # the same cells, numbered 1..K in raster order of first appearance; upstream's
        # flow following leaves pixels with dY == 0 (a disk's centre row) in place, so
        # cells come back slightly thinned rather than pixel-exact
        truth = renumber(labels, order="first")
        assert pred.masks.max() == truth.max()
        for k in range(1, truth.max() + 1):
            cell, true_cell = pred.masks == k, truth == k
            assert (cell & true_cell).sum() / (cell | true_cell).sum() > 0.85


def test_predict_crop_without_resample_returns_crop_sized_int32_masks():
    labels = disk_image((64, 64), [(20, 20), (42, 40)], 8)
    pred = predict_crop(
        LabelNet(),
        make_crop(labels),
        EvalConfig(diameter=17.0, resample=False),
        diam_mean=34.0,
        diam_labels=34.0,
        device="cpu",
    )
    assert pred.masks.dtype == np.int32 and pred.masks.shape == (64, 64)
    assert pred.flows.shape == (2, 64, 64)
    assert sorted(np.unique(pred.masks)) == [0, 1, 2]
    for centre in ((20, 20), (42, 40)):
        cell = pred.masks == pred.masks[centre]
        truth = labels == labels[centre]
        assert (cell & truth).sum() / (cell | truth).sum() > 0.9


def test_prepare_input_fixed_heatmap_keeps_sparse_spots():
    crop = make_crop(disk_image((64, 64), [(30, 30)], 10))
    crop.heatmap[5, 5] = 255  # one hot pixel: percentile normalisation would zero it
    fixed = prepare_input(crop, EvalConfig())
    upstream = prepare_input(crop, EvalConfig(heatmap_mode="percentile"))
    assert fixed[1, 5, 5] == 1.0 and fixed[1].sum() == 1.0
    assert not upstream[1].any()
    raw = prepare_input(crop, EvalConfig(normalize=False))
    assert raw[0].max() == 200.0 and raw[1, 5, 5] == 255.0


def test_eval_config_rejects_bad_values():
    with pytest.raises(ValueError, match="diameter"):
        EvalConfig(diameter=-1)
    with pytest.raises(ValueError, match="invert needs normalisation"):
        EvalConfig(invert=True, normalize=False)
    with pytest.raises(ValueError, match="heatmap_mode"):
        EvalConfig(heatmap_mode="max")


@pytest.mark.gpu
def test_cuda_pass_matches_cpu(rng):
    net = tiny_net()
    raw = (rng.random((2, 70, 50)) * 255).astype(np.float32)
    cfg = EvalConfig()
    cpu = predict_crop(net, raw, cfg, diam_mean=34.0, diam_labels=34.0, device="cpu")
    gpu_net = tiny_net().to("cuda")
    gpu = predict_crop(gpu_net, raw, cfg, diam_mean=34.0, diam_labels=34.0, device="cuda")
    assert gpu.masks.dtype == np.int32 and gpu.masks.shape == (70, 50)
    # cuDNN may use TF32 convolutions: compare loosely
    np.testing.assert_allclose(gpu.flows, cpu.flows, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(gpu.cellprob, cpu.cellprob, rtol=1e-2, atol=1e-2)
