"""Relabelling between recursive rounds (spec §6.1 step 3): predicted masks -> refined labels.

For every train and validation crop: predict, renumber, fill holes / drop cells smaller
than ``relabel_min_size``, the round's refinement (:func:`refine_round_labels`, the one
place where the refinement method is chosen), fill holes / drop small cells again,
renumber, and write ``<sample>/<refined_name>/<label file name>``.

Method ``"grow"`` (:func:`grow_round_labels`): the prediction is merged with the crop's
previous labels (:func:`GeneSegNet.growth.merge.merge_with_previous`: a previous cell
survives unless the model and the transcripts both reject it), then grown along the
crop's transcripts (:func:`GeneSegNet.growth.grow.grow_labels`); no cell is dropped
after the hook. Before round 1 the starting labels can be grown too
(:func:`grow_start_labels`, written as round 0's refined labels). ``"auto"`` resolves to
``"grow"`` when every crop has spots and a pixel size (:func:`resolve_refine_method`).
Every written label set is summarised for the manifest (:func:`summarise_labels`).

Safety: a sample's refined-label folder is written completely in a staging folder and
then swapped in, with a marker file naming the run and round; which folders a run may
write is decided in :mod:`GeneSegNet.training.label_folders`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

import GeneSegNet
from GeneSegNet.data.dataset import Crop
from GeneSegNet.dynamics.masks import fill_holes_and_remove_small_masks, renumber
from GeneSegNet.errors import InputError
from GeneSegNet.growth.grow import grow_labels, regrow_whole_cells
from GeneSegNet.growth.merge import label_stats, merge_with_previous
from GeneSegNet.growth.params import GrowParams
from GeneSegNet.io import staged_directory, write_label
from GeneSegNet.io.records import write_json
from GeneSegNet.model.predict import EvalConfig, predict_crop
from GeneSegNet.training.config import (
    AUTO_METHOD,
    FALLBACK_METHOD,
    GROW_METHOD,
    MERGE_METHOD,
    RELABEL_MIN_SIZE,
    RecursiveConfig,
)
from GeneSegNet.training.label_folders import MARKER, claim_folder
from GeneSegNet.training.manifest import LabelSetStats, RelabelRecord
from GeneSegNet.training.refine import refine_labels

logger = logging.getLogger(__name__)



def sample_folder_of(crop: Crop) -> Path:
    """The sample folder a crop was loaded from (``<sample>/images/<file>``)."""
    return crop.image_path.parent.parent


def crop_pixel_size(crop: Crop, fallback: float | None = None) -> float | None:
    """µm/px of a crop: its sample's pixel size, else ``fallback`` (``--pixel_size``)."""
    size = getattr(crop, "pixel_size_um", None)
    return float(size) if size is not None else fallback


def require_pixel_size(crop: Crop, fallback: float | None = None) -> float:
    """:func:`crop_pixel_size`, or InputError naming the sample folder and ``--pixel_size``."""
    size = crop_pixel_size(crop, fallback)
    if size is None:
        raise InputError(
            f"relabelling method {GROW_METHOD!r} measures growth in µm, so µm are asked for: "
            "this sample has no pixel size; give its pixel size (sample info) or pass "
            "--pixel_size (µm per pixel), or choose another --refine_method",
            sample_folder_of(crop),
        )
    return size


