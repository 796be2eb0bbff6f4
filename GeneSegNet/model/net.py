"""The GeneSegNet network: a residual U-Net with a style vector (spec §3).

Input ``[B, nchan, H, W]`` (grey + spot heatmap for ``nchan=2``, BGR + heatmap for
``nchan=4``); output ``[B, nout, H, W]`` = (dY flow, dX flow, cell-probability logit)
and the L2-normalised style vector ``[B, nbase[-1]]``.

Submodules are named so that ``state_dict()`` keys follow upstream's layout exactly
(``downsample.down.res_down_k.proj.0.weight``, ``upsample.up.res_up_k.conv.conv_1.full.bias``,
``output.2.weight``, ``diam_mean``...), so an upstream state dict loads with
``strict=True`` and no key remapping. The non-residual variant uses
``conv_down_k`` / ``conv_up_k`` block names.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

UPSAMPLE_MODES = ("bilinear", "nearest")


@dataclass(frozen=True)
class NetConfig:
    """Architecture settings of a :class:`GeneSegUNet`.

    Attributes
    ----------
    nchan : input channels (2 = grey + heatmap, 4 = BGR + heatmap).
    nbase : encoder widths, one per resolution level (default 32, 64, 128, 256).
    nout : output channels (3 = dY, dX, cell-probability logit).
    kernel_size : odd kernel size of the 3×3 convolutions.
    residual_on : residual blocks (upstream default) or plain two-conv blocks.
    style_on : feed the style vector to the decoder (False feeds zeros instead).
    concatenation : concatenate skips instead of adding them.
    diam_mean : initial value of the ``diam_mean`` / ``diam_labels`` parameters (pixels).
    upsample_mode : ``"bilinear"`` (GeneSegNet) or ``"nearest"`` (Cellpose-style models).
    """

    nchan: int = 2
    nbase: tuple[int, ...] = (32, 64, 128, 256)
    nout: int = 3
    kernel_size: int = 3
    residual_on: bool = True
    style_on: bool = True
    concatenation: bool = False
    diam_mean: float = 34.0
    upsample_mode: str = "bilinear"

    def __post_init__(self) -> None:
        object.__setattr__(self, "nbase", tuple(int(n) for n in self.nbase))
        object.__setattr__(self, "diam_mean", float(self.diam_mean))
        if int(self.nchan) < 1 or int(self.nout) < 1:
            raise ValueError(f"nchan and nout must be >= 1, got {self.nchan}, {self.nout}")
        if len(self.nbase) < 2 or min(self.nbase) < 1:
            raise ValueError(f"nbase needs >= 2 positive widths, got {self.nbase}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {self.kernel_size}")
        if self.upsample_mode not in UPSAMPLE_MODES:
            raise ValueError(
                f"upsample_mode must be one of {UPSAMPLE_MODES}, got {self.upsample_mode!r}"
            )
        if not self.diam_mean > 0:
            raise ValueError(f"diam_mean must be > 0, got {self.diam_mean}")

    @property
    def size_multiple(self) -> int:
        """H and W of the input must be multiples of this (2 ** number of poolings)."""
        return 2 ** (len(self.nbase) - 1)

    def to_dict(self) -> dict[str, Any]:
        """Plain-typed dict (``nbase`` as a list), suitable for JSON and safe checkpoints."""
        d = asdict(self)
        d["nbase"] = list(self.nbase)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown NetConfig keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)


def _batchconv(cin: int, cout: int, k: int) -> nn.Sequential:
    """BN(cin) → ReLU → Conv k×k; state-dict indices 0 (BN) and 2 (conv)."""
    return nn.Sequential(
        nn.BatchNorm2d(cin, eps=1e-5),
        nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, k, padding=k // 2),
    )


def _batchconv0(cin: int, cout: int, k: int) -> nn.Sequential:
    """BN(cin) → Conv k×k (no ReLU); state-dict indices 0 (BN) and 1 (conv)."""
    return nn.Sequential(nn.BatchNorm2d(cin, eps=1e-5), nn.Conv2d(cin, cout, k, padding=k // 2))


class _BatchConvStyle(nn.Module):
    """Style-modulated conv: ``conv(merge(x, skip) + full(style))``.

    With ``concatenation`` the skip is concatenated (skip first), so ``conv`` takes
    ``2*cin`` channels and ``full`` outputs ``2*cout`` (used with ``cin == cout``).
    """

    def __init__(self, cin: int, cout: int, style_ch: int, k: int, concatenation: bool) -> None:
        super().__init__()
        self.concatenation = concatenation
        mult = 2 if concatenation else 1
        self.full = nn.Linear(style_ch, cout * mult)
        self.conv = _batchconv(cin * mult, cout, k)

    def forward(
        self, style: torch.Tensor, x: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        if y is not None:
            x = torch.cat((y, x), dim=1) if self.concatenation else x + y
        return self.conv(x + self.full(style)[:, :, None, None])


class _ResDown(nn.Module):
    """Residual encoder block: ``x1 = proj(x) + c1(c0(x))``; ``x1 + c3(c2(x1))``."""

    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__()
        self.proj = _batchconv0(cin, cout, 1)
        self.conv = nn.Sequential()
        for i in range(4):
            self.conv.add_module(f"conv_{i}", _batchconv(cin if i == 0 else cout, cout, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        x1 = self.proj(x) + c.conv_1(c.conv_0(x))
        return x1 + c.conv_3(c.conv_2(x1))


class _PlainDown(nn.Module):
    """Plain encoder block: two batchconvs."""

    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__()
        self.conv = nn.Sequential()
        self.conv.add_module("conv_0", _batchconv(cin, cout, k))
        self.conv.add_module("conv_1", _batchconv(cout, cout, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _ResUp(nn.Module):
    """Residual decoder block.

    ``x1 = proj(x) + c1(style, c0(x), skip)``; returns ``x1 + c3(style, c2(style, x1))``.
    """

    def __init__(self, cin: int, cout: int, style_ch: int, k: int, concatenation: bool) -> None:
        super().__init__()
        self.conv = nn.Sequential()
        self.conv.add_module("conv_0", _batchconv(cin, cout, k))
        self.conv.add_module("conv_1", _BatchConvStyle(cout, cout, style_ch, k, concatenation))
        self.conv.add_module("conv_2", _BatchConvStyle(cout, cout, style_ch, k, False))
        self.conv.add_module("conv_3", _BatchConvStyle(cout, cout, style_ch, k, False))
        self.proj = _batchconv0(cin, cout, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        c = self.conv
        x1 = self.proj(x) + c.conv_1(style, c.conv_0(x), y=skip)
        return x1 + c.conv_3(style, c.conv_2(style, x1))


class _PlainUp(nn.Module):
    """Plain decoder block: batchconv, then a style conv that receives the skip."""

    def __init__(self, cin: int, cout: int, style_ch: int, k: int, concatenation: bool) -> None:
        super().__init__()
        self.conv = nn.Sequential()
        self.conv.add_module("conv_0", _batchconv(cin, cout, k))
        self.conv.add_module("conv_1", _BatchConvStyle(cout, cout, style_ch, k, concatenation))

    def forward(self, x: torch.Tensor, skip: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        return self.conv.conv_1(style, self.conv.conv_0(x), y=skip)


class _Encoder(nn.Module):
    """Down path; returns the output of every level (full, 1/2, 1/4, ... resolution)."""

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        widths = [cfg.nchan, *cfg.nbase]
        block, name = (_ResDown, "res_down") if cfg.residual_on else (_PlainDown, "conv_down")
        self.down = nn.ModuleDict(
            {
                f"{name}_{n}": block(widths[n], widths[n + 1], cfg.kernel_size)
                for n in range(len(cfg.nbase))
            }
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        xd: list[torch.Tensor] = []
        for n, block in enumerate(self.down.values()):
            xd.append(block(x if n == 0 else F.max_pool2d(xd[-1], 2, 2)))
        return xd


class _Decoder(nn.Module):
    """Up path: the deepest block takes (xd[-1], skip=xd[-1]); then upsample ×2 per level."""

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        up_widths = [*cfg.nbase, cfg.nbase[-1]]
        style_ch = cfg.nbase[-1]
        block, name = (_ResUp, "res_up") if cfg.residual_on else (_PlainUp, "conv_up")
        self.mode = cfg.upsample_mode
        self.up = nn.ModuleDict(
            {
                f"{name}_{n}": block(
                    up_widths[n + 1], up_widths[n], style_ch, cfg.kernel_size, cfg.concatenation
                )
                for n in range(len(cfg.nbase))
            }
        )

    def _upsample(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "bilinear":
            return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        return F.interpolate(x, scale_factor=2, mode="nearest")

    def forward(self, style: torch.Tensor, xd: list[torch.Tensor]) -> torch.Tensor:
        blocks = list(self.up.values())
        x = blocks[-1](xd[-1], xd[-1], style)
        for n in range(len(blocks) - 2, -1, -1):
            x = blocks[n](self._upsample(x), xd[n], style)
        return x


class GeneSegUNet(nn.Module):
    """Residual U-Net with a style vector (spec §3.1), built from a :class:`NetConfig`.

    ``diam_mean`` and ``diam_labels`` are non-trainable ``nn.Parameter`` of shape [1]
    (pixels), both initialised to ``cfg.diam_mean``.
    """

    def __init__(self, cfg: NetConfig | None = None) -> None:
        super().__init__()
        self.config = NetConfig() if cfg is None else cfg
        cfg = self.config
        self.downsample = _Encoder(cfg)
        self.upsample = _Decoder(cfg)
        self.output = _batchconv(cfg.nbase[0], cfg.nout, 1)
        init = torch.full((1,), cfg.diam_mean, dtype=torch.float32)
        self.diam_mean = nn.Parameter(init.clone(), requires_grad=False)
        self.diam_labels = nn.Parameter(init.clone(), requires_grad=False)

    @property
    def device(self) -> torch.device:
        """Device of the parameters."""
        return next(self.parameters()).device

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the network.

        Parameters
        ----------
        x : float tensor [B, nchan, H, W]; H and W multiples of ``cfg.size_multiple`` (8).

        Returns
        -------
        out : [B, nout, H, W] = (dY, dX, cell-probability logit), no activation.
        style : [B, nbase[-1]], the L2-normalised global average of the deepest features
            (returned even when ``style_on`` is False, where zeros feed the decoder).
        """
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.nchan:
            raise ValueError(f"expected input [B, {cfg.nchan}, H, W], got {tuple(x.shape)}")
        m = cfg.size_multiple
        if x.shape[-2] % m or x.shape[-1] % m:
            raise ValueError(f"H and W must be multiples of {m}, got {tuple(x.shape[-2:])}")
        xd = self.downsample(x)
        deep = xd[-1]
        style = F.avg_pool2d(deep, kernel_size=(deep.shape[-2], deep.shape[-1])).flatten(1)
        style = style / torch.sum(style**2, dim=1, keepdim=True) ** 0.5
        feed = style if cfg.style_on else torch.zeros_like(style)
        out = self.output(self.upsample(feed, xd))
        return out, style
