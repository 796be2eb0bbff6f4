"""Recursive training (spec §6.1): train, test, relabel, and train again on the new labels.

For round N = 1 .. ``recursive_num``:

1. load the train and validation crops, labels from ``labels/`` at N = 1 and from the
   refined ``<refined_name>/`` (default ``newlabels``) written by round N-1 afterwards;
2. train a network (fresh, or from ``pretrained``; with ``warm_start_rounds`` from
   round N-1's model);
3. test on the test set against its ORIGINAL ``labels/`` (spec §12 item 13: held-out
   data are never relabelled, so the metrics of every round measure the same thing);
4. unless N is the last round (spec §12 item 30; ``relabel_last_round`` keeps upstream's
   wasted last pass), relabel the TRAIN and VALIDATION crops: predict, renumber,
   fill holes / drop cells < 300 px, level-set refinement (:func:`refine_labels`), fill
   holes / drop small cells again, renumber, and write ``<sample>/<refined_name>/<label
   file name>``.

Safety: a sample's refined-label folder is written completely in a staging folder and
then swapped in, with a marker file naming the run. A refined-label folder that exists
before round 1 and was not written by this run stops the run, unless
``overwrite_newlabels``: folders written by an earlier GeneSegNet run are then replaced,
and any other folder is moved aside to ``<refined_name>.backup_<stamp>`` (never deleted).

A JSON manifest ``<save_model_dir>/run_<stamp>.json`` is rewritten atomically after
every round: configuration, and per round the models, label folders, crop counts,
``diam_labels``, a training-history summary, the test metrics and the relabelling.
Test outputs go to ``<save_model_dir>/run_<stamp>/test_round_<N>/<sample>/`` (or
``<savedir>/round_<N>/<sample>/``), never into the test data.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

import GeneSegNet
from GeneSegNet.data.dataset import Crop, label_folder_for_round, load_dataset, sample_folders
from GeneSegNet.dynamics.flow_targets import FlowTargetCache
from GeneSegNet.dynamics.masks import fill_holes_and_remove_small_masks, renumber
from GeneSegNet.errors import InputError
from GeneSegNet.evaluation.test_pass import OutputOptions, evaluate_dataset
from GeneSegNet.io import staged_directory, write_label
from GeneSegNet.io.records import write_json
from GeneSegNet.model.checkpoint import load_checkpoint
from GeneSegNet.model.net import NetConfig
from GeneSegNet.model.predict import EvalConfig, predict_crop
from GeneSegNet.training.loop import (
    TrainConfig,
    TrainResult,
    model_name_for,
    pretrained_weights,
    train_network,
)
from GeneSegNet.training.refine import METHODS as REFINE_METHODS
from GeneSegNet.training.refine import refine_labels

logger = logging.getLogger(__name__)

MARKER = ".genesegnet_labels.json"
RELABEL_MIN_SIZE = 300


@dataclass(frozen=True)
class RecursiveConfig:
    """Folders and settings of a recursive-training run (see the module docstring)."""

    train_dir: Path
    save_model_dir: Path
    val_dir: Path | None = None
    test_dir: Path | None = None
    recursive_num: int = 3
    chan: int = 2
    img_filter: str = "_image"
    mask_filter: str = "_label"
    heatmap_filter: str = "_gaumap_all"
    refined_name: str = "newlabels"
    refine_method: str = "morphology"
    relabel_min_size: int = RELABEL_MIN_SIZE
    relabel_last_round: bool = False
    warm_start_rounds: bool = False
    overwrite_newlabels: bool = False
    select_model: str = "last"
    exclude_on_edges: bool = False
    size_filter: bool = False
    output: OutputOptions = field(default_factory=OutputOptions)

    def __post_init__(self) -> None:
        if self.recursive_num < 1:
            raise InputError(f"--recursive_num must be >= 1, got {self.recursive_num}")
        if self.select_model not in ("last", "best"):
            raise InputError(f"select_model must be 'last' or 'best', got {self.select_model}")
        if self.refine_method not in REFINE_METHODS:
            raise InputError(f"--refine_method must be one of {REFINE_METHODS}")
        name = self.refined_name
        if (
            not name
            or Path(name).name != name
            or name in (".", "..", "labels", "images", "spots", "HeatMaps")
        ):
            raise InputError(f"--output_filename must be a plain new folder name, got {name!r}")

    def load_kwargs(self) -> dict[str, Any]:
        return {
            "chan": self.chan,
            "img_filter": self.img_filter,
            "mask_filter": self.mask_filter,
            "heatmap_filter": self.heatmap_filter,
        }

    def relabels_any_round(self) -> bool:
        return self.recursive_num > 1 or self.relabel_last_round


def postprocess_pseudo_labels(
    masks: np.ndarray,
    round_index: int,
    *,
    method: str = "morphology",
    min_size: int = RELABEL_MIN_SIZE,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Predicted masks -> next round's training labels (spec §6.1 step 3).

    renumber (raster order) -> drop cells < ``min_size`` px and fill holes -> level-set
    refinement for ``round_index`` -> drop small cells and fill holes -> renumber.

    Returns int32 [H, W], cells 1..K.
    """
    out = fill_holes_and_remove_small_masks(renumber(masks, order="first"), min_size=min_size)
    out = refine_labels(out, round_index, method=method, device=device)
    out = fill_holes_and_remove_small_masks(out, min_size=min_size)
    return renumber(out, order="first")


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _relabel_folders(rc: RecursiveConfig) -> list[Path]:
    """Sample folders whose labels the run refines (train and validation sets)."""
    roots = [rc.train_dir] + ([rc.val_dir] if rc.val_dir is not None else [])
    return [folder for root in roots for folder in sample_folders(root)]


