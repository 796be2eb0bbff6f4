"""Tests for GeneSegNet.model.net: size, key layout and forward semantics of spec §3."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from GeneSegNet.model.net import GeneSegUNet, NetConfig

# ---------------------------------------------------------------- helpers


def _randomise(net: GeneSegUNet, seed: int = 0) -> GeneSegUNet:
    """Give every BN non-trivial affine weights and running stats (eval mode matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.1 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return net.eval()


def _bc(sd: dict, p: str, x: torch.Tensor, relu: bool = True) -> torch.Tensor:
    """BN (eval) [→ ReLU] → conv, with the conv at index 2 (batchconv) or 1 (batchconv0)."""
    y = F.batch_norm(
        x, sd[p + ".0.running_mean"], sd[p + ".0.running_var"],
        sd[p + ".0.weight"], sd[p + ".0.bias"], False, 0.0, 1e-5,
    )  # fmt: skip
    c = ".2" if relu else ".1"
    if relu:
        y = torch.relu(y)
    w = sd[p + c + ".weight"]
    return F.conv2d(y, w, sd[p + c + ".bias"], padding=w.shape[-1] // 2)


def _bcs(sd: dict, p: str, style: torch.Tensor, x: torch.Tensor, skip=None) -> torch.Tensor:
    if skip is not None:
        x = x + skip
    feat = F.linear(style, sd[p + ".full.weight"], sd[p + ".full.bias"])
    return _bc(sd, p + ".conv", x + feat[:, :, None, None])


def _reference_forward(sd: dict, x: torch.Tensor, style_on: bool, mode: str):
    """Spec §3.1 written out with functional ops on the state dict (additive skips)."""
    xd = []
    for n in range(4):
        p = f"downsample.down.res_down_{n}"
        h = x if n == 0 else F.max_pool2d(xd[-1], 2)
        x1 = _bc(sd, p + ".proj", h, relu=False) + _bc(
            sd, p + ".conv.conv_1", _bc(sd, p + ".conv.conv_0", h)
        )
        xd.append(x1 + _bc(sd, p + ".conv.conv_3", _bc(sd, p + ".conv.conv_2", x1)))
    s = xd[3].mean(dim=(2, 3))
    s = s / s.norm(dim=1, keepdim=True)
    feed = s if style_on else torch.zeros_like(s)
    y = xd[3]
    for n in (3, 2, 1, 0):
        p = f"upsample.up.res_up_{n}"
        if n < 3:
            kw = {"align_corners": False} if mode == "bilinear" else {}
            y = F.interpolate(y, scale_factor=2, mode=mode, **kw)
        c = p + ".conv"
        y1 = _bc(sd, p + ".proj", y, relu=False) + _bcs(
            sd, c + ".conv_1", feed, _bc(sd, c + ".conv_0", y), skip=xd[n]
        )
        y = y1 + _bcs(sd, c + ".conv_3", feed, _bcs(sd, c + ".conv_2", feed, y1))
    return _bc(sd, "output", y), s


def _analytic_param_count(nchan: int, nbase=(32, 64, 128, 256), nout=3, concat=False) -> int:
    """Parameter count from the block formulas of spec §3.1 (BN has 2 per channel)."""

    def bc(i, o, k):  # BN(i) + conv k×k with bias
        return 2 * i + i * o * k * k + o

    def bcs(i, o, s, m=1):  # Linear(s → m·o) + batchconv(m·i → o)
        return s * m * o + m * o + bc(m * i, o, 3)

    def resdown(i, o):
        return bc(i, o, 1) + bc(i, o, 3) + 3 * bc(o, o, 3)

    def resup(i, o, s):
        return bc(i, o, 3) + bcs(o, o, s, 2 if concat else 1) + 2 * bcs(o, o, s) + bc(i, o, 1)

    widths = [nchan, *nbase]
    up = [*nbase, nbase[-1]]
    total = sum(resdown(widths[n], widths[n + 1]) for n in range(4))
    total += sum(resup(up[n + 1], up[n], nbase[-1]) for n in range(4))
    return total + bc(nbase[0], nout, 1) + 2  # head + diam_mean + diam_labels


def _np_bilinear_up2(a: np.ndarray) -> np.ndarray:
    """×2 bilinear upsampling with half-pixel centres (align_corners=False), by hand."""

    def axis_weights(n):
        src = np.clip((np.arange(2 * n) + 0.5) / 2 - 0.5, 0, None)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n - 1)
        return i0, i1, src - i0

    r0, r1, wr = axis_weights(a.shape[0])
    c0, c1, wc = axis_weights(a.shape[1])
    top = a[r0][:, c0] * (1 - wc) + a[r0][:, c1] * wc
    bot = a[r1][:, c0] * (1 - wc) + a[r1][:, c1] * wc
    return top * (1 - wr)[:, None] + bot * wr[:, None]


# ---------------------------------------------------------------- size and layout


def test_parameter_count_and_state_dict_entries_nchan2():
    net = GeneSegUNet(NetConfig(nchan=2))
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == 6_600_845
    assert n_params == _analytic_param_count(2)
    assert len(net.state_dict()) == 313


@pytest.mark.parametrize(
    "cfg", [NetConfig(nchan=4), NetConfig(concatenation=True), NetConfig(nchan=3, nout=5)]
)
def test_parameter_count_matches_formula_for_variants(cfg):
    net = GeneSegUNet(cfg)
    expected = _analytic_param_count(cfg.nchan, nout=cfg.nout, concat=cfg.concatenation)
    assert sum(p.numel() for p in net.parameters()) == expected


UPSTREAM_KEY_PATTERNS = [
    r"downsample\.down\.res_down_[0-3]\.proj\.0\.(weight|bias|running_mean|running_var|num_batches_tracked)",
    r"downsample\.down\.res_down_[0-3]\.proj\.1\.(weight|bias)",
    r"downsample\.down\.res_down_[0-3]\.conv\.conv_[0-3]\.0\.(weight|bias|running_mean|running_var|num_batches_tracked)",
    r"downsample\.down\.res_down_[0-3]\.conv\.conv_[0-3]\.2\.(weight|bias)",
    r"upsample\.up\.res_up_[0-3]\.conv\.conv_0\.0\.(weight|bias|running_mean|running_var|num_batches_tracked)",
    r"upsample\.up\.res_up_[0-3]\.conv\.conv_0\.2\.(weight|bias)",
    r"upsample\.up\.res_up_[0-3]\.conv\.conv_[1-3]\.conv\.0\.(weight|bias|running_mean|running_var|num_batches_tracked)",
    r"upsample\.up\.res_up_[0-3]\.conv\.conv_[1-3]\.conv\.2\.(weight|bias)",
    r"upsample\.up\.res_up_[0-3]\.conv\.conv_[1-3]\.full\.(weight|bias)",
    r"upsample\.up\.res_up_[0-3]\.proj\.0\.(weight|bias|running_mean|running_var|num_batches_tracked)",
    r"upsample\.up\.res_up_[0-3]\.proj\.1\.(weight|bias)",
    r"output\.0\.(weight|bias|running_mean|running_var|num_batches_tracked)",
    r"output\.2\.(weight|bias)",
    r"diam_mean",
    r"diam_labels",
]  # fmt: skip


def test_state_dict_keys_follow_upstream_layout():
    sd = GeneSegUNet().state_dict()
    pattern = re.compile("|".join(f"(?:{p})" for p in UPSTREAM_KEY_PATTERNS))
    bad = [k for k in sd if not pattern.fullmatch(k)]
    assert bad == []
    # every pattern instance exists: 4 levels × (5+2 proj + 4×(5+2)) down, etc. = 313
    assert sd["downsample.down.res_down_0.conv.conv_0.2.weight"].shape == (32, 2, 3, 3)
    assert sd["downsample.down.res_down_3.proj.1.weight"].shape == (256, 128, 1, 1)
    assert sd["upsample.up.res_up_3.conv.conv_0.2.weight"].shape == (256, 256, 3, 3)
    assert sd["upsample.up.res_up_0.conv.conv_0.2.weight"].shape == (32, 64, 3, 3)
    assert sd["upsample.up.res_up_1.conv.conv_2.full.weight"].shape == (64, 256)
    assert sd["output.2.weight"].shape == (3, 32, 1, 1)


def test_diameter_parameters():
    net = GeneSegUNet(NetConfig(diam_mean=27.5))
    for p in (net.diam_mean, net.diam_labels):
        assert isinstance(p, torch.nn.Parameter)
        assert p.shape == (1,)
        assert not p.requires_grad
        assert p.item() == 27.5
    assert net.device == torch.device("cpu")


# ---------------------------------------------------------------- forward semantics


@pytest.mark.parametrize("nchan", [2, 4])
def test_output_shapes(nchan):
    net = GeneSegUNet(NetConfig(nchan=nchan)).eval()
    with torch.no_grad():
        out, style = net(torch.randn(2, nchan, 32, 48))
    assert out.shape == (2, 3, 32, 48)
    assert style.shape == (2, 256)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("style_on", [True, False])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_forward_matches_functional_reference(style_on, mode):
    torch.manual_seed(0)
    net = _randomise(GeneSegUNet(NetConfig(style_on=style_on, upsample_mode=mode)))
    x = torch.randn(2, 2, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, style = net(x)
        ref_out, ref_style = _reference_forward(net.state_dict(), x, style_on, mode)
    torch.testing.assert_close(style, ref_style, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    assert torch.allclose(style.norm(dim=1), torch.ones(2), atol=1e-6)


def test_bilinear_upsampling_is_half_pixel():
    net = GeneSegUNet()
    a = np.arange(12, dtype=np.float32).reshape(3, 4) ** 1.5
    got = net.upsample._upsample(torch.from_numpy(a)[None, None])[0, 0].numpy()
    np.testing.assert_allclose(got, _np_bilinear_up2(a), rtol=1e-6, atol=1e-5)


def _perturb_full(net: GeneSegUNet, what: str) -> None:
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(f"full.{what}"):
                p.add_(0.5)


def test_style_off_decoder_ignores_full_weights():
    torch.manual_seed(0)
    net = _randomise(GeneSegUNet(NetConfig(style_on=False)))
    x = torch.randn(1, 2, 32, 32)
    with torch.no_grad():
        out0, style0 = net(x)
        _perturb_full(net, "weight")
        out1, style1 = net(x)
        _perturb_full(net, "bias")  # the bias still acts (full(0) = bias)
        out2, _ = net(x)
    assert torch.equal(out0, out1)
    assert torch.equal(style0, style1)
    assert not torch.allclose(out1, out2)
    assert torch.allclose(style0.norm(dim=1), torch.ones(1))  # non-zero style returned


def test_style_on_decoder_depends_on_full_weights():
    torch.manual_seed(0)
    net = _randomise(GeneSegUNet(NetConfig(style_on=True)))
    x = torch.randn(1, 2, 32, 32)
    with torch.no_grad():
        out0, _ = net(x)
        _perturb_full(net, "weight")
        out1, _ = net(x)
    assert (out0 - out1).abs().max() > 1e-3


def test_style_flag_changes_only_the_decoder_feed():
    torch.manual_seed(0)
    on = _randomise(GeneSegUNet(NetConfig(style_on=True)))
    off = GeneSegUNet(NetConfig(style_on=False)).eval()
    off.load_state_dict(on.state_dict())
    x = torch.randn(1, 2, 32, 32)
    with torch.no_grad():
        out_on, s_on = on(x)
        out_off, s_off = off(x)
    assert torch.equal(s_on, s_off)
    assert not torch.allclose(out_on, out_off)


@pytest.mark.parametrize("residual_on", [True, False])
def test_concatenation_variant(residual_on):
    cfg = NetConfig(concatenation=True, residual_on=residual_on)
    net = GeneSegUNet(cfg).eval()
    blk = "res_up_1" if residual_on else "conv_up_1"
    sd = net.state_dict()
    assert sd[f"upsample.up.{blk}.conv.conv_1.full.weight"].shape == (128, 256)
    assert sd[f"upsample.up.{blk}.conv.conv_1.conv.2.weight"].shape == (64, 128, 3, 3)
    with torch.no_grad():
        out, style = net(torch.randn(1, 2, 32, 32))
    assert out.shape == (1, 3, 32, 32) and style.shape == (1, 256)
    assert torch.isfinite(out).all()


def test_plain_variant_structure_and_size():
    net = GeneSegUNet(NetConfig(residual_on=False)).eval()
    sd = net.state_dict()
    assert not any(".proj." in k for k in sd)
    assert sd["downsample.down.conv_down_0.conv.conv_1.2.weight"].shape == (32, 32, 3, 3)

    def bc(i, o, k):
        return 2 * i + i * o * k * k + o

    widths, up = [2, 32, 64, 128, 256], [32, 64, 128, 256, 256]
    expected = sum(bc(widths[n], widths[n + 1], 3) + bc(widths[n + 1], widths[n + 1], 3)
                   for n in range(4))  # fmt: skip
    expected += sum(
        bc(up[n + 1], up[n], 3) + 256 * up[n] + up[n] + bc(up[n], up[n], 3) for n in range(4)
    )
    expected += bc(32, 3, 1) + 2
    assert sum(p.numel() for p in net.parameters()) == expected
    with torch.no_grad():
        out, _ = net(torch.randn(1, 2, 16, 24))
    assert out.shape == (1, 3, 16, 24)


def test_train_mode_backward_leaves_diameters_frozen():
    net = GeneSegUNet().train()
    out, _ = net(torch.randn(2, 2, 16, 16))
    out.square().mean().backward()
    assert net.output[2].weight.grad is not None and net.output[2].weight.grad.abs().sum() > 0
    assert net.diam_mean.grad is None and net.diam_labels.grad is None


@pytest.mark.parametrize("shape", [(1, 2, 30, 32), (1, 2, 32, 36), (1, 4, 32, 32), (2, 32, 32)])
def test_bad_input_shapes_raise(shape):
    net = GeneSegUNet().eval()
    with pytest.raises(ValueError):
        net(torch.zeros(shape))


# ---------------------------------------------------------------- config


def test_config_round_trip_and_validation():
    cfg = NetConfig(nchan=4, concatenation=True, diam_mean=30, upsample_mode="nearest")
    d = cfg.to_dict()
    assert d["nbase"] == [32, 64, 128, 256] and isinstance(d["diam_mean"], float)
    assert NetConfig.from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown NetConfig keys.*bogus"):
        NetConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError):
        NetConfig(upsample_mode="bicubic")
    with pytest.raises(ValueError):
        NetConfig(kernel_size=2)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    net = _randomise(GeneSegUNet())
    x = torch.randn(1, 2, 64, 64)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # compare in full float32
    try:
        _cuda_vs_cpu(net, x)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


def _cuda_vs_cpu(net: GeneSegUNet, x: torch.Tensor) -> None:
    with torch.no_grad():
        ref, ref_s = net(x)
        net.to("cuda")
        assert net.device.type == "cuda"
        out, s = net(x.to("cuda"))
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(s.cpu(), ref_s, rtol=1e-4, atol=1e-5)
