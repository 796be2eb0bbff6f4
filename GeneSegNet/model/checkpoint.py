"""Self-describing, safely loadable network checkpoints.

Our format is a dict written by ``torch.save``::

    {"format": "GeneSegNet-checkpoint", "version": 1, "package_version": str,
     "net_config": NetConfig.to_dict(), "state_dict": {key: tensor},
     "train_config": dict | None, **extra}

It holds only plain Python types and tensors, so it is read with
``torch.load(weights_only=True)``: loading never imports or runs code from the file.
A bare upstream state dict (``torch.save(net.state_dict(), path)``, keys of spec §3.3)
is accepted too; its architecture is inferred from the tensor shapes, with style on
as upstream always ran it. Both kinds load with ``strict=True``.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch

import GeneSegNet
from GeneSegNet.errors import InputError
from GeneSegNet.io.atomic import temp_file
from GeneSegNet.model.net import GeneSegUNet, NetConfig

logger = logging.getLogger(__name__)

FORMAT = "GeneSegNet-checkpoint"
VERSION = 1
_RESERVED = ("format", "version", "package_version", "net_config", "state_dict", "train_config")


def _plain(obj: Any, where: str) -> Any:
    """Copy ``obj`` into types a ``weights_only`` load accepts (paths become str)."""
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.array(obj))
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str | int):
                raise TypeError(f"{where}: dict key {k!r} is not a str or int")
            out[k] = _plain(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, list | tuple):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    raise TypeError(
        f"{where}: {type(obj).__name__} cannot go into a safe checkpoint "
        "(use plain types, tensors or arrays)"
    )


def save_checkpoint(
    path: str | Path,
    net: GeneSegUNet,
    *,
    train_config: dict | None = None,
    extra: dict | None = None,
) -> Path:
    """Write ``net`` (weights, architecture, diameters) to ``path`` atomically.

    The file is first written to a temporary file in the same folder and then moved
    into place with ``os.replace``, so an interrupted save leaves either the old file
    or the new one, never a partial file.

    Parameters
    ----------
    path : destination; parent folders are created. No extension is imposed.
    net : the network; its ``config`` and ``state_dict`` (moved to CPU) are stored.
    train_config : training settings (plain types; paths are stored as str).
    extra : further top-level entries (e.g. ``epoch``, optimizer state); their names
        must not clash with the reserved keys.

    Returns
    -------
    The path written.
    """
    path = Path(path)
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(f"extra keys {clash} clash with reserved checkpoint keys")
    payload: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "package_version": GeneSegNet.__version__,
        "net_config": net.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "train_config": _plain(train_config, "train_config"),
    }
    payload.update(_plain(extra, "extra"))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file(path)
    done = False
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        done = True
    finally:
        if not done:
            Path(tmp).unlink(missing_ok=True)
    logger.debug("saved checkpoint %s", path)
    return path


def _safe_load(path: Path, device: torch.device | str) -> Any:
    """``torch.load(weights_only=True)`` with every failure turned into an InputError."""
    if not path.is_file():
        raise InputError("checkpoint file not found", path)
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        what = _unsafe_global(str(e))
        if what is not None:
            raise InputError(
                f"unsafe checkpoint: it refers to a Python object ({what}) that loading "
                "would have to import and run; refusing to load it (only weights and plain "
                "data are accepted)",
                path,
            ) from None
        raise InputError(
            "not a readable torch checkpoint (corrupt, truncated, not a torch file, or "
            "using pickle features a safe load does not allow)",
            path,
        ) from None
    except Exception as e:  # noqa: BLE001 - torch raises many types on corrupt files
        raise InputError(
            "not a readable torch checkpoint (corrupt, truncated or not a torch file: "
            f"{type(e).__name__}: {str(e)[:160]})",
            path,
        ) from None


def _unsafe_global(message: str) -> str | None:
    """The global a ``weights_only`` error names ("Unsupported global: X" in torch 2.6,
    "unsupported GLOBAL X whose module ..." in later versions), or None."""
    match = re.search(r"unsupported global:?\s*(?:GLOBAL\s+)?([\w.]+)", message, re.IGNORECASE)
    return match.group(1) if match else None


# Bounds on an architecture read from a file, checked before the network is built (a
# hostile checkpoint could otherwise ask for terabytes of weights).
ARCH_LIMITS = {"levels": 8, "width": 4096, "nchan": 64, "nout": 16, "kernel_size": 15,
               "diam_mean": 1000.0, "parameters": 2 * 10**9}


def check_architecture(cfg: NetConfig, path: Path) -> None:
    """Raise InputError when ``cfg`` exceeds :data:`ARCH_LIMITS`."""
    lim = ARCH_LIMITS
    k2 = cfg.kernel_size**2
    widths = (cfg.nchan, *cfg.nbase)
    params = sum(4 * a * b * k2 for a, b in zip(widths[:-1], widths[1:], strict=True))
    problems = [
        f"{len(cfg.nbase)} levels (at most {lim['levels']})" * (len(cfg.nbase) > lim["levels"]),
        f"width {max(cfg.nbase)} (at most {lim['width']})" * (max(cfg.nbase) > lim["width"]),
        f"nchan {cfg.nchan} (at most {lim['nchan']})" * (cfg.nchan > lim["nchan"]),
        f"nout {cfg.nout} (at most {lim['nout']})" * (cfg.nout > lim["nout"]),
        f"kernel {cfg.kernel_size} (at most {lim['kernel_size']})"
        * (cfg.kernel_size > lim["kernel_size"]),
        f"diam_mean {cfg.diam_mean:g} (at most {lim['diam_mean']:g})"
        * (cfg.diam_mean > lim["diam_mean"]),
        f"about {params:.3g} weights (at most {lim['parameters']:.3g})"
        * (params > lim["parameters"]),
    ]
    problems = [p for p in problems if p]
    if problems:
        raise InputError("checkpoint architecture out of bounds: " + "; ".join(problems)
                         + " (a corrupt or hostile file?)", path)


def _check_finite(sd: Mapping[str, Any], path: Path) -> None:
    """Refuse weights holding NaN or infinity (a diverged or damaged model)."""
    bad = [k for k, v in sd.items()
           if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(
               torch.isfinite(v).all())]
    if bad:
        raise InputError(f"checkpoint weights hold NaN or infinite values ({len(bad)} "
                         f"tensor(s), e.g. {bad[0]}): the model is unusable", path)


def _infer_upstream_config(sd: Mapping[str, torch.Tensor], path: Path) -> NetConfig:
    """Architecture of a bare upstream state dict, read from its key names and shapes."""
    if "downsample.down.res_down_0.conv.conv_0.2.weight" in sd:
        residual, down, up = True, "res_down", "res_up"
    elif "downsample.down.conv_down_0.conv.conv_0.2.weight" in sd:
        residual, down, up = False, "conv_down", "conv_up"
    else:
        raise InputError(
            "not a GeneSegNet checkpoint or upstream state dict (no key "
            "'downsample.down.res_down_0.conv.conv_0.2.weight')",
            path,
        )
    try:
        first = sd[f"downsample.down.{down}_0.conv.conv_0.2.weight"]
        nchan, kernel = int(first.shape[1]), int(first.shape[-1])
        nbase = []
        while f"downsample.down.{down}_{len(nbase)}.conv.conv_0.2.weight" in sd:
            key = f"downsample.down.{down}_{len(nbase)}.conv.conv_0.2.weight"
            nbase.append(int(sd[key].shape[0]))
        nout = int(sd["output.2.weight"].shape[0])
        full = sd[f"upsample.up.{up}_0.conv.conv_1.full.weight"]
        concatenation = int(full.shape[0]) == 2 * nbase[0]
        diam = sd.get("diam_mean")
        diam_mean = float(diam.reshape(-1)[0]) if diam is not None else NetConfig.diam_mean
        return NetConfig(
            nchan=nchan,
            nbase=tuple(nbase),
            nout=nout,
            kernel_size=kernel,
            residual_on=residual,
            style_on=True,
            concatenation=concatenation,
            diam_mean=diam_mean,
        )
    except (KeyError, IndexError, ValueError, RuntimeError) as e:
        raise InputError(
            f"state dict does not match the network architecture ({type(e).__name__}: {e})",
            path,
        ) from None


def _shape(v: Any) -> tuple[int, ...] | str:
    return tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__


def _check_keys(net: GeneSegUNet, sd: Mapping[str, Any], path: Path) -> None:
    """Raise an InputError listing missing, unexpected and mis-shaped entries."""
    want = net.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shapes = [
        f"{k} {_shape(sd[k])} vs {tuple(want[k].shape)}"
        for k in want
        if k in sd and _shape(sd[k]) != tuple(want[k].shape)
    ]
    parts = []
    for name, items in (("missing keys", missing), ("unexpected keys", unexpected)):
        if items:
            parts.append(f"{name} ({len(items)}): {', '.join(items[:3])}")
    if shapes:
        parts.append(
            f"shape mismatches ({len(shapes)}, checkpoint vs network): " + "; ".join(shapes[:3])
        )
    if parts:
        cfg = net.config
        raise InputError(
            f"weights do not match the architecture (nchan={cfg.nchan}, nbase={list(cfg.nbase)}, "
            f"residual_on={cfg.residual_on}, concatenation={cfg.concatenation}): "
            + "; ".join(parts),
            path,
        )


def load_checkpoint(
    path: str | Path,
    device: torch.device | str = "cpu",
    *,
    expect_nchan: int | None = None,
) -> tuple[GeneSegUNet, dict[str, Any]]:
    """Load a network safely (``weights_only``) and strictly.

    Parameters
    ----------
    path : our checkpoint format, or a bare upstream state dict (spec §3.3).
    device : where the network is placed.
    expect_nchan : if given, the number of input channels the caller will feed
        (``--chan``); a different value in the checkpoint raises an InputError.

    Returns
    -------
    net : the network, in eval mode, on ``device``.
    meta : ``source`` ("genesegnet" or "upstream-state-dict"), ``net_config`` (dict),
        ``diam_mean`` and ``diam_labels`` (float, pixels), ``train_config``, ``extra``
        (other top-level entries), ``package_version`` and ``format_version``
        (None for upstream files).

    Raises
    ------
    InputError : missing, unreadable or unsafe file; keys or shapes that do not match
        the architecture; ``expect_nchan`` mismatch. The message names the file.
    """
    path = Path(path)
    obj = _safe_load(path, device)
    if not isinstance(obj, Mapping):
        raise InputError(
            f"holds a {type(obj).__name__}, not a GeneSegNet checkpoint or state dict", path
        )
    meta: dict[str, Any] = {"train_config": None, "extra": {}}
    meta["package_version"] = meta["format_version"] = None
    if "format" in obj:
        if obj["format"] != FORMAT:
            raise InputError(f"unknown checkpoint format {obj['format']!r}", path)
        version = obj.get("version")
        if not isinstance(version, int) or version > VERSION:
            raise InputError(
                f"checkpoint format version {version!r} is not supported (this package "
                f"reads versions <= {VERSION}; it may come from a newer GeneSegNet)",
                path,
            )
        try:
            cfg = NetConfig.from_dict(dict(obj["net_config"]))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"bad net_config in checkpoint: {e}", path) from None
        sd = obj.get("state_dict")
        if not isinstance(sd, Mapping):
            raise InputError("checkpoint has no state_dict", path)
        meta.update(
            source="genesegnet",
            train_config=obj.get("train_config"),
            extra={k: v for k, v in obj.items() if k not in _RESERVED},
            package_version=obj.get("package_version"),
            format_version=version,
        )
    else:
        if not all(isinstance(k, str) for k in obj) or not all(
            isinstance(v, torch.Tensor) for v in obj.values()
        ):
            raise InputError("not a GeneSegNet checkpoint or a state dict of tensors", path)
        sd = obj
        cfg = _infer_upstream_config(sd, path)
        meta["source"] = "upstream-state-dict"
    if expect_nchan is not None and cfg.nchan != expect_nchan:
        raise InputError(
            f"checkpoint has {cfg.nchan} input channels but --chan {expect_nchan} was given",
            path,
        )
    check_architecture(cfg, path)
    net = GeneSegUNet(cfg)
    _check_keys(net, sd, path)
    _check_finite(sd, path)
    net.load_state_dict(sd, strict=True)
    net.to(device).eval()
    meta["net_config"] = cfg.to_dict()
    meta["diam_mean"] = float(net.diam_mean.item())
    meta["diam_labels"] = float(net.diam_labels.item())
    logger.info("loaded %s (%s, %s)", path, meta["source"], cfg)
    return net, meta