def _claim_folder(target: Path, rc: RecursiveConfig, run_id: str, *, dry_run: bool) -> str | None:
    """May this run write the refined-label folder ``target``? Raises InputError if not.

    Allowed: no folder, or one written by this run. With ``overwrite_newlabels`` also a
    folder of another GeneSegNet run (replaced later) or any other folder, which is moved
    aside to ``<name>.backup_<time>`` (unless ``dry_run``). Returns a note or None.
    """
    if not target.exists():
        return None
    marker = _read_marker(target)
    if marker is not None and marker.get("run_id") == run_id:
        return None
    if not rc.overwrite_newlabels:
        origin = "an earlier GeneSegNet run" if marker else "not GeneSegNet"
        raise InputError(
            f"refined-label folder exists ({origin}) and training would replace it; move it "
            "away or pass --overwrite_newlabels (folders written by GeneSegNet are then "
            f"replaced, other folders moved to {rc.refined_name}.backup_<time>)",
            target,
        )
    if marker is not None:
        return f"{target} (written by run {marker.get('run_id')}) is replaced"
    backup = target.with_name(f"{target.name}.backup_{datetime.now():%Y_%m_%d_%H_%M_%S_%f}")
    if not dry_run:
        os.replace(target, backup)
        logger.warning("moved %s (not written by GeneSegNet) to %s", target, backup)
    return f"{target} (not written by GeneSegNet) is moved to {target.name}.backup_<time>"


def _check_round_labels(rc: RecursiveConfig, run_id: str, round_index: int) -> None:
    """A resumed round N >= 2 needs this run's round N-1 labels in every sample folder."""
    for folder in _relabel_folders(rc):
        marker = _read_marker(folder / rc.refined_name)
        if marker is None or marker.get("run_id") != run_id:
            raise InputError(
                f"cannot resume round {round_index}: this run's refined labels are missing",
                folder / rc.refined_name,
            )
        if int(marker.get("round", -1)) != round_index - 1:
            raise InputError(
                f"cannot resume round {round_index}: the refined labels come "
                f"from round {marker.get('round')}",
                folder / rc.refined_name,
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
) -> dict[str, Any]:
    """Predict and post-process every crop; write each sample's refined-label folder.

    All folders are staged first and swapped in at the end (an error leaves every
    existing folder untouched). Returns counts for the manifest.
    """
    by_sample: dict[Path, list[Crop]] = {}
    for crop in crops:
        by_sample.setdefault(crop.image_path.parent.parent, []).append(crop)
    for folder in by_sample:
        _claim_folder(folder / rc.refined_name, rc, run_id, dry_run=False)
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
    return {"n_crops": len(crops), "n_cells": n_cells, "folders": written}


def _history_summary(result: TrainResult) -> dict[str, Any]:
    hist = result.history
    vals = [h for h in hist if h.get("val_loss") is not None]
    return {
        "epochs_run": len(hist),
        "first_train_loss": hist[0]["train_loss"] if hist else None,
        "final_train_loss": hist[-1]["train_loss"] if hist else None,
        "final_val_loss": vals[-1]["val_loss"] if vals else None,
        "best_val_loss": result.best_val_loss,
        "best_epoch": result.best_epoch,
        "train_seconds": round(sum(h["seconds"] for h in hist), 2),
    }


