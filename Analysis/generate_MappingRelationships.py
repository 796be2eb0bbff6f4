"""Assign each transcript to the cell under it and count transcripts per cell and gene.

For every spot table in ``--spot_dir`` (raw, full-resolution coordinates) and its label
image in ``--label_dir`` (png, tif, mat with key CellMap, or npy; paired by sample
name, so ``label_<name>.png`` from the inference script matches ``<name>.csv``) writes

- ``<save_dir>/<name>.csv``: cell_id,spotX,spotY,gene (cell_id 0 = background);
- ``<save_dir>/<name>_cell_by_gene.csv``: transcript counts, cells as rows.

``--outputs`` adds result formats (h5ad, geojson, geoparquet, spatialdata, xenium, qc;
README "Result formats"); any value other than the default ``csv`` also appends the
distance and nearest-cell columns to the mapping CSV.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from GeneSegNet.cli import add_verbose_arg, run_reporting_errors
from GeneSegNet.cli.types import positive_float
from GeneSegNet.log import setup_logging

logger = logging.getLogger("GeneSegNet.scripts.generate_MappingRelationships")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--label_dir", type=Path, default=Path("results"),
                        help="folder of label images (e.g. the inference output)")
    parser.add_argument("--spot_dir", type=Path, default=Path("raw_data/spots"),
                        help="folder of raw spot tables")
    parser.add_argument("--save_dir", type=Path, default=Path("mapping"), help="output folder")
    parser.add_argument("--out_of_bounds", choices=("background", "drop"), default="background",
                        help="spots outside the image or with invalid coordinates: write them "
                             "with cell id 0, or drop them")
    parser.add_argument("--spot_scale", type=positive_float, default=1.0,
                        help="pixels per spot-coordinate unit (e.g. 4.706 for Xenium microns)")
    parser.add_argument("--outputs", default="csv",
                        help="comma-separated result formats: csv,h5ad,geojson,geoparquet,"
                             "spatialdata,xenium,qc (default: upstream's csv only)")
    parser.add_argument("--pixel_size", type=positive_float, default=None,
                        help="µm per image pixel (needed by h5ad, spatialdata, xenium, qc "
                             "unless <metadata_dir>/metadata/<name>.json gives it)")
    parser.add_argument("--metadata_dir", type=Path, default=None,
                        help="folder holding metadata/<name>.json (e.g. the raw data folder)")
    parser.add_argument("--image_dir", type=Path, default=None,
                        help="folder of the DAPI images (<name>.png/.tif), for mean_dapi and "
                             "the chromatin features of the h5ad")
    add_verbose_arg(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def run() -> int:
        from GeneSegNet.export.outputs import DEFAULT_OUTPUTS, parse_outputs
        from GeneSegNet.io.paths import check_output_not_input
        from GeneSegNet.mapping import map_dataset

        check_output_not_input(
            {"--save_dir": args.save_dir},
            {"--label_dir": args.label_dir, "--spot_dir": args.spot_dir,
             "--image_dir": args.image_dir,
             "--metadata_dir metadata": args.metadata_dir and args.metadata_dir / "metadata"},
        )

        outputs = parse_outputs(args.outputs)
        if args.outputs != "csv" or outputs != DEFAULT_OUTPUTS:
            from GeneSegNet.export.dataset import export_dataset

            done = export_dataset(args.label_dir, args.spot_dir, args.save_dir, outputs,
                                  image_dir=args.image_dir, pixel_size_um=args.pixel_size,
                                  metadata_dir=args.metadata_dir,
                                  out_of_bounds=args.out_of_bounds, spot_scale=args.spot_scale,
                                  progress=True)
            logger.info("%s of %d sample(s) written to %s", ",".join(outputs), len(done),
                        args.save_dir)
            return 0
        results = map_dataset(args.label_dir, args.spot_dir, args.save_dir,
                              out_of_bounds=args.out_of_bounds, spot_scale=args.spot_scale,
                              progress=True)
        logger.info("mapping of %d sample(s) written to %s", len(results), args.save_dir)
        return 0

    return run_reporting_errors(run)


if __name__ == "__main__":
    sys.exit(main())
