"""Upstream GeneSegNet flags that are accepted so that upstream commands still run.

Flags that never did anything upstream, or that we do not implement, are declared by
:func:`add_compat_args` and handled by :func:`check_unsupported` after parsing: a flag
whose effect is what always happens anyway yields a note for the log; a flag asking for
something unsupported stops the run with a clear message. None is silently ignored.
Standard library only.
"""

from __future__ import annotations

import argparse
from typing import Any

from GeneSegNet.cli.types import finite_float

# flag -> (value that means "not used", why a different value is refused)
_REFUSED: dict[str, tuple[Any, str]] = {
    "unet": (False, "GeneSegNet always runs its residual flow U-Net (the flag was dead upstream)"),
    "nclasses": (
        4,
        "the network has 3 outputs (dY, dX, cell probability); the flag was dead upstream",
    ),
    "train": (
        False,
        "GeneSeg_train.py always trains and GeneSeg_test.py never does (the flag "
        "was dead upstream)",
    ),
    "train_size": (False, "size-model training does not exist in GeneSegNet (dead upstream)"),
    "save_ncolor": (False, "n-colour label images are not written"),
    "do_3D": (False, "only 2-D images are segmented"),
    "stitch_threshold": (0.0, "3-D stitching is not implemented (2-D only)"),
    "anisotropy": (1.0, "3-D anisotropy does not apply to 2-D images"),
    "channel_axis": (
        None,
        "channels are fixed by --chan (2 = grey + heatmap, 4 = BGR + "
        "heatmap) and read from the images/ and HeatMaps/ folders",
    ),
    "z_axis": (None, "only 2-D images are segmented"),
    "no_interp": (False, "only interpolated (bilinear) flow following is implemented"),
}
_NO_EFFECT = {
    "look_one_level_down": "sample folders are always read one level down",
    "dir_above": "outputs go to <sample>/<output_visual>/ or <savedir>/<sample>/",
    "no_npy": "no _seg.npy files are written anyway",
    "net_avg": "one network is loaded once and run",
}


def add_compat_args(parser: argparse.ArgumentParser) -> None:
    """The "upstream compatibility" group (see :func:`check_unsupported`)."""
    compat = parser.add_argument_group(
        "upstream compatibility", "accepted so that upstream commands run; see each flag"
    )
    compat.add_argument(
        "--look_one_level_down",
        action="store_true",
        help="no effect: sample folders are always one level down",
    )
    compat.add_argument("--check_mkl", action="store_true", help="log whether torch can use MKL")
    compat.add_argument("--unet", action="store_true", help="not supported (dead upstream)")
    compat.add_argument(
        "--nclasses",
        type=int,
        default=4,
        help="not supported: the network has 3 outputs (dead upstream)",
    )
    compat.add_argument(
        "--train",
        action="store_true",
        help="not supported: use GeneSeg_train.py to train (dead upstream)",
    )
    compat.add_argument("--train_size", action="store_true", help="not supported (dead upstream)")
    compat.add_argument(
        "--dir_above", action="store_true", help="no effect (ignored upstream as well)"
    )
    compat.add_argument("--save_ncolor", action="store_true", help="not supported")
    compat.add_argument(
        "--no_npy",
        action="store_true",
        help="no effect: no _seg.npy files are written (upstream crashed)",
    )
    compat.add_argument(
        "--net_avg", action="store_true", help="no effect: one network, loaded once, is run"
    )
    compat.add_argument("--do_3D", action="store_true", help="not supported (2-D only)")
    compat.add_argument(
        "--stitch_threshold",
        type=finite_float,
        default=0.0,
        help="not supported unless 0 (3-D stitching)",
    )
    compat.add_argument(
        "--anisotropy", type=finite_float, default=1.0, help="not supported unless 1 (3-D)"
    )
    compat.add_argument(
        "--channel_axis", type=int, default=None, help="not supported: channels are fixed by --chan"
    )
    compat.add_argument("--z_axis", type=int, default=None, help="not supported (2-D only)")


def check_unsupported(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """Refuse unsupported flags; return notes on accepted no-effect flags.

    Calls ``parser.error`` (exit 2) with a message naming the flag and the reason when
    a flag asks for something not implemented. Returns log lines for flags that were
    given but change nothing, and the MKL status for ``--check_mkl``. Also refuses
    ``--no_norm`` combined with ``--invert``.
    """
    for name, (inactive, why) in _REFUSED.items():
        value = getattr(args, name, inactive)
        if value != inactive:
            shown = "" if isinstance(value, bool) else f" {value}"
            parser.error(f"--{name}{shown} is not supported: {why}")
    if getattr(args, "no_norm", False) and getattr(args, "invert", False):
        parser.error(
            "--invert cannot be combined with --no_norm: it inverts the normalised 0..1 intensities"
        )
    notes = [
        f"--{name} has no effect: {why}"
        for name, why in _NO_EFFECT.items()
        if getattr(args, name, False)
    ]
    if getattr(args, "check_mkl", False):
        import torch

        notes.append(f"--check_mkl: torch MKL available: {torch.backends.mkl.is_available()}")
    return notes