def _test_output(rc: RecursiveConfig, run_dir: Path, round_index: int) -> OutputOptions:
    base = (
        rc.output.savedir / f"round_{round_index}"
        if rc.output.savedir
        else (run_dir / f"test_round_{round_index}")
    )
    return replace(rc.output, savedir=base, metrics_dir=base)


def _resume_info(resume: Path | None, nchan: int) -> dict[str, Any]:
    if resume is None:
        return {}
    _, meta = load_checkpoint(resume, device="cpu", expect_nchan=nchan)
    return meta["extra"]


def _manifest(
    rc,
    net_config,
    train_config,
    eval_config,
    manifest_path,
    run_id,
    device,
    pretrained,
    resume,
    start_round,
    run_info,
) -> dict[str, Any]:
    config = {
        "recursive": asdict(rc),
        "net": net_config.to_dict(),
        "train": train_config.to_dict(),
        "eval": asdict(eval_config),
        "device": str(device),
        "pretrained_model": pretrained,
        **(run_info or {}),
    }
    now = datetime.now().isoformat(timespec="seconds")
    if resume is not None and manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        manifest["rounds"] = [r for r in manifest["rounds"] if r["round"] < start_round]
        manifest.setdefault("resumed", []).append(
            {"time": now, "checkpoint": resume, "round": start_round, "config": config}
        )
        manifest["status"] = "running"
        return manifest
    return {
        "run_id": run_id,
        "version": GeneSegNet.__version__,
        "started": now,
        "status": "running",
        "config": config,
        "rounds": [],
    }


