"""Argument groups of the scripts, and the one function that turns flags into settings.

``GeneSeg_train.py`` and ``GeneSeg_test.py`` compose the same groups, so their flags and
defaults cannot drift apart (upstream's two copied parsers disagreed on ``--style_on``
and ``--min_train_masks``); ``Inference/slidingwindows_gradient.py`` declares its mask
and network-pass flags with the same functions (:func:`add_mask_args`,
:func:`add_network_pass_args`). Flag names follow upstream, so upstream commands keep
working.

Evaluation flags default to None and :func:`eval_config_from_args` passes only the ones
given, so :class:`GeneSegNet.model.predict.EvalConfig` holds the only copy of each default
(the values quoted in the help texts are checked against it by the tests). The heatmap
scaling, unless given, is the one the model was trained with.

The folder-filter defaults (``_image``, ``_label``, ``_gaumap_all``) are the suffixes of
:mod:`GeneSegNet.io.layout` (a test checks it); they are written out here so that
``--help`` does not import the I/O stack. Heavy modules are imported when a config is built.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from GeneSegNet.cli import add_device_args, add_verbose_arg
from GeneSegNet.cli.types import (
    finite_float,
    nonnegative_float,
    nonnegative_int,
    open_fraction,
    positive_float,
    positive_int,
)
from GeneSegNet.cli.upstream import add_compat_args
from GeneSegNet.data.transforms import HEATMAP_MODES, IMAGE_NORMS

if TYPE_CHECKING:
    from GeneSegNet.data.model_input import ModelInput
    from GeneSegNet.evaluation.test_pass import OutputOptions
    from GeneSegNet.model.predict import EvalConfig

logger = logging.getLogger(__name__)

# flag destination -> EvalConfig field, for the flags passed through when given
_EVAL_FIELDS = {
    "diameter": "diameter",
    "flow_threshold": "flow_threshold",
    "confidence_threshold": "confidence_threshold",
    "min_size": "min_size",
    "niter": "niter",
    "batch_size": "batch_size",
    "tile_overlap": "tile_overlap",
    "augment": "augment",
}


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
    add_compat_args(parser)


def add_mask_args(group: argparse._ActionsContainer) -> None:
    """Cell diameter and mask-reconstruction flags (crop and whole-slide scripts)."""
    group.add_argument(
        "--diameter",
        type=nonnegative_float,
        default=None,
        help="cell diameter in pixels; images are resized by "
        "diam_mean/diameter; 0 uses the model's training-label diameter "
        "(default 32.0)",
    )
    group.add_argument(
        "--flow_threshold",
        type=nonnegative_float,
        default=None,
        help="maximum flow error of a kept mask, 0 = no check (default 0.4)",
    )
    group.add_argument(
        "--confidence_threshold",
        type=finite_float,
        default=None,
        help="cell-probability logit threshold (default 0.0)",
    )
    group.add_argument(
        "--min_size",
        type=nonnegative_int,
        default=None,
        help="minimum mask area in pixels (default 15)",
    )
    group.add_argument("--niter", type=positive_int, default=None,
                       help="flow-following steps (default 200)")


def add_network_pass_args(
    group: argparse._ActionsContainer, *, batch_help: str, training: bool = False
) -> None:
    """``--batch_size`` and ``--heatmap_norm`` (crop and whole-slide scripts).

    ``batch_help``: what one batch holds in the calling script. ``training``: the flag
    sets the scaling a model is trained with (else: the scaling of a trained model).
    """
    heatmap_default = (
        "default fixed; the test passes and relabelling use the same"
        if training
        else "default: the model's training setting; fixed for a model without one"
    )
    group.add_argument(
        "--batch_size", type=positive_int, default=None, help=f"{batch_help} (default 8)"
    )
    group.add_argument(
        "--augment",
        action="store_true",
        default=None,
        help="average the network's outputs over the four flips of each tile or window "
        "(test-time augmentation; 4x the network time, sharper outlines)",
    )
    group.add_argument(
        "--heatmap_norm",
        choices=HEATMAP_MODES,
        default=None,
        help="heatmap scaling: 'fixed' divides by 255 (keeps sparse heatmaps); "
        f"'percentile' is upstream's 1-99%% normalisation ({heatmap_default})",
    )
    group.add_argument(
        "--image_norm",
        choices=IMAGE_NORMS,
        default=None,
        help="image-channel normalisation: 'local' (levels on blocks of max(64, 4 x "
        "diam_mean) px, the same in crops and whole slides) or 'percentile' (1-99%% per "
        "input) ("
        + ("default local; stored in the model" if training
           else "default: the model's setting; percentile for a model without one")
        + ")",
    )


def add_eval_args(parser: argparse.ArgumentParser, *, training: bool = False) -> None:
    """Network-pass and mask settings (→ :func:`eval_config_from_args`) and filters."""
    group = parser.add_argument_group("evaluation")
    add_mask_args(group)
    group.add_argument(
        "--y_only_movers",
        action="store_true",
        help="upstream's rule: follow only pixels with a non-zero Y flow (exactly "
        "horizontal flows stay unlabelled)",
    )
    add_network_pass_args(
        group,
        batch_help="batch size: tiles per forward pass at evaluation; in training also the "
        "training batch, as upstream",
        training=training,
    )
    group.add_argument(
        "--tile_overlap",
        type=open_fraction,
        default=None,
        help="overlap fraction between tiles (default 0.1)",
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
        type=positive_float,
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
    add_eval_args(parser, training=training)
    add_output_args(parser)
    add_device_args(parser)


def eval_config_from_args(
    args: argparse.Namespace,
    trained: Mapping[str, Any] | None,
    *,
    model_input: ModelInput | None = None,
) -> EvalConfig:
    """The :class:`EvalConfig` of a run, from parsed flags and the model's training settings.

    Parameters
    ----------
    args : flags of :func:`add_eval_args`, or of :func:`add_mask_args` plus
        :func:`add_network_pass_args` (flags a script does not declare count as not given).
    trained : the settings the model was trained with (a checkpoint's ``train_config``,
        or ``TrainConfig.to_dict()`` in training); None when unknown (an upstream state
        dict). Its ``heatmap_mode`` is used unless ``--heatmap_norm`` is given, so a model
        is evaluated with the heatmap scaling it was trained with; a different
        ``--heatmap_norm`` is used, with a warning.

    model_input : the model's input (:func:`GeneSegNet.data.model_input.model_input_from_meta`);
        sets the transcript-input and image-normalisation fields, ``--image_norm``
        overriding the model's image normalisation (with a warning). None: EvalConfig's
        defaults (upstream heatmap input), ``--image_norm`` ignored.

    Only flags given override :class:`EvalConfig`'s defaults; what the model fixes comes
    from :func:`GeneSegNet.model.predict.eval_config_for_model`. Raises ``InputError`` for
    invalid settings.
    """
    from GeneSegNet.model.predict import eval_config_for_model

    settings: dict[str, Any] = {
        field: getattr(args, dest)
        for dest, field in _EVAL_FIELDS.items()
        if getattr(args, dest, None) is not None
    }
    if getattr(args, "no_resample", False) or getattr(args, "fast_mode", False):
        settings["resample"] = False
    if getattr(args, "y_only_movers", False):
        settings["y_only_movers"] = True
    if getattr(args, "no_norm", False):
        settings["normalize"] = False
    if getattr(args, "invert", False):
        settings["invert"] = True
    return eval_config_for_model(
        settings, trained, model_input, heatmap_norm=getattr(args, "heatmap_norm", None),
        image_norm=getattr(args, "image_norm", None), diam_mean=getattr(args, "diam_mean", None))


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
