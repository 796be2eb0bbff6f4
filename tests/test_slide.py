"""Whole-slide window pass: grid, heatmap and normalisation semantics, seams, agreement."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from GeneSegNet.data.heatmap import heatmap_to_uint8, render_heatmap
from GeneSegNet.data.transforms import normalize99
from GeneSegNet.dynamics.reconstruct import compute_masks
from GeneSegNet.evaluation.metrics import match
from GeneSegNet.model.net import GeneSegUNet, NetConfig
from GeneSegNet.model.predict import EvalConfig, prepare_input, run_network
from GeneSegNet.slide.blockwise import reconstruct_blockwise
from GeneSegNet.slide.plan import SlideConfig, plan_windows, upstream_stride, window_starts
from GeneSegNet.slide.windows import SpotIndex, channel_percentiles, predict_slide
from tests.test_blockwise import masks_cut_along, network_like, tissue

NO_RESIZE = EvalConfig(diameter=34.0)  # diam_mean 34 / diameter 34: windows are not resized


class EchoNet(nn.Module):
    """Stand-in network whose outputs are its inputs: (image, image, heatmap)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(nchan=2, size_multiple=8)

    def forward(self, x):
        return torch.stack([x[:, 0], x[:, 0], x[:, -1]], dim=1), torch.ones(len(x), 4)


