"""Relabelling between recursive rounds (spec §6.1 step 3): predicted masks -> refined labels.

For every train and validation crop: predict, renumber, fill holes / drop cells smaller
than ``relabel_min_size``, the round's refinement (:func:`refine_round_labels`, the one
place where the refinement method is chosen), fill holes / drop small cells again,
renumber, and write ``<sample>/<refined_name>/<label file name>``.

Safety: a sample's refined-label folder is written completely in a staging folder and
then swapped in, with a marker file (:data:`MARKER`) naming the run and round. A
refined-label folder that exists before round 1 and was not written by this run stops
the run, unless ``overwrite_newlabels``: it is then moved aside to
``<refined_name>.backup_<stamp>``, whether an earlier GeneSegNet run wrote it or not
(never deleted).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

import GeneSegNet
from GeneSegNet.data.dataset import Crop, sample_folders
from GeneSegNet.dynamics.masks import fill_holes_and_remove_small_masks, renumber
from GeneSegNet.errors import InputError
from GeneSegNet.io import staged_directory, write_label
from GeneSegNet.io.records import write_json
from GeneSegNet.model.predict import EvalConfig, predict_crop
from GeneSegNet.training.config import RELABEL_MIN_SIZE, RecursiveConfig
from GeneSegNet.training.manifest import RelabelRecord
from GeneSegNet.training.refine import refine_labels

logger = logging.getLogger(__name__)

MARKER = ".genesegnet_labels.json"


def refine_round_labels(
    labels: np.ndarray,
    round_index: int,
    *,
    method: str,
    crop: Crop | None = None,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """The refinement of round ``round_index``: cleaned-up predicted labels -> refined labels.

    THE HOOK where the per-round refinement method is chosen. ``labels``: int32 [H, W]
    predicted cells (renumbered, holes filled, small cells dropped); ``crop``: the crop
    they were predicted on (image, spot pixels ``crop.spots_xy`` (x, y), the round's
    input labels ``crop.labels``), for methods that use more than the masks, such as a
    transcript-driven growth (``GeneSegNet.training.grow``): add its method name to the
    choices validated by :class:`GeneSegNet.training.config.RecursiveConfig` and dispatch
    on it here. Returns int32 [H, W].
    """
    # Only the level-set family of GeneSegNet.training.refine is wired in so far.
    return refine_labels(labels, round_index, method=method, device=device)


def postprocess_pseudo_labels(
    masks: np.ndarray,
    round_index: int,
    *,
    method: str = "morphology",
    min_size: int = RELABEL_MIN_SIZE,
    crop: Crop | None = None,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Predicted masks -> next round's training labels (spec §6.1 step 3).

    renumber (raster order) -> drop cells < ``min_size`` px and fill holes ->
    :func:`refine_round_labels` -> drop small cells and fill holes -> renumber.

    Returns int32 [H, W], cells 1..K.
    """
    out = fill_holes_and_remove_small_masks(renumber(masks, order="first"), min_size=min_size)
    out = refine_round_labels(out, round_index, method=method, crop=crop, device=device)
    out = fill_holes_and_remove_small_masks(out, min_size=min_size)
    return renumber(out, order="first")


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a refined-label folder (run id, round...), None if absent or bad."""
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def relabel_folders(rc: RecursiveConfig) -> list[Path]:
    """Sample folders whose labels the run refines (train and validation sets)."""
    return [folder for root in rc.relabel_roots() for folder in sample_folders(root)]


def claim_folder(target: Path, rc: RecursiveConfig, run_id: str, *, dry_run: bool) -> str | None:
    """May this run write the refined-label folder ``target``? Raises InputError if not.

    Allowed: no folder, or one written by this run. With ``overwrite_newlabels`` also a
    folder of another GeneSegNet run or any other folder, which is moved aside to
    ``<name>.backup_<time>`` (unless ``dry_run``; never deleted). Returns a note or None.
    """
    if not target.exists():
        return None
    marker = read_marker(target)
    if marker is not None and marker.get("run_id") == run_id:
        return None
    if not rc.overwrite_newlabels:
        origin = "an earlier GeneSegNet run" if marker else "not GeneSegNet"
        raise InputError(
            f"refined-label folder exists ({origin}) and training would replace it; move it "
            "away or pass --overwrite_newlabels (which moves it to "
            f"{rc.refined_name}.backup_<time>)",
            target,
        )
    origin = f"written by run {marker.get('run_id')}" if marker else "not written by GeneSegNet"
    backup = target.with_name(f"{target.name}.backup_{datetime.now():%Y_%m_%d_%H_%M_%S_%f}")
    if not dry_run:
        os.replace(target, backup)
        logger.warning("moved %s (%s) to %s", target, origin, backup)
    return f"{target} ({origin}) is moved to {target.name}.backup_<time>"


def check_refined_folders(rc: RecursiveConfig, run_id: str, first_round: int) -> None:
    """Before any work: may a run starting at ``first_round`` write its refined labels?

    Round 1: every existing refined-label folder must be claimable (:func:`claim_folder`,
    dry run; notes are logged). A resumed round N >= 2 needs this run's round N-1 labels
    in every sample folder. Raises InputError otherwise.
    """
    for folder in relabel_folders(rc):
        target = folder / rc.refined_name
        if first_round == 1:
            note = claim_folder(target, rc, run_id, dry_run=True)
            if note:
                logger.warning("%s", note)
            continue
        marker = read_marker(target)
        if marker is None or marker.get("run_id") != run_id:
            raise InputError(
                f"cannot resume round {first_round}: this run's refined labels are missing",
                target,
            )
        if int(marker.get("round", -1)) != first_round - 1:
            raise InputError(
                f"cannot resume round {first_round}: the refined labels come "
                f"from round {marker.get('round')}",
                target,
            )


def relabel_dataset(
    net: torch.nn.Module,
    meta: dict[str, Any],
    crops: list[Crop],
    rc: RecursiveConfig,
    eval_cfg: EvalConfig,
    round_index: int,
    run_id: str,
    *,
    device: torch.device | str,
    progress: bool = False,
) -> RelabelRecord:
    """Predict and post-process every crop; write each sample's refined-label folder.

    All folders are staged first and swapped in at the end (an error leaves every
    existing folder untouched). Returns the counts for the manifest.
    """
    by_sample: dict[Path, list[Crop]] = {}
    for crop in crops:
        by_sample.setdefault(crop.image_path.parent.parent, []).append(crop)
    for folder in by_sample:
        claim_folder(folder / rc.refined_name, rc, run_id, dry_run=False)
    diam = {"diam_mean": float(meta["diam_mean"]), "diam_labels": float(meta["diam_labels"])}
    marker = {
        "run_id": run_id,
        "round": round_index,
        "written": datetime.now().isoformat(),
        "version": GeneSegNet.__version__,
    }
    n_cells, written = 0, []
    with contextlib.ExitStack() as stack:
        for folder, sample_crops in by_sample.items():
            stage = stack.enter_context(staged_directory(folder / rc.refined_name, overwrite=True))
            for crop in sample_crops:
                pred = predict_crop(net, crop, eval_cfg, device=device, **diam)
                labels = postprocess_pseudo_labels(
                    pred.masks,
                    round_index,
                    method=rc.refine_method,
                    min_size=rc.relabel_min_size,
                    crop=crop,
                    device=device,
                )
                assert crop.label_path is not None
                write_label(stage / crop.label_path.name, labels)
                n_cells += int(labels.max(initial=0))
            write_json(stage / MARKER, {**marker, "n_crops": len(sample_crops)})
            written.append(folder / rc.refined_name)
    logger.info(
        "round %d: refined labels of %d crops (%d cells) written to %d folder(s)",
        round_index,
        len(crops),
        n_cells,
        len(written),
    )
    return RelabelRecord(n_crops=len(crops), n_cells=n_cells, folders=written)
