"""Train GeneSegNet recursively: train, test against the original labels, refine the labels.

Each of --recursive_num rounds trains a network on the train crops (labels/ in round 1,
the refined newlabels/ afterwards), tests it on --test_dir against its original labels/,
and (except after the last round) writes refined labels for the train and validation
crops into <sample>/newlabels/. Models go to <save_model_dir>/models/, the run record to
<save_model_dir>/run_<time>.json, test outputs to <save_model_dir>/run_<time>/, and the
log is appended to <save_model_dir>/GeneSeg_train.log. --batch_size is both the training
batch and the evaluation tile batch, as upstream.

Several GPUs (or CPU processes): launch with torchrun, one process per device, e.g.
    torchrun --standalone --nproc_per_node 4 GeneSeg_train.py --use_gpu ...
--batch_size is then the global batch, split over the processes (same steps as one
process); rank 0 writes the checkpoints, the log and the run record, and the
relabelling between rounds is split across the processes by sample folder.

Example (upstream's README command):
    python GeneSeg_train.py --use_gpu --train_dir data/train --val_dir data/val
        --test_dir data/test --pretrained_model None --save_png --save_each
        --img_filter _image --mask_filter _label --all_channels --verbose --metrics
        --dir_above --save_model_dir runs/demo
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from GeneSegNet.cli import run_reporting_errors
from GeneSegNet.cli.args import add_common_args, optional_path
from GeneSegNet.cli.types import (
    fraction,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
)
from GeneSegNet.cli.upstream import check_unsupported
from GeneSegNet.dynamics import DEFAULT_FLOW_TARGET_MODE, FLOW_TARGET_MODES
from GeneSegNet.log import errors_only, setup_logging

logger = logging.getLogger("GeneSegNet.scripts.GeneSeg_train")

LOG_NAME = "GeneSeg_train.log"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, training=True, require=("train_dir",))
    g = parser.add_argument_group("training")
    g.add_argument("--save_model_dir", type=Path, required=True, help="output folder of the run")
    g.add_argument("--learning_rate", type=positive_float, default=0.001,
                   help="AdamW learning rate")
    g.add_argument("--weight_decay", type=nonnegative_float, default=1e-5,
                   help="AdamW weight decay")
    g.add_argument("--n_epochs", type=positive_int, default=500, help="epochs per round")
    g.add_argument("--min_train_masks", type=nonnegative_int, default=1,
                   help="drop crops with fewer cells")
    g.add_argument("--save_every", type=positive_int, default=100, help="save _last at e %% N == 1")
    g.add_argument("--save_each", action="store_true", help="also keep a file per save epoch")
    g.add_argument("--checkpoint_minutes", type=nonnegative_float, default=0.0,
                   help="write the resumable _last checkpoint at the end of every epoch once "
                   "this many minutes have passed since the last write (0: every epoch); "
                   "SIGINT/SIGTERM save the last completed epoch before exiting")  # fmt: skip
    g.add_argument("--recursive_num", type=positive_int, default=3,
                   help="rounds of train/test/relabel")
    g.add_argument("--nbase", type=positive_int, nargs="+", default=None,
                   help="encoder widths (default 32 64 128 256; smaller is faster)")  # fmt: skip
    g.add_argument("--resume", type=optional_path, default=None,
                   help="continue an interrupted run from its _last checkpoint")  # fmt: skip
    g.add_argument("--train_tile_size", type=positive_int, default=224,
                   help="side of the augmented training patches (smaller is faster)")  # fmt: skip
    g.add_argument("--seed", type=int, default=0, help="seed of weights, order, augmentation")
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA only)")
    g.add_argument("--num_workers", type=nonnegative_int, default=0, help="data loader processes")
    g.add_argument("--deterministic", action="store_true", help="deterministic torch kernels")
    g.add_argument("--flow_targets", choices=FLOW_TARGET_MODES, default=DEFAULT_FLOW_TARGET_MODE,
                   help="flow training targets: 'isolated' (each cell as if alone; no heat "
                        "leaks between touching cells) or 'upstream' (leaking)")
    g.add_argument("--refine_method",
                   choices=("auto", "grow", "merge", "morphology", "fast", "levelset"),
                   default="auto", help="relabelling between rounds: grow = merge the prediction "
                   "with the previous labels and grow them along the transcripts "
                   "(GeneSegNet.growth.grow; needs µm: sample info or --pixel_size); merge = "
                   "the prediction plus the previous cells it missed, no growth; "
                   "upstream's refinements (GeneSegNet.training.refine): morphology = the §6.2 "
                   "rule, quickest; fast = exact level-set result (slow for small cells); "
                   "levelset = literal upstream computation; auto (default) = grow when every "
                   "train/val crop has spots and a pixel size, else merge")  # fmt: skip
    g.add_argument("--pixel_size", type=positive_float, default=None,
                   help="µm per pixel for samples without a pixel size (used by grow)")  # fmt: skip
    g.add_argument("--no_grow_start_labels", action="store_true",
                   help="with grow: train round 1 on labels/ as they are, not grown")  # fmt: skip
    g.add_argument("--max_growth_um", type=nonnegative_float, default=None,
                   help="grow: farthest a cell grows beyond its label in one relabelling, µm "
                   "(default: GrowParams, 5)")  # fmt: skip
    g.add_argument("--new_cell_min_area_um2", type=nonnegative_float, default=None,
                   help="grow: smallest new cell made of unclaimed transcripts, µm² "
                   "(default: GrowParams, 30)")  # fmt: skip
    g.add_argument("--max_cell_loss", type=fraction, default=0.1,
                   help="warn when a relabelling loses more than this fraction of the "
                   "cells of the round's labels")  # fmt: skip
    g.add_argument("--warm_start_rounds", action="store_true",
                   help="start round N from round N-1's model (upstream: fresh)")  # fmt: skip
    g.add_argument("--relabel_min_size", type=nonnegative_int, default=300,
                   help="refined labels drop cells smaller than this (pixels)")  # fmt: skip
    g.add_argument("--relabel_last_round", action="store_true",
                   help="also refine labels after the last round (upstream; unused)")  # fmt: skip
    g.add_argument("--overwrite_newlabels", action="store_true",
                   help="replace newlabels/ of earlier runs; other such folders are moved "
                   "to newlabels.backup_<time>")  # fmt: skip
    g.add_argument("--select_model", choices=("last", "best"), default="last",
                   help="model of a round used for test and relabelling")  # fmt: skip
    g.add_argument("--flow_cache_dir", type=Path, default=None,
                   help="folder for flow targets cached by label content")  # fmt: skip
    return parser


def _configs(args: argparse.Namespace):
    from GeneSegNet.cli.args import eval_config_from_args, output_options_from_args
    from GeneSegNet.errors import InputError
    from GeneSegNet.growth.params import GrowParams
    from GeneSegNet.model.net import NetConfig
    from GeneSegNet.training.config import RecursiveConfig, TrainConfig

    try:
        net = NetConfig(nchan=args.chan, residual_on=bool(args.residual_on),
                        style_on=bool(args.style_on), concatenation=bool(args.concatenation),
                        diam_mean=args.diam_mean,
                        **({"nbase": tuple(args.nbase)} if args.nbase else {}))  # fmt: skip
        train = TrainConfig(learning_rate=args.learning_rate, weight_decay=args.weight_decay,
                            n_epochs=args.n_epochs,
                            batch_size=args.batch_size or TrainConfig.batch_size,
                            min_train_masks=args.min_train_masks, save_every=args.save_every,
                            save_each=args.save_each, seed=args.seed, tile=args.train_tile_size,
                            checkpoint_minutes=args.checkpoint_minutes,
                            heatmap_mode=args.heatmap_norm or TrainConfig.heatmap_mode,
                            bf16=args.bf16, num_workers=args.num_workers,
                            flow_target_mode=args.flow_targets)  # fmt: skip
    except ValueError as exc:
        raise InputError(f"bad settings: {exc}") from None
    recursive = RecursiveConfig(
        train_dir=args.train_dir, save_model_dir=args.save_model_dir, val_dir=args.val_dir,
        test_dir=args.test_dir, recursive_num=args.recursive_num, chan=args.chan,
        img_filter=args.img_filter, mask_filter=args.mask_filter,
        heatmap_filter=args.heatmap_filter, refined_name=args.output_filename,
        refine_method=args.refine_method, relabel_min_size=args.relabel_min_size,
        relabel_last_round=args.relabel_last_round,
        warm_start_rounds=args.warm_start_rounds, overwrite_newlabels=args.overwrite_newlabels,
        select_model=args.select_model, exclude_on_edges=args.exclude_on_edges,
        size_filter=args.size_filter, output=output_options_from_args(args),
        pixel_size_um=args.pixel_size, grow_start_labels=not args.no_grow_start_labels,
        max_cell_loss=args.max_cell_loss,
        grow=GrowParams(**{k: v for k, v in (
            ("max_growth_um", args.max_growth_um),
            ("new_cell_min_area_um2", args.new_cell_min_area_um2)) if v is not None}),
    )  # fmt: skip
    # the test passes and relabelling see heatmaps scaled as in training
    return net, train, eval_config_from_args(args, train.to_dict()), recursive


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    notes = check_unsupported(args, parser)
    if args.resume is not None and args.pretrained_model is not None:
        parser.error("--resume and --pretrained_model exclude each other")
    if args.output_filename in {"images", "labels", "spots", "HeatMaps"} or not (
        args.output_filename and args.output_filename.isprintable()
        and "/" not in args.output_filename and args.output_filename not in (".", "..")
    ):
        parser.error(f"--output_filename {args.output_filename!r}: refined labels need a folder "
                     "name of their own (not images, labels, spots, HeatMaps or a path)")
    setup_logging(args.verbose)

    def run() -> int:
        import GeneSegNet
        from GeneSegNet.io.paths import check_output_not_input, crop_input_folders
        from GeneSegNet.training.ddp import distributed_device, finish_distributed
        from GeneSegNet.training.recursive import run_recursive_training

        inputs = {str(p): p for p in crop_input_folders(args.train_dir, args.val_dir,
                                                        args.test_dir)}
        check_output_not_input(
            {"--save_model_dir": args.save_model_dir, "--flow_cache_dir": args.flow_cache_dir},
            {**inputs, "--pretrained_model": args.pretrained_model},
        )
        args.save_model_dir.mkdir(parents=True, exist_ok=True)
        env, device = distributed_device(args.use_gpu, args.gpu_device)  # torchrun: DDP
        if env.rank == 0:
            setup_logging(args.verbose, log_file=args.save_model_dir / LOG_NAME)
        else:  # the log is rank 0's; other ranks report errors only
            errors_only()
        if args.deterministic:
            _deterministic()
        if device.type == "cuda" and not args.deterministic:
            import torch

            torch.backends.cudnn.benchmark = True  # fixed-size training patches
        logger.info("GeneSegNet %s, GeneSeg_train.py, device %s%s", GeneSegNet.__version__,
                    device, f", {env.world} processes (DDP)" if env.world > 1 else "")
        for note in notes:
            logger.warning("%s", note)
        if args.output_visual != "visresults":
            logger.warning("--output_visual is not used: test outputs go under the run folder")
        if args.val_dir is None:
            logger.warning("no --val_dir: no validation loss; the last model is used")
        if args.test_dir is None:
            logger.warning("no --test_dir: no test pass")
        net, train, evaluation, recursive = _configs(args)
        logger.info("settings: %s; %s; %s; %s", net, train, evaluation, recursive)
        manifest = run_recursive_training(
            recursive, net, train, evaluation, device=device, pretrained=args.pretrained_model,
            resume=args.resume, flow_cache_dir=args.flow_cache_dir, progress=True,
            run_info={"argv": list(sys.argv[1:] if argv is None else argv)},
            image_norm=args.image_norm or "local",
        )  # fmt: skip
        logger.info("finished %d round(s); final model %s; run record %s",
                    len(manifest.rounds), manifest.rounds[-1].model_used,
                    args.save_model_dir / manifest.file_name)  # fmt: skip
        finish_distributed()
        return 0

    return run_reporting_errors(run)


def _deterministic() -> None:
    """Deterministic kernels (slower on CUDA); CPU training is deterministic anyway."""
    import os

    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


if __name__ == "__main__":
    sys.exit(main())