class LocalNet(nn.Module):
    """Stand-in network: a 3×3 mean of the first 3 input channels, zero-padded, so its
    outputs near a window edge are wrong, as a real network's are."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(nchan=4, size_multiple=8)

    def forward(self, x):
        return F.avg_pool2d(x[:, :3], 3, stride=1, padding=1), torch.ones(len(x), 4)


def run(net, image, spots, cfg, diam_labels=0.0):
    rows, cols = spots
    index = SpotIndex(rows, cols, image.shape[:2], bin_size=64)
    return predict_slide(
        net, image, index, cfg, diam_mean=34.0, diam_labels=diam_labels, device="cpu"
    )


def random_spots(rng, shape, n):
    return rng.integers(0, shape[0], n), rng.integers(0, shape[1], n)


def test_window_starts_follow_spec_examples():
    assert window_starts(256, 256, 240).tolist() == [0]
    assert window_starts(200, 256, 240).tolist() == [0]  # padded to one window
    assert window_starts(500, 256, 240).tolist() == [0, 240, 244]  # 240 + 256 < 500
    assert window_starts(736, 256, 240).tolist() == [0, 240, 480]
    assert window_starts(737, 256, 240).tolist() == [0, 240, 480, 481]
    assert [upstream_stride(n) for n in (200, 256, 257, 5000)] == [256, 256, 240, 240]


@pytest.mark.parametrize("length", [257, 300, 511, 1000, 1234])
@pytest.mark.parametrize("stride", [60, 192, 240])
def test_window_starts_cover_the_axis_with_as_few_windows_as_needed(length, stride):
    starts = window_starts(length, 256, stride)
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s : s + 256] = True
    assert covered.all() and starts[-1] == length - 256
    assert (np.diff(starts) <= stride).all() and (np.diff(starts) > 0).all()
    assert (len(starts) - 2) * stride + 256 < length  # one window fewer would not reach


def test_upstream_grid_is_row_major_with_stride_240():
    plan = plan_windows((500, 737), SlideConfig(window_local=True), diam_mean=34.0, diam_labels=0.0)
    assert plan.stride == (240, 240)
    assert plan.starts == [(r, c) for r in (0, 240, 244) for c in (0, 240, 480, 481)]
    small = plan_windows(
        (200, 300), SlideConfig(window_local=True), diam_mean=34.0, diam_labels=0.0
    )
    assert small.stride == (256, 240) and small.starts == [(0, 0), (0, 44)]


def test_global_grid_overlaps_by_two_cell_diameters():
    plan = plan_windows((1000, 1000), SlideConfig(), diam_mean=34.0, diam_labels=0.0)
    assert plan.diameter == pytest.approx(32.0)  # default diameter 32
    assert plan.stride == (192, 192) and plan.net_size == 272  # 256 * 34/32
    assert plan.border == 8  # 8 network px of zeros around the image: ceil(8 / 1.0625)
    assert [c for r, c in plan.starts if r == -8] == [-8, 184, 376, 568, 752]
    own = plan_windows(
        (1000, 1000),
        SlideConfig(evaluation=EvalConfig(diameter=0)),
        diam_mean=34.0,
        diam_labels=20.0,
    )
    assert own.stride == (216, 216) and own.net_size == 432  # 256 * 34/20 = 435 -> 432
    with pytest.raises(ValueError, match="overlap"):
        plan_windows((1000, 1000), SlideConfig(window=64), diam_mean=34.0, diam_labels=0.0)


def test_spot_index_query_matches_brute_force(rng):
    shape = (700, 500)
    rows, cols = random_spots(rng, shape, 3000)
    index = SpotIndex(rows, cols, shape, bin_size=64)
    for _ in range(30):
        r0, c0 = rng.integers(-100, 700), rng.integers(-100, 500)
        r1, c1 = r0 + rng.integers(1, 300), c0 + rng.integers(1, 300)
        got_r, got_c = index.query(r0, r1, c0, c1)
        want = (rows >= r0) & (rows < r1) & (cols >= c0) & (cols < c1)
        assert sorted(zip(got_r.tolist(), got_c.tolist(), strict=True)) == sorted(
            zip(rows[want].tolist(), cols[want].tolist(), strict=True)
        )


def test_global_heatmap_is_the_whole_image_heatmap(rng):
    shape = (300, 410)
    spots = random_spots(rng, shape, 400)
    image = rng.integers(0, 255, shape).astype(np.uint8)
    cfg = SlideConfig(window=128, canvas_dtype="float32", evaluation=NO_RESIZE)
    field = run(EchoNet(), image, spots, cfg).field
    expected = heatmap_to_uint8(render_heatmap(*spots, shape, 7.0)) / 255.0
    np.testing.assert_allclose(field[2], expected, atol=1e-6)


def test_window_local_heatmap_is_upstreams_per_window_average(rng):
    shape = (300, 410)
    spots = random_spots(rng, shape, 400)
    image = rng.integers(0, 255, shape).astype(np.uint8)
    cfg = SlideConfig(window=128, window_local=True, canvas_dtype="float32", evaluation=NO_RESIZE)
    result = run(EchoNet(), image, spots, cfg)
    total, count = np.zeros(shape), np.zeros(shape)
    rows, cols = spots
    for r0, c0 in result.plan.starts:  # spots inside the window only; plain mean
        inside = (rows >= r0) & (rows < r0 + 128) & (cols >= c0) & (cols < c0 + 128)
        heat = render_heatmap(rows[inside] - r0, cols[inside] - c0, (128, 128), 7.0)
        total[r0 : r0 + 128, c0 : c0 + 128] += heatmap_to_uint8(heat) / 255.0
        count[r0 : r0 + 128, c0 : c0 + 128] += 1
    np.testing.assert_allclose(result.field[2], total / count, atol=1e-6)
    whole = heatmap_to_uint8(render_heatmap(rows, cols, shape, 7.0)) / 255.0
    assert np.abs(result.field[2] - whole).max() > 0.2  # window-local maps miss spots


def test_global_percentile_heatmap_is_one_affine_map(rng):
    shape = (300, 410)
    spots = random_spots(rng, shape, 3000)
    image = rng.integers(0, 255, shape).astype(np.uint8)
    ev = EvalConfig(diameter=34.0, heatmap_mode="percentile")
    field = run(
        EchoNet(), image, spots, SlideConfig(window=128, canvas_dtype="float32", evaluation=ev)
    ).field
    heat = heatmap_to_uint8(render_heatmap(*spots, shape, 7.0)).astype(np.float64)
    slope, offset = np.polyfit(heat.ravel(), field[2].ravel(), 1)
    assert slope > 0
    np.testing.assert_allclose(field[2], slope * heat + offset, atol=1e-4)  # no seams


def test_one_normalisation_for_the_whole_image(rng):
    shape = (300, 410)
    gradient = np.linspace(0, 150, shape[1])[None, :] + rng.normal(0, 10, shape)
    image = np.clip(gradient + 50, 0, 255).astype(np.uint8)
    spots = random_spots(rng, shape, 50)
    glob = run(
        EchoNet(),
        image,
        spots,
        SlideConfig(window=128, canvas_dtype="float32", evaluation=NO_RESIZE),
    )
    np.testing.assert_allclose(glob.field[0], normalize99(image), atol=1e-5)
    local = run(
        EchoNet(),
        image,
        spots,
        SlideConfig(window=128, window_local=True, canvas_dtype="float32", evaluation=NO_RESIZE),
    )
    assert np.abs(local.field[0] - normalize99(image)).max() > 0.3  # per-window stretch


def test_channel_percentiles_on_a_subsample_are_close(rng):
    image = rng.gamma(2.0, 30.0, size=(1500, 1200)).astype(np.float32)
    exact = np.percentile(image, [1, 99])
    np.testing.assert_allclose(channel_percentiles(image, 10**7)[0], exact, rtol=1e-6)
    approx = channel_percentiles(image, 200_000)[0]
    assert np.abs(approx - exact).max() < 0.01 * (exact[1] - exact[0])


def segment_whole_and_tiled(masks):
    """Masks from a whole-image pass and from 64-px windows with 96-px blocks."""
    flows, logits = network_like(masks, 0.5, seed=12)
    image = np.moveaxis(np.concatenate([flows, logits[None]]), 0, -1)  # "network input"
    ev = EvalConfig(diameter=34.0, normalize=False)
    none = (np.zeros(0, int), np.zeros(0, int))
    whole = run(  # one window: the image and its 8-px zero border
        LocalNet(), image, none, SlideConfig(window=272, canvas_dtype="float32", evaluation=ev)
    )
    windows = run(LocalNet(), image, none, SlideConfig(window=64, overlap=32, evaluation=ev))
    assert len(whole.plan.starts) == 1 and len(windows.plan.starts) == 64
    reference = compute_masks(whole.flows, whole.cellprob)
    tiled = reconstruct_blockwise(windows.flows, windows.cellprob, block_size=96, halo=40)
    starts = sorted({r for r, _ in windows.plan.starts})
    lines = {s for s in starts if s > 0} | {s + 64 for s in starts if s + 64 < 256} | {96, 192}
    naive = reconstruct_blockwise(windows.flows, windows.cellprob, block_size=64, halo=0)
    return reference, tiled, naive, sorted(lines)


def test_windows_and_blocks_agree_with_the_whole_image():
    masks = tissue(256, 16.0, seed=11)  # touching cells
    reference, tiled, _, _ = segment_whole_and_tiled(masks)
    assert reference.max() > 150
    assert match(reference, tiled, thresholds=(0.5,)).ap[0.5] >= 0.98
    assert match(masks, tiled, thresholds=(0.5,)).ap[0.5] >= 0.9


def test_no_mask_is_cut_along_window_or_block_lines():
    masks = tissue(256, 16.0, seed=15, reach=0.35, jitter=0.1)  # separate disks
    reference, tiled, naive, lines = segment_whole_and_tiled(masks)
    assert reference.max() > 150
    assert masks_cut_along(tiled, lines, lines) == set()
    # Controls: real cells are not flagged; cells cut by context-free blocks are.
    assert masks_cut_along(reference, lines, lines) == set()
    assert len(masks_cut_along(naive, lines, lines)) >= 5


def test_real_network_runs_in_batches_on_padded_images():
    torch.manual_seed(0)
    net = GeneSegUNet(NetConfig(nbase=(8, 16, 16, 16)))
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (90, 300)).astype(np.uint8)  # shorter than a window
    cfg = SlideConfig(window=128, evaluation=EvalConfig(batch_size=3))
    result = run(net, image, random_spots(rng, image.shape, 100), cfg)
    assert result.field.shape == (3, 90, 300) and result.field.dtype == np.float16
    assert np.isfinite(result.field.astype(np.float32)).all()
    assert {r for r, _ in result.plan.starts} == {-8}  # one row of windows, padded


def test_global_mode_on_a_small_image_equals_the_per_crop_network_pass(rng):
    torch.manual_seed(1)
    net = GeneSegUNet(NetConfig(nbase=(8, 16, 16, 16))).eval()
    shape = (208, 208)  # + 8 px of zeros per side = one 224-px window = one 224-px tile
    image = rng.integers(0, 255, shape).astype(np.uint8)
    rows, cols = random_spots(rng, shape, 300)
    result = run(
        net,
        image,
        (rows, cols),
        SlideConfig(window=224, canvas_dtype="float32", evaluation=NO_RESIZE),
    )
    assert result.plan.starts == [(-8, -8)]
    heat = heatmap_to_uint8(render_heatmap(rows, cols, shape, 7.0))
    crop = prepare_input(np.stack([image, heat]).astype(np.float32), NO_RESIZE)
    flows, cellprob, _ = run_network(net, crop, rescale=1.0, cfg=NO_RESIZE, device="cpu")
    np.testing.assert_allclose(result.flows, flows, atol=1e-5)
    np.testing.assert_allclose(result.cellprob, cellprob, atol=1e-5)


@pytest.mark.gpu
def test_cuda_agrees_with_cpu():
    masks = tissue(192, 16.0, seed=13)
    flows, logits = network_like(masks, 0.5, seed=14)
    image = np.moveaxis(np.concatenate([flows, logits[None]]), 0, -1)
    cfg = SlideConfig(window=64, overlap=32, evaluation=EvalConfig(diameter=34.0, normalize=False))
    index = SpotIndex(np.zeros(0, int), np.zeros(0, int), image.shape[:2])
    out = {}
    for device in ("cpu", "cuda"):
        field = predict_slide(
            LocalNet().to(device), image, index, cfg, diam_mean=34.0, diam_labels=0.0, device=device
        )
        out[device] = reconstruct_blockwise(
            field.flows, field.cellprob, block_size=96, halo=40, device=device
        )
    assert match(out["cpu"], out["cuda"], thresholds=(0.5,)).ap[0.5] >= 0.98