def run_recursive_training(
    rc: RecursiveConfig,
    net_config: NetConfig,
    train_config: TrainConfig,
    eval_config: EvalConfig,
    *,
    device: torch.device | str = "cpu",
    pretrained: Path | None = None,
    resume: Path | None = None,
    flow_cache_dir: Path | None = None,
    progress: bool = False,
    run_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the recursive train -> test -> relabel loop; return the manifest (module doc).

    ``pretrained``: checkpoint every round starts from (round 1 only with
    ``rc.warm_start_rounds``, later rounds then start from the previous round's model).
    ``resume``: a ``_last`` checkpoint written by this function; the run continues in
    the round it belongs to, with the same run id and manifest. ``flow_cache_dir``:
    folder for content-keyed flow targets (None: computed in memory).

    Raises
    ------
    InputError : bad folders or files, unusable checkpoints, refined-label folders this
        run may not replace; raised before anything is written where it can be checked.
    """
    saved = _resume_info(Path(resume), net_config.nchan) if resume is not None else {}
    run_id = str(saved.get("run_id") or datetime.now().strftime("%Y_%m_%d_%H_%M_%S.%f"))
    first = int(saved.get("round", 1))
    if first > rc.recursive_num:
        raise InputError(f"checkpoint is from round {first} > --recursive_num", resume)
    save_dir = Path(rc.save_model_dir)
    manifest_path = save_dir / f"run_{run_id}.json"
    for root in (rc.train_dir, rc.val_dir, rc.test_dir):
        if root is not None:
            sample_folders(root)
    if pretrained is not None:
        pretrained_weights(pretrained, net_config)
    if rc.relabels_any_round():
        if first == 1:
            for folder in _relabel_folders(rc):
                note = _claim_folder(folder / rc.refined_name, rc, run_id, dry_run=True)
                if note:
                    logger.warning("%s", note)
        else:
            _check_round_labels(rc, run_id, first)
    manifest = _manifest(
        rc,
        net_config,
        train_config,
        eval_config,
        manifest_path,
        run_id,
        device,
        pretrained,
        resume,
        first,
        run_info,
    )
    cache = FlowTargetCache(flow_cache_dir, device=device) if flow_cache_dir else None
    previous = manifest["rounds"][-1]["model_used"] if manifest["rounds"] else None
    logger.info(
        "run %s: rounds %d..%d; manifest %s", run_id, first, rc.recursive_num, manifest_path
    )
    for n in range(first, rc.recursive_num + 1):
        start = previous if rc.warm_start_rounds and previous else pretrained
        record = _run_round(
            rc,
            n,
            net_config,
            train_config,
            eval_config,
            run_id,
            manifest_path,
            device=device,
            start=start,
            resume=resume if n == first else None,
            cache=cache,
            progress=progress,
        )
        previous = record["model_used"]
        manifest["rounds"].append(record)
        write_json(manifest_path, manifest)
        relabelled = (record["relabelled"] or {}).get("train")
        if n < rc.recursive_num and relabelled and train_config.min_train_masks > 0:
            if relabelled["n_cells"] == 0:
                raise InputError(
                    f"the round-{n} model found no cells in the training crops, so round "
                    f"{n + 1} has no labels to train on; train longer (--n_epochs) or check "
                    "--diameter / --diam_mean"
                )
    manifest["status"] = "finished"
    manifest["finished"] = datetime.now().isoformat(timespec="seconds")
    write_json(manifest_path, manifest)
    return manifest


def _run_round(
    rc: RecursiveConfig,
    n: int,
    net_config: NetConfig,
    train_config: TrainConfig,
    eval_config: EvalConfig,
    run_id: str,
    manifest_path: Path,
    *,
    device,
    start: Path | None,
    resume: Path | None,
    cache: FlowTargetCache | None,
    progress: bool,
) -> dict[str, Any]:
    tic = time.perf_counter()
    kwargs = {"round_index": n, "refined_name": rc.refined_name, **rc.load_kwargs()}
    sets = {"train": rc.train_dir, "val": rc.val_dir}
    crops = {k: load_dataset(d, **kwargs) for k, d in sets.items() if d is not None}
    folders = {
        k: sorted({label_folder_for_round(f, n, rc.refined_name) for f in sample_folders(d)})
        for k, d in sets.items()
        if d
    }
    logger.info("round %d/%d: training on %s labels", n, rc.recursive_num, folders)
    result = train_network(
        crops["train"],
        crops.get("val"),
        net_config,
        train_config,
        device=device,
        model_dir=Path(rc.save_model_dir) / "models",
        model_name=model_name_for(net_config, rc.save_model_dir),
        pretrained=None if resume is not None else start,
        resume=resume,
        flow_cache=cache,
        progress=progress,
        checkpoint_extra={"round": n, "run_id": run_id, "manifest": str(manifest_path)},
    )
    used = result.best_path if rc.select_model == "best" else result.last_path
    net, meta = load_checkpoint(used, device=device, expect_nchan=rc.chan)
    record: dict[str, Any] = {
        "round": n,
        "label_folders": folders,
        "n_crops": {k: len(v) for k, v in crops.items()},
        "n_train_used": result.n_train,
        "n_val_used": result.n_val,
        "dropped": result.dropped,
        "model_last": result.last_path,
        "model_best": result.best_path,
        "model_used": used,
        "started_from": str(resume or start) if (resume or start) else None,
        "diam_labels": result.diam_labels,
        "training": _history_summary(result),
        "test": None,
        "relabelled": None,
    }
    if rc.test_dir is not None:
        record["test"] = _test_round(
            rc,
            n,
            net,
            meta,
            eval_config,
            run_id,
            used,
            device,
            progress,
            Path(rc.save_model_dir) / f"run_{run_id}",
        )
    if n < rc.recursive_num or rc.relabel_last_round:
        record["relabelled"] = {
            k: relabel_dataset(
                net, meta, v, rc, eval_config, n, run_id, device=device, progress=progress
            )
            for k, v in crops.items()
        }
    record["seconds"] = round(time.perf_counter() - tic, 2)
    return record


def _test_round(rc, n, net, meta, eval_config, run_id, model, device, progress, run_dir):
    from GeneSegNet.evaluation.test_pass import format_metrics

    out = _test_output(rc, run_dir, n)
    result = evaluate_dataset(
        net,
        meta,
        rc.test_dir,
        eval_config,
        chan=rc.chan,
        img_filter=rc.img_filter,
        mask_filter=rc.mask_filter,
        heatmap_filter=rc.heatmap_filter,
        output=out,
        metrics=True,
        exclude_on_edges=rc.exclude_on_edges,
        size_filter=rc.size_filter,
        device=device,
        progress=progress,
        run_info={"round": n, "run_id": run_id, "model": str(model)},
    )
    if result["metrics"] is not None:
        logger.info("round %d test (original labels): %s", n, format_metrics(result["metrics"]))
    return {
        "output_dir": out.savedir,
        "n_crops": result["n_crops"],
        "metrics": result["metrics"],
        "metrics_files": result["metrics_files"],
    }