def crop_spots(crop: Crop) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A crop's spots as float64 (N,) rows (y) and cols (x) in crop pixels and int64 (N,)
    gene codes (indices into the sorted gene names of the crop; all 0 when the crop's gene
    names are unknown or not aligned with its spots)."""
    xy = np.asarray(crop.spots_xy).reshape(-1, 2)
    genes = np.asarray(getattr(crop, "spot_genes", np.zeros(0)))
    if genes.shape == (len(xy),) and len(xy):
        _, codes = np.unique(genes.astype(str), return_inverse=True)
    else:
        if len(xy):
            logger.debug("%s: no gene names aligned with its %d spots", crop.name, len(xy))
        codes = np.zeros(len(xy), dtype=np.int64)
    return (xy[:, 1].astype(np.float64), xy[:, 0].astype(np.float64),
            codes.reshape(-1).astype(np.int64))  # fmt: skip


def grow_round_labels(
    predicted: np.ndarray,
    crop: Crop | None,
    *,
    pixel_size_um: float | None = None,
    params: GrowParams | None = None,
    merge_counts: dict[str, int] | None = None,
) -> np.ndarray:
    """Method ``"grow"``: merge the prediction with the crop's previous labels, then grow.

    ``predicted``: int [H, W] cleaned-up predicted cells; ``crop.labels``: int [H, W] the
    labels the round trained on (the previous round's labels of this crop). The merge
    keeps every predicted cell and adds back every previous cell the model missed unless
    its transcript density is at background level
    (:func:`GeneSegNet.growth.merge.merge_with_previous`); the result then grows into
    the territory its transcripts support (trimmed to it first: cells keep their core)
    and gains transcript-dense new cells (:func:`GeneSegNet.growth.grow.grow_labels`),
    or, where transcripts are too sparse to place borders, is redrawn from the nuclei in
    ``crop.image`` (:func:`GeneSegNet.growth.nuclear.regrow_from_nuclei`).
    ``pixel_size_um``: µm/px used when the crop has none; InputError when neither is known.
    ``merge_counts``: if given, the merge counts (``kept``, ``added_back``, ``dropped``)
    are added to it.
    Returns int32 [H, W].
    """
    if crop is None or crop.labels is None:
        raise InputError(f"relabelling method {GROW_METHOD!r} needs the crop and its labels")
    size = require_pixel_size(crop, pixel_size_um)
    params = params or GrowParams()
    rows, cols, genes = crop_spots(crop)
    merged, counts = merge_with_previous(predicted, crop.labels, rows, cols,
                                         pixel_size_um=size, params=params)  # fmt: skip
    if merge_counts is not None:
        for key, value in counts.items():
            merge_counts[key] = merge_counts.get(key, 0) + int(value)
    # the merged cells are whole cells already: trimmed to their transcripts and grown
    # again where transcripts place borders; where they are sparse, redrawn from their
    # nuclei in the crop's image, grown by the pooled transcript reach
    return regrow_whole_cells(merged, rows, cols, genes, pixel_size_um=size, params=params,
                              image=crop.image)


def refine_round_labels(
    labels: np.ndarray,
    round_index: int,
    *,
    method: str,
    crop: Crop | None = None,
    device: torch.device | str = "cpu",
    pixel_size_um: float | None = None,
    grow_params: GrowParams | None = None,
    merge_counts: dict[str, int] | None = None,
) -> np.ndarray:
    """The refinement of round ``round_index``: cleaned-up predicted labels -> refined labels.

    THE HOOK where the per-round refinement method is chosen. ``labels``: int32 [H, W]
    predicted cells (renumbered, holes filled, small cells dropped); ``crop``: the crop
    they were predicted on (image, spot pixels ``crop.spots_xy`` (x, y), the round's
    input labels ``crop.labels``), for methods that use more than the masks.
    ``"grow"``: :func:`grow_round_labels` (``pixel_size_um``: µm/px fallback,
    ``grow_params``, ``merge_counts`` are passed on); the level-set family:
    :func:`GeneSegNet.training.refine.refine_labels`. A new method: add its name to
    :data:`GeneSegNet.training.config.RELABEL_METHODS` and dispatch on it here.
    Returns int32 [H, W].
    """
    if method == GROW_METHOD:
        return grow_round_labels(labels, crop, pixel_size_um=pixel_size_um,
                                 params=grow_params, merge_counts=merge_counts)  # fmt: skip
    if method == MERGE_METHOD:
        return merge_round_labels(labels, crop, params=grow_params, merge_counts=merge_counts)
    return refine_labels(labels, round_index, method=method, device=device)


def merge_round_labels(
    predicted: np.ndarray,
    crop: Crop | None,
    *,
    params: GrowParams | None = None,
    merge_counts: dict[str, int] | None = None,
) -> np.ndarray:
    """Method ``"merge"``: the predicted cells plus the previous cells the model missed
    (:func:`GeneSegNet.growth.merge.merge_with_previous`), with no growth or dilation.

    Needs no pixel size; with transcripts, a missed cell at background density is dropped,
    without any, every missed cell is kept (no collapse). Returns int32 [H, W].
    """
    if crop is None or crop.labels is None:
        raise InputError(f"relabelling method {MERGE_METHOD!r} needs the crop and its labels")
    rows, cols, _ = crop_spots(crop)
    size = crop_pixel_size(crop, None) or 1.0  # only scales the density levels
    merged, counts = merge_with_previous(predicted, crop.labels, rows, cols,
                                         pixel_size_um=size, params=params or GrowParams())
    if merge_counts is not None:
        for key, value in counts.items():
            merge_counts[key] = merge_counts.get(key, 0) + int(value)
    return merged


def postprocess_pseudo_labels(
    masks: np.ndarray,
    round_index: int,
    *,
    method: str = "morphology",
    min_size: int = RELABEL_MIN_SIZE,
    crop: Crop | None = None,
    device: torch.device | str = "cpu",
    pixel_size_um: float | None = None,
    grow_params: GrowParams | None = None,
    merge_counts: dict[str, int] | None = None,
) -> np.ndarray:
    """Predicted masks -> next round's training labels (spec §6.1 step 3).

    renumber (raster order) -> drop cells < ``min_size`` px and fill holes ->
    :func:`refine_round_labels` -> drop small cells and fill holes -> renumber. With
    ``"grow"`` the step after the hook is a renumbering only: growth never shrinks a cell
    and fills small background holes itself, and a previous cell kept by the merge must
    not be dropped for its size (no collapse).

    Returns int32 [H, W], cells 1..K.
    """
    out = fill_holes_and_remove_small_masks(renumber(masks, order="first"), min_size=min_size)
    out = refine_round_labels(out, round_index, method=method, crop=crop, device=device,
                              pixel_size_um=pixel_size_um, grow_params=grow_params,
                              merge_counts=merge_counts)  # fmt: skip
    if method not in (GROW_METHOD, MERGE_METHOD):  # a kept cell is never dropped for its size
        out = fill_holes_and_remove_small_masks(out, min_size=min_size)
    return renumber(out, order="first")


class LabelSummary:
    """Accumulates :func:`GeneSegNet.growth.merge.label_stats` over crops into a
    :class:`GeneSegNet.training.manifest.LabelSetStats` (cells summed, areas pooled for
    the median, transcripts in cells summed). Areas are µm² when every added crop has a
    pixel size (its own or ``fallback``), else px²."""

    def __init__(self, fallback_pixel_size: float | None = None) -> None:
        self.fallback = fallback_pixel_size
        self.n_crops = self.n_cells = self.n_spots = 0
        self.n_in_cells = 0.0
        self.areas_px: list[np.ndarray] = []
        self.pixel_areas: list[float | None] = []  # µm² per px of each crop

    def add(self, labels: np.ndarray, crop: Crop) -> None:
        """Add one crop's int [H, W] labels with the crop's spots."""
        labels = np.asarray(labels)
        rows, cols, _ = crop_spots(crop)
        stats = label_stats(labels, rows, cols, 1.0)
        inside = (rows >= 0) & (cols >= 0) & (rows < labels.shape[0]) & (cols < labels.shape[1])
        n_inside = int(inside.sum())
        areas = np.bincount(labels.ravel().astype(np.int64))[1:]
        size = crop_pixel_size(crop, self.fallback)
        self.n_crops += 1
        self.n_cells += int(stats["n_cells"])
        self.n_spots += n_inside
        if n_inside:
            self.n_in_cells += float(stats["fraction_transcripts_in_cells"]) * n_inside
        self.areas_px.append(areas[areas > 0])
        self.pixel_areas.append(None if size is None else size**2)

    def result(self) -> LabelSetStats:
        in_um = bool(self.pixel_areas) and all(a is not None for a in self.pixel_areas)
        scaled = [
            a * (p if in_um else 1.0)
            for a, p in zip(self.areas_px, self.pixel_areas, strict=True)
        ]
        areas = np.concatenate(scaled) if scaled else np.zeros(0)
        return LabelSetStats(
            n_crops=self.n_crops,
            n_cells=self.n_cells,
            median_area=float(np.median(areas)) if areas.size else float("nan"),
            area_unit="um2" if in_um else "px2",
            fraction_transcripts_in_cells=(
                round(self.n_in_cells) / self.n_spots if self.n_spots else float("nan")
            ),
            n_transcripts=self.n_spots,
        )


def summarise_labels(crops: list[Crop], fallback_pixel_size: float | None = None
                     ) -> LabelSetStats:  # fmt: skip
    """:class:`LabelSummary` of the crops' own labels (crops without labels are skipped)."""
    summary = LabelSummary(fallback_pixel_size)
    for crop in crops:
        if crop.labels is not None:
            summary.add(crop.labels, crop)
    return summary.result()


def resolve_refine_method(rc: RecursiveConfig, crops: list[Crop]) -> RecursiveConfig:
    """``rc`` with ``"auto"`` resolved against the train/validation ``crops``; checks grow.

    ``"auto"`` -> ``"grow"`` when every crop has spots and a pixel size (its sample's or
    ``rc.pixel_size_um``), else ``"morphology"`` with the reason logged. An explicit
    ``"grow"`` needs a pixel size for every crop: InputError naming the first sample
    folder without one (and ``--pixel_size``).
    """
    if rc.refine_method == GROW_METHOD:
        for crop in crops:
            require_pixel_size(crop, rc.pixel_size_um)
        return rc
    if rc.refine_method != AUTO_METHOD:
        return rc
    no_spots = sorted({c.sample for c in crops if len(c.spots_xy) == 0})
    no_size = sorted({c.sample for c in crops if crop_pixel_size(c, rc.pixel_size_um) is None})
    if crops and not no_spots and not no_size:
        logger.info("relabelling method %r: every crop has spots and a pixel size", GROW_METHOD)
        return replace(rc, refine_method=GROW_METHOD)
    reasons = []
    if not crops:
        reasons.append("no crops")
    if no_spots:
        reasons.append(f"crops without spots in sample(s) {', '.join(no_spots[:5])}")
    if no_size:
        reasons.append(f"no pixel size (sample info or --pixel_size) for sample(s) "
                       f"{', '.join(no_size[:5])}")  # fmt: skip
    logger.info("relabelling method %r, not %r: %s", FALLBACK_METHOD, GROW_METHOD,
                "; ".join(reasons))  # fmt: skip
    return replace(rc, refine_method=FALLBACK_METHOD)


def warn_cell_loss(what: str, before: int, after: int, max_loss: float) -> bool:
    """Log a WARNING when ``after`` cells are fewer than ``before`` by more than the
    fraction ``max_loss`` (``--max_cell_loss``); ``what`` names the round and dataset.
    Returns whether it warned."""
    if before <= 0 or after >= before * (1.0 - max_loss):
        return False
    logger.warning(
        "%s: the new labels hold %d cells, %d fewer than the %d cells of the previous "
        "labels (%.0f %% lost > --max_cell_loss %.0f %%)",
        what, after, before - after, before, 100.0 * (before - after) / before, 100.0 * max_loss,
    )  # fmt: skip
    return True


def write_refined_labels(
    crops: list[Crop],
    rc: RecursiveConfig,
    run_id: str,
    round_index: int,
    make_labels: Callable[[Crop], np.ndarray],
) -> tuple[LabelSummary, list[Path]]:
    """Write ``make_labels(crop)`` (int [H, W]) of every crop into its sample's
    refined-label folder, marked with ``run_id`` and ``round_index``.

    All folders are staged first and swapped in at the end (an error leaves every
    existing folder untouched). Returns the summary of the written labels and the folders.
    """
    by_sample: dict[Path, list[Crop]] = {}
    for crop in crops:
        by_sample.setdefault(sample_folder_of(crop), []).append(crop)
    for folder in by_sample:
        claim_folder(folder / rc.refined_name, rc, run_id, dry_run=False)
    marker = {
        "run_id": run_id,
        "round": round_index,
        "written": datetime.now().isoformat(),
        "version": GeneSegNet.__version__,
    }
    summary, written = LabelSummary(rc.pixel_size_um), []
    with contextlib.ExitStack() as stack:
        for folder, sample_crops in by_sample.items():
            stage = stack.enter_context(staged_directory(folder / rc.refined_name, overwrite=True))
            for crop in sample_crops:
                labels = make_labels(crop)
                assert crop.label_path is not None
                write_label(stage / crop.label_path.name, labels)
                summary.add(labels, crop)
            write_json(stage / MARKER, {**marker, "n_crops": len(sample_crops)})
            written.append(folder / rc.refined_name)
    return summary, written


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
    """Predict and post-process every crop; write each sample's refined-label folder
    (:func:`write_refined_labels`). ``rc.refine_method`` must be resolved (not ``"auto"``).
    Returns the counts, label statistics and (``"grow"``) merge counts for the manifest.
    """
    if rc.refine_method == AUTO_METHOD:
        raise ValueError("resolve the refinement method first (resolve_refine_method)")
    diam = {"diam_mean": float(meta["diam_mean"]), "diam_labels": float(meta["diam_labels"])}
    merging = rc.refine_method in (GROW_METHOD, MERGE_METHOD)
    merge: dict[str, int] | None = (
        {"kept": 0, "split": 0, "added_back": 0, "dropped": 0} if merging else None)

    def make(crop: Crop) -> np.ndarray:
        pred = predict_crop(net, crop, eval_cfg, device=device, **diam)
        return postprocess_pseudo_labels(
            pred.masks,
            round_index,
            method=rc.refine_method,
            min_size=rc.relabel_min_size,
            crop=crop,
            device=device,
            pixel_size_um=rc.pixel_size_um,
            grow_params=rc.grow,
            merge_counts=merge,
        )

    summary, written = write_refined_labels(crops, rc, run_id, round_index, make)
    stats = summary.result()
    logger.info(
        "round %d: refined labels (%s) of %d crops (%d cells, median area %.4g %s, "
        "%.1f %% of transcripts in cells%s) written to %d folder(s)",
        round_index,
        rc.refine_method,
        len(crops),
        stats.n_cells,
        stats.median_area,
        stats.area_unit,
        100.0 * stats.fraction_transcripts_in_cells,
        f"; merge {merge}" if merge is not None else "",
        len(written),
    )
    return RelabelRecord(n_crops=len(crops), n_cells=stats.n_cells, folders=written,
                         method=rc.refine_method, stats=stats, merge=merge)  # fmt: skip


def grow_start_labels(crops: list[Crop], rc: RecursiveConfig, run_id: str) -> RelabelRecord:
    """Before round 1 (method ``"grow"``): grow every crop's starting labels
    (``crop.labels``, int [H, W], from ``labels/``) along its transcripts and write them
    as round 0's refined labels, which round 1 then trains on. ``labels/`` is never
    modified. Every starting cell survives (growth never shrinks a cell)."""
    params = rc.grow

    def make(crop: Crop) -> np.ndarray:
        if crop.labels is None:
            raise InputError("starting labels to grow are missing", sample_folder_of(crop))
        size = require_pixel_size(crop, rc.pixel_size_um)
        rows, cols, genes = crop_spots(crop)
        grown = grow_labels(crop.labels, rows, cols, genes, pixel_size_um=size, params=params)
        return renumber(grown, order="first")

    summary, written = write_refined_labels(crops, rc, run_id, 0, make)
    stats = summary.result()
    logger.info(
        "round 0: grown starting labels of %d crops (%d cells, median area %.4g %s, "
        "%.1f %% of transcripts in cells) written to %d folder(s)",
        len(crops),
        stats.n_cells,
        stats.median_area,
        stats.area_unit,
        100.0 * stats.fraction_transcripts_in_cells,
        len(written),
    )
    return RelabelRecord(n_crops=len(crops), n_cells=stats.n_cells, folders=written,
                         method=GROW_METHOD, stats=stats)  # fmt: skip
