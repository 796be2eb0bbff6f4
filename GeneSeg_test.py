"""Segment a test set with a trained GeneSegNet model; optionally score it against labels.

For every sample folder of --test_dir the predicted label images (and the figures and
files asked for) go to <sample>/<--output_visual>/ (default visresults), or to
<--savedir>/<sample>/. With --metrics, crops with labels are scored (AP@0.5/0.75/0.9,
AJI, best IoU, gene IoU) into metrics_*.csv/json in --test_dir (or --savedir). Input
files are never changed or deleted. The log is appended to GeneSeg_test.log there.

Example:
    python GeneSeg_test.py --test_dir data/test --pretrained_model model.pt --save_png --metrics
"""

from __future__ import annotations

import argparse
import logging
import sys

from GeneSegNet.cli import run_reporting_errors
from GeneSegNet.cli.args import add_common_args
from GeneSegNet.cli.upstream import check_unsupported
from GeneSegNet.log import setup_logging

logger = logging.getLogger("GeneSegNet.scripts.GeneSeg_test")

LOG_NAME = "GeneSeg_test.log"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Flags only meaningful for training (--train_dir, --val_dir, "
        "--output_filename) are accepted and reported as unused.",
    )
    add_common_args(parser, training=False, require=("test_dir",))
    return parser


def _unused_flag_notes(args: argparse.Namespace) -> list[str]:
    notes = [
        f"--{name} is not used by GeneSeg_test.py"
        for name in ("train_dir", "val_dir")
        if getattr(args, name) is not None
    ]
    if args.output_filename != "newlabels":
        notes.append(
            "--output_filename is not used by GeneSeg_test.py (it names the refined "
            "label folder written by training; nothing is deleted here)"
        )
    return notes


def _architecture_notes(args: argparse.Namespace, meta: dict) -> list[str]:
    """Warnings for architecture flags that differ from the checkpoint, which rules."""
    cfg = meta["net_config"]
    given = {
        "residual_on": args.residual_on,
        "style_on": args.style_on,
        "concatenation": args.concatenation,
    }
    notes = [
        f"--{k} {v} differs from the checkpoint ({k}={bool(cfg[k])}); the checkpoint's "
        "architecture is used"
        for k, v in given.items()
        if v is not None and bool(v) != bool(cfg[k])
    ]
    if args.diam_mean is not None and args.diam_mean != meta["diam_mean"]:
        notes.append(
            f"--diam_mean {args.diam_mean} differs from the checkpoint's "
            f"{meta['diam_mean']}; the checkpoint's value is used"
        )
    return notes


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    notes = check_unsupported(args, parser) + _unused_flag_notes(args)
    if args.pretrained_model is None:
        parser.error("--pretrained_model is required: the checkpoint to test")
    setup_logging(args.verbose)

    def run() -> int:
        import GeneSegNet
        from GeneSegNet.cli.args import eval_config_from_args, output_options_from_args
        from GeneSegNet.data.model_input import check_model_channels, model_input_from_meta
        from GeneSegNet.device import get_device
        from GeneSegNet.errors import InputError
        from GeneSegNet.evaluation.test_pass import evaluate_dataset, format_metrics
        from GeneSegNet.model.checkpoint import load_checkpoint

        if not args.test_dir.is_dir():
            raise InputError("test folder not found", args.test_dir)
        from GeneSegNet.io.paths import check_output_not_input, crop_input_folders

        inputs = {str(p): p for p in crop_input_folders(args.test_dir)}
        check_output_not_input({"--savedir": args.savedir},
                               {**inputs, "--pretrained_model": args.pretrained_model})
        out_root = args.savedir if args.savedir is not None else args.test_dir
        setup_logging(args.verbose, log_file=out_root / LOG_NAME)
        output = output_options_from_args(args)
        device = get_device(args.use_gpu, args.gpu_device)
        logger.info("GeneSegNet %s, GeneSeg_test.py, device %s", GeneSegNet.__version__, device)
        for note in notes:
            logger.warning("%s", note)
        net, meta = load_checkpoint(args.pretrained_model, device)
        model_input = model_input_from_meta(meta)
        check_model_channels(net.config.nchan, args.chan, model_input, args.pretrained_model)
        for note in _architecture_notes(args, meta):
            logger.warning("%s", note)
        cfg = eval_config_from_args(args, meta.get("train_config"), model_input=model_input)
        logger.info(
            "model %s: diam_mean %.3g, diam_labels %.3g",
            args.pretrained_model,
            meta["diam_mean"],
            meta["diam_labels"],
        )
        logger.info("settings: %s; %s", cfg, output)
        result = evaluate_dataset(
            net,
            meta,
            args.test_dir,
            cfg,
            chan=args.chan,
            img_filter=args.img_filter,
            mask_filter=args.mask_filter,
            heatmap_filter=args.heatmap_filter,
            output=output,
            metrics=args.metrics,
            exclude_on_edges=args.exclude_on_edges,
            size_filter=args.size_filter,
            device=device,
            progress=True,
            run_info={
                "pretrained_model": str(args.pretrained_model),
                "version": GeneSegNet.__version__,
                "argv": list(sys.argv[1:]) if argv is None else list(argv),
            },
        )
        logger.info(
            "%d crop(s) of %d sample(s) segmented; outputs under %s",
            result["n_crops"],
            result["n_samples"],
            args.savedir
            if args.savedir is not None
            else f"{args.test_dir}/<sample>/{args.output_visual}",
        )
        if result["metrics"] is not None:
            logger.info("%s", format_metrics(result["metrics"]))
            logger.info("metrics files: %s", ", ".join(map(str, result["metrics_files"])))
        logger.info("log: %s", out_root / LOG_NAME)
        return 0

    return run_reporting_errors(run)


if __name__ == "__main__":
    sys.exit(main())
