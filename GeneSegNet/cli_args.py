"""Argument groups shared by ``GeneSeg_train.py`` and ``GeneSeg_test.py``.

Both scripts compose these groups, so their flags and defaults cannot drift apart
(upstream's two copied parsers disagreed on ``--style_on`` and ``--min_train_masks``).
Flag names follow upstream, so upstream commands keep working.

Evaluation flags default to None and :func:`eval_config_from_args` passes only the ones
given, so :class:`GeneSegNet.model.predict.EvalConfig` holds the only copy of each default
(the values quoted in the help texts are checked against it by the tests).

Upstream flags that never did anything, or that we do not implement, are still
accepted, and :func:`check_unsupported` handles them after parsing: a flag whose
effect is what always happens anyway yields a note for the log; a flag asking for
something unsupported stops the run with a clear message. None is silently ignored.

This module imports only the standard library, so ``--help`` is instant; the package
modules are imported when a config is built.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from GeneSegNet.cli import add_device_args, add_verbose_arg

if TYPE_CHECKING:
    from GeneSegNet.evaluation.test_pass import OutputOptions
    from GeneSegNet.model.predict import EvalConfig

HEATMAP_MODES = ("fixed", "percentile")


def optional_path(text: str) -> Path | None:
    """argparse type: a path, or None for ``None``/``none``/empty (upstream's README
    passes ``--pretrained_model None``)."""
    return None if text.strip() in ("", "None", "none") else Path(text)


def add_data_args(parser: argparse.ArgumentParser, *, require: Iterable[str] = ()) -> None:
    """Dataset folders, file filters, ``--chan`` and upstream's compatibility flags.

    ``require``: destinations among ``train_dir``, ``val_dir``, ``test_dir`` that the
    calling script needs; they become required options.
    """
    require = set(require)
    group = parser.add_argument_group("data")
    for name, what in (
        ("train_dir", "training set"),
        ("val_dir", "validation set"),
        ("test_dir", "test set"),
    ):
        group.add_argument(
            f"--{name}",
            type=Path,
            default=None,
            required=name in require,
            help=f"{what}: a folder of sample folders "
            "(<dir>/<sample>/images, labels, HeatMaps/HeatMap_all, spots)",
        )
    group.add_argument("--img_filter", default="_image", help="image file name suffix")
    group.add_argument("--mask_filter", default="_label", help="label file name suffix")
    group.add_argument(
        "--heatmap_filter", default="_gaumap_all", help="spot heatmap file name suffix"
    )
    group.add_argument(
        "--chan",
        type=int,
        choices=(2, 4),
        default=2,
        help="network input channels: 2 = grey + heatmap, 4 = BGR + heatmap",
    )
    group.add_argument(
        "--all_channels",
        action="store_true",
        help="accepted for compatibility and no longer required: all channels are always used",
    )
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
        "--stitch_threshold", type=float, default=0.0, help="not supported unless 0 (3-D stitching)"
    )
    compat.add_argument(
        "--anisotropy", type=float, default=1.0, help="not supported unless 1 (3-D)"
    )
    compat.add_argument(
        "--channel_axis", type=int, default=None, help="not supported: channels are fixed by --chan"
    )
    compat.add_argument("--z_axis", type=int, default=None, help="not supported (2-D only)")


def add_eval_args(parser: argparse.ArgumentParser) -> None:
    """Network-pass and mask settings (→ :func:`eval_config_from_args`) and filters."""
    group = parser.add_argument_group("evaluation")
    group.add_argument(
        "--diameter",
        type=float,
        default=None,
        help="cell diameter in pixels; images are resized by "
        "diam_mean/diameter; 0 uses the model's training-label diameter "
        "(default 32.0)",
    )
    group.add_argument(
        "--flow_threshold",
        type=float,
        default=None,
        help="maximum flow error of a kept mask, 0 = no check (default 0.4)",
    )
    group.add_argument(
        "--confidence_threshold",
        type=float,
        default=None,
        help="cell-probability logit threshold (default 0.0)",
    )
    group.add_argument(
        "--min_size", type=int, default=None, help="minimum mask area in pixels (default 15)"
    )
    group.add_argument("--niter", type=int, default=None, help="flow-following steps (default 200)")
    group.add_argument(
        "--y_only_movers",
        action="store_true",
        help="upstream's rule: follow only pixels with a non-zero Y flow (exactly "
        "horizontal flows stay unlabelled)",
    )
    group.add_argument(
        "--batch_size",
        type=int,
        default=None,
        help="batch size: tiles per forward pass at evaluation (default 8); in training "
        "also the training batch, as upstream",
    )
    group.add_argument(
        "--tile_overlap",
        type=float,
        default=None,
        help="overlap fraction between tiles (default 0.1)",
    )
    group.add_argument(
        "--heatmap_norm",
        choices=HEATMAP_MODES,
        default=None,
        help="heatmap scaling: 'fixed' divides by 255 (keeps sparse heatmaps); "
        "'percentile' is upstream's 1-99%% normalisation (default fixed)",
    )
    group.add_argument(
        "--no_resample",
        action="store_true",
        help="compute masks at the network's resolution, then resize them",
    )
    group.add_argument("--fast_mode", action="store_true", help="same as --no_resample")
    group.add_argument(
        "--no_interp",
        action="store_true",
        help="not supported: only interpolated flow following is implemented",
    )
    group.add_argument(
        "--no_norm",
        action="store_true",
        help="feed raw intensities (no 1-99%% normalisation) at evaluation",
    )
    group.add_argument(
        "--invert", action="store_true", help="invert the normalised image channels (1 - x)"
    )
    group.add_argument(
        "--exclude_on_edges",
        action="store_true",
        help="remove predicted cells that touch the crop edge (saved masks and metrics)",
    )
    group.add_argument(
        "--size_filter",
        action="store_true",
        help="upstream's size/shape filter on predicted cells (area >= 300 px, "
        "bounding box >= 10%% of the crop side and <= 90%% of its area), "
        "which upstream ran under the name remove_edge_masks",
    )


def add_model_args(parser: argparse.ArgumentParser, *, training: bool) -> None:
    """Checkpoint and architecture flags.

    ``training=True``: the architecture flags have upstream's training defaults
    (residual 1, style 0, concatenation 0, diam_mean 34). ``training=False``: they
    default to None, because the architecture is read from the checkpoint; a value
    given that differs from the checkpoint is reported by the script.
    """
    group = parser.add_argument_group("model")
    group.add_argument(
        "--pretrained_model",
        type=optional_path,
        default=None,
        help="checkpoint file (our format or an upstream state dict); 'None' for none",
    )
    arch = {"residual_on": 1, "style_on": 0, "concatenation": 0}
    for name, default in arch.items():
        group.add_argument(
            f"--{name}",
            type=int,
            choices=(0, 1),
            default=default if training else None,
            help=f"architecture: {name.replace('_', ' ')} "
            + (f"(default {default})" if training else "(test: read from the checkpoint)"),
        )
    group.add_argument(
        "--diam_mean",
        type=float,
        default=34.0 if training else None,
        help="mean cell diameter the network is trained at, in pixels "
        + ("(default 34.0)" if training else "(test: read from the checkpoint)"),
    )


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """What the test pass writes, and where; ``--verbose``."""
    group = parser.add_argument_group("output")
    group.add_argument(
        "--save_png", action="store_true", help="write the comparison figure <key>_cp_output.png"
    )
    group.add_argument(
        "--save_tif", action="store_true", help="also write each predicted mask as <key>_label.tif"
    )
    group.add_argument(
        "--save_flows",
        action="store_true",
        help="write <key>_dP.tif (float32 flows) and <key>_flows.tif (RGB)",
    )
    group.add_argument(
        "--save_outlines",
        action="store_true",
        help="write <key>_outlines.png (outlines over the image)",
    )
    group.add_argument(
        "--save_txt", action="store_true", help="write ImageJ outlines <key>_cp_outlines.txt"
    )
    group.add_argument(
        "--in_folders",
        action="store_true",
        help="sort outputs into masks/, cp_output/, outlines/, txt_outlines/, flows/ sub-folders",
    )
    group.add_argument(
        "--savedir",
        type=Path,
        default=None,
        help="write outputs to <savedir>/<sample>/ (and metrics to <savedir>) "
        "instead of <test_dir>/<sample>/<output_visual>/",
    )
    group.add_argument(
        "--output_filename",
        default="newlabels",
        help="folder name of refined labels written by training",
    )
    group.add_argument(
        "--output_visual", default="visresults", help="per-sample output folder name"
    )
    group.add_argument(
        "--metrics",
        action="store_true",
        help="compute AP@0.5/0.75/0.9, AJI, IoU and gene IoU against labels/",
    )
    add_verbose_arg(parser)


def add_common_args(
    parser: argparse.ArgumentParser, *, training: bool, require: Iterable[str] = ()
) -> None:
    """All shared groups in one call: data, model, evaluation, output and device."""
    add_data_args(parser, require=require)
    add_model_args(parser, training=training)
    add_eval_args(parser)
    add_output_args(parser)
    add_device_args(parser)


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


def eval_config_from_args(args: argparse.Namespace) -> EvalConfig:
    """:class:`EvalConfig` from parsed flags; only flags given override its defaults."""
    from GeneSegNet.model.predict import EvalConfig

    given = {
        "diameter": args.diameter,
        "flow_threshold": args.flow_threshold,
        "confidence_threshold": args.confidence_threshold,
        "min_size": args.min_size,
        "niter": args.niter,
        "batch_size": args.batch_size,
        "tile_overlap": args.tile_overlap,
        "heatmap_mode": args.heatmap_norm,
    }
    kwargs: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if args.no_resample or args.fast_mode:
        kwargs["resample"] = False
    if args.y_only_movers:
        kwargs["y_only_movers"] = True
    if args.no_norm:
        kwargs["normalize"] = False
    if args.invert:
        kwargs["invert"] = True
    try:
        return EvalConfig(**kwargs)
    except ValueError as exc:
        from GeneSegNet.errors import InputError

        raise InputError(f"bad evaluation settings: {exc}") from None


def output_options_from_args(args: argparse.Namespace) -> OutputOptions:
    """The test pass's ``OutputOptions`` from the flags of :func:`add_output_args`."""
    from GeneSegNet.evaluation.test_pass import OutputOptions

    return OutputOptions(
        save_png=args.save_png,
        save_tif=args.save_tif,
        save_txt=args.save_txt,
        save_flows=args.save_flows,
        save_outlines=args.save_outlines,
        in_folders=args.in_folders,
        savedir=args.savedir,
        output_visual=args.output_visual,
    )
