"""Segment whole images (any size) with a trained GeneSegNet model by sliding windows.

For each image of <root_dir>/images/ and its spot table in <root_dir>/spots/ (paired by
sample name; an image without spots runs on the image alone) writes to <save_dir>:
label_<name>.png (.tif above 65,535 cells), label_<name>.mat (key CellMap),
label_plt_<name>.jpg and HeatMap/<name>_gaumap.tif; with --mapping also
mapping/<name>.csv and mapping/<name>_cell_by_gene.csv. By default the windows see one
image-wide heatmap and normalisation and are blended with tapered weights (no seams);
--window_local restores upstream's per-window behaviour.

Example:
    python -m Inference.slidingwindows_gradient --root_dir raw --save_dir results \\
        --model_file model.pt --mapping
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from GeneSegNet.cli import add_device_args, add_verbose_arg, run_reporting_errors
from GeneSegNet.cli.args import add_mask_args, add_network_pass_args
from GeneSegNet.cli.types import int_range, nonnegative_float, nonnegative_int, positive_float
from GeneSegNet.log import setup_logging

logger = logging.getLogger("GeneSegNet.scripts.slidingwindows_gradient")

LOG_NAME = "slidingwindows_gradient.log"
CONFIG_NAME = "slidingwindows_gradient_config.json"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--root_dir",
        type=Path,
        required=True,
        help="folder with images/ and spots/ (labels/ is not needed)",
    )
    parser.add_argument("--save_dir", type=Path, required=True, help="output folder")
    parser.add_argument("--model_file", type=Path, required=True, help="trained checkpoint")
    win = parser.add_argument_group("windows")
    win.add_argument("--sigma", type=positive_float, default=7.0,
                     help="heatmap Gaussian sigma (px)")
    win.add_argument("--window", type=int_range(16, 16384), default=256, help="window edge (px)")
    win.add_argument(
        "--overlap",
        type=nonnegative_int,
        default=None,
        help="window overlap (px); default twice the cell diameter (--window_local: upstream's 16)",
    )
    add_network_pass_args(win, batch_help="windows per forward pass")
    win.add_argument(
        "--window_local",
        action="store_true",
        help="upstream behaviour: heatmap from each window's own spots, "
        "per-window normalisation, plain average over a 16-px overlap",
    )
    win.add_argument(
        "--canvas_dtype",
        choices=("float16", "float32"),
        default="float16",
        help="storage of the blended flows and probabilities",
    )
    win.add_argument(
        "--pixel_size",
        type=positive_float,
        default=None,
        help="µm per image pixel of every image; needed by density-input models unless "
        "<root_dir>/metadata/<name>.json gives it (both must agree)",
    )
    win.add_argument(
        "--working_pixel_size",
        type=positive_float,
        default=None,
        help="µm/px to segment at (e.g. 0.5 for Xenium's 0.2125: 5.5× fewer pixels); image "
        "and spots are resampled to it, the results written at each image's own pixel size",
    )
    win.add_argument(
        "--spot_scale",
        type=positive_float,
        default=1.0,
        help="pixels per spot-coordinate unit (e.g. 4.706 for Xenium microns)",
    )
    masks = parser.add_argument_group("masks")
    add_mask_args(masks)
    masks.add_argument(
        "--block_size",
        type=int_range(64, 1 << 16),
        default=2048,
        help="masks are reconstructed in blocks of this edge (px)",
    )
    masks.add_argument(
        "--block_halo",
        type=nonnegative_int,
        default=None,
        help="context around each block (px); default twice the cell diameter",
    )
    masks.add_argument(
        "--upstream_opening",
        action="store_true",
        help="apply upstream's grey-level 5x5 opening to the label image",
    )
    masks.add_argument(
        "--no_transcript_refine",
        action="store_true",
        help="keep the network's cells as they are; by default, with a density model, "
             "spots and a pixel size, each cell is trimmed to and grown into the territory "
             "its transcripts support, or, where they are too sparse to place borders, "
             "redrawn from its nucleus in the image, as between training rounds",
    )
    masks.add_argument(
        "--smooth_um",
        type=nonnegative_float,
        default=1.0,
        help="width (µm) of the outline smoothing applied last: each pixel goes to the cell "
             "or background whose Gaussian-smoothed indicator is largest, which removes "
             "bulges toward single spots (0: off; needs a pixel size; not out of core)",
    )
    out = parser.add_argument_group("outputs")
    out.add_argument(
        "--mapping",
        action="store_true",
        help="also assign transcripts to cells (mapping/<name>.csv and "
        "mapping/<name>_cell_by_gene.csv)",
    )
    out.add_argument(
        "--out_of_bounds",
        choices=("background", "drop"),
        default="background",
        help="mapping of spots outside the image",
    )
    out.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an existing, non-empty --save_dir (its files of the same names are "
        "replaced; others are kept)",
    )
    out.add_argument("--no_heatmap", action="store_true", help="do not write the heatmap")
    out.add_argument(
        "--outputs",
        default="csv",
        help="result formats written into mapping/ (implies --mapping unless only csv): "
        "comma-separated from csv,h5ad,geojson,geoparquet,spatialdata,xenium,qc "
        "(README 'Result formats')",
    )
    _add_out_of_core_args(parser)
    add_device_args(parser)
    add_verbose_arg(parser)
    return parser


def _add_out_of_core_args(parser: argparse.ArgumentParser) -> None:
    ooc = parser.add_argument_group(
        "out of core and dask (README 'Whole slides beyond memory')")
    ooc.add_argument("--out_of_core", choices=("auto", "on", "off"), default="auto",
                     help="keep the blended field and labels in <save_dir>/label_<name>.zarr "
                     "(memory flat in slide size; resumable); auto: above --out_of_core_pixels")
    ooc.add_argument("--out_of_core_pixels", type=float, default=1e8,
                     help="auto threshold and largest slide that still gets png/mat/jpg/mapping")
    ooc.add_argument("--dask_workers", type=int, default=0,
                     help="run window batches and mask blocks on a LocalCluster of N workers "
                     "(0: in this process); with --slurm_queue: SLURM jobs")
    ooc.add_argument("--dask_threads", action="store_true",
                     help="LocalCluster workers as threads instead of processes")
    ooc.add_argument("--dask_scheduler", default=None,
                     help="address of a running dask scheduler (tcp://host:8786)")
    ooc.add_argument("--slurm_queue", default=None,
                     help="start --dask_workers dask_jobqueue.SLURMCluster jobs on this partition")
    ooc.add_argument("--slurm_cores", type=int, default=8, help="cores per SLURM job")
    ooc.add_argument("--slurm_memory", default="16GB", help="memory per SLURM job")
    ooc.add_argument("--slurm_walltime", default="04:00:00", help="walltime per SLURM job")
    ooc.add_argument("--slurm_account", default=None, help="SLURM account")


def _run_config(args: argparse.Namespace, meta: dict):
    from GeneSegNet.cli.args import eval_config_from_args
    from GeneSegNet.data.model_input import model_input_from_meta
    from GeneSegNet.errors import InputError
    from GeneSegNet.export.outputs import DEFAULT_OUTPUTS, parse_outputs
    from GeneSegNet.slide.pipeline import SlideRunConfig
    from GeneSegNet.slide.plan import SlideConfig

    outputs = parse_outputs(args.outputs)
    evaluation = eval_config_from_args(args, meta.get("train_config"),
                                       model_input=model_input_from_meta(meta))
    try:
        slide = SlideConfig(
            window=args.window,
            overlap=args.overlap,
            sigma=args.sigma,
            window_local=args.window_local,
            canvas_dtype=args.canvas_dtype,
            evaluation=evaluation,
        )
    except ValueError as exc:
        raise InputError(f"bad settings: {exc}") from None
    return SlideRunConfig(
        slide=slide,
        block_size=args.block_size,
        halo=args.block_halo,
        spot_scale=args.spot_scale,
        mapping=args.mapping or outputs != DEFAULT_OUTPUTS,
        outputs=outputs,
        out_of_bounds=args.out_of_bounds,
        write_heatmap=not args.no_heatmap,
        upstream_opening=args.upstream_opening,
        transcript_refine=not args.no_transcript_refine,
        smooth_um=args.smooth_um,
        pixel_size_um=args.pixel_size,
        metadata_dir=args.root_dir,
        working_pixel_size_um=args.working_pixel_size,
    )


def _check_paths(args: argparse.Namespace) -> None:
    """Outputs never go into the inputs; an existing output folder needs --overwrite."""
    from GeneSegNet.errors import InputError
    from GeneSegNet.io.paths import check_output_not_input, raw_input_folders

    inputs = {f"--root_dir {p.name}/": p for p in raw_input_folders(args.root_dir)}
    check_output_not_input({"--save_dir": args.save_dir},
                           {**inputs, "--model_file": args.model_file})
    save_dir = args.save_dir
    if not save_dir.is_dir() or args.overwrite or not any(save_dir.iterdir()):
        return
    if (save_dir / CONFIG_NAME).is_file():  # an earlier run of this script: rerun / resume
        logger.warning("%s holds an earlier run's outputs: those of the same names are "
                       "replaced (an out-of-core store is resumed)", save_dir)
        return
    raise InputError("output folder exists, is not empty and was not written by this script "
                     "(use --overwrite to write into it anyway)", save_dir)


def _run(args: argparse.Namespace) -> int:
    from GeneSegNet.device import get_device
    from GeneSegNet.errors import InputError
    from GeneSegNet.model.checkpoint import load_checkpoint
    from GeneSegNet.slide.files import check_output_dir, discover_slides
    from GeneSegNet.slide.pipeline import run_slides

    # Every check runs before the first long step (run_slides reads all inputs first).
    _check_paths(args)
    try:
        device = get_device(args.use_gpu, args.gpu_device)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    net, meta = load_checkpoint(args.model_file, device)
    samples = discover_slides(args.root_dir)
    save_dir = check_output_dir(args.save_dir)
    setup_logging(args.verbose, log_file=save_dir / LOG_NAME)
    cfg = _run_config(args, meta)
    logger.info("model %s on %s: %d image(s); %s", args.model_file, device, len(samples), cfg)
    if _out_of_core(args, net, meta, samples, save_dir, cfg, device):
        return 0
    run_slides(net, meta, samples, save_dir, cfg, device=device, config_path=save_dir / CONFIG_NAME)
    return 0


def _out_of_core(args, net, meta, samples, save_dir, cfg, device) -> bool:
    """Run every slide out of core when --out_of_core decides so; False otherwise."""
    from GeneSegNet.data.model_input import model_input_from_meta
    from GeneSegNet.errors import InputError
    from GeneSegNet.io.layout import channels_for
    from GeneSegNet.slide.slides_ooc import (
        OutOfCoreConfig,
        run_slides_out_of_core,
        use_out_of_core,
    )

    dask = None
    if args.dask_workers or args.dask_scheduler or args.slurm_queue:
        from GeneSegNet.slide.distributed import DaskSettings

        if args.dask_workers < 0 or (args.slurm_queue and args.dask_workers < 1):
            raise InputError("--dask_workers must be >= 1 with --slurm_queue (and >= 0)")
        slurm = None
        if args.slurm_queue:
            slurm = {"queue": args.slurm_queue, "cores": args.slurm_cores,
                     "processes": 1, "memory": args.slurm_memory,
                     "walltime": args.slurm_walltime, "account": args.slurm_account}
        dask = DaskSettings(workers=max(args.dask_workers, 1), processes=not args.dask_threads,
                            scheduler=args.dask_scheduler, slurm=slurm)
    ooc = OutOfCoreConfig(mode="on" if dask is not None and args.out_of_core == "auto"
                          else args.out_of_core, limit_pixels=args.out_of_core_pixels,
                          in_memory_outputs=args.out_of_core_pixels)
    n_trans = model_input_from_meta(meta).n_transcripts
    if not use_out_of_core(samples, ooc, channels_for(net.config.nchan - n_trans + 1)):
        if dask is not None:
            raise InputError("dask execution needs --out_of_core auto or on")
        return False
    if cfg.working_pixel_size_um is not None:
        raise InputError("--working_pixel_size is for in-memory slides; out of core, segment "
                         "at the slide's own pixel size (or --out_of_core off)")
    run_slides_out_of_core(net, meta, samples, save_dir, cfg, ooc, device=device, dask=dask,
                           config_path=save_dir / CONFIG_NAME)
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    return run_reporting_errors(lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
