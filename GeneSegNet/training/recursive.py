"""Recursive training (spec §6.1): train, test, relabel, and train again on the new labels.

For round N = 1 .. ``recursive_num``:

1. load the train and validation crops, labels from ``labels/`` at N = 1 and from the
   refined ``<refined_name>/`` (default ``newlabels``) written by round N-1 afterwards;
2. train a network (fresh, or from ``pretrained``; with ``warm_start_rounds`` from
   round N-1's model);
3. test on the test set against its ORIGINAL ``labels/`` (spec §12 item 13: held-out
   data are never relabelled, so the metrics of every round measure the same thing);
4. unless N is the last round (spec §12 item 30; ``relabel_last_round`` keeps upstream's
   wasted last pass), relabel the TRAIN and VALIDATION crops
   (:mod:`GeneSegNet.training.relabel`, which also guards existing label folders).

A JSON manifest ``<save_model_dir>/run_<stamp>.json`` (:mod:`GeneSegNet.training.manifest`)
is rewritten atomically after every round: configuration, and per round the models,
label folders, crop counts, ``diam_labels``, a training-history summary, the test metrics
and the relabelling. Test outputs go to ``<save_model_dir>/run_<stamp>/test_round_<N>/
<sample>/`` (or ``<savedir>/round_<N>/<sample>/``), never into the test data.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from GeneSegNet.data.dataset import load_dataset, sample_folders
from GeneSegNet.dynamics.flow_targets import FlowTargetCache
from GeneSegNet.errors import InputError
from GeneSegNet.evaluation.test_pass import OutputOptions, evaluate_dataset, format_metrics
from GeneSegNet.io.layout import label_folder_for_round
from GeneSegNet.model.checkpoint import load_checkpoint
from GeneSegNet.model.net import NetConfig
from GeneSegNet.model.predict import EvalConfig
from GeneSegNet.training.config import RecursiveConfig, TrainConfig
from GeneSegNet.training.loop import model_name_for, pretrained_weights, train_network
from GeneSegNet.training.manifest import (
    EvaluationRecord,
    RoundRecord,
    RunManifest,
    RunSettings,
    TrainingSummary,
)
from GeneSegNet.training.relabel import check_refined_folders, relabel_dataset

logger = logging.getLogger(__name__)


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


def _open_manifest(
    manifest_path: Path, run_id: str, settings: RunSettings, resume: Path | None, first: int
) -> RunManifest:
    """A new manifest, or the resumed run's own one continued at round ``first``."""
    if resume is None or not manifest_path.is_file():
        return RunManifest.start(run_id, settings)
    manifest = RunManifest.load(manifest_path)
    manifest.resume(settings, resume, first)
    return manifest


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
) -> RunManifest:
    """Run the recursive train -> test -> relabel loop; return the manifest (module doc).

    ``pretrained``: checkpoint every round starts from (round 1 only with
    ``rc.warm_start_rounds``, later rounds then start from the previous round's model).
    ``resume``: a ``_last`` checkpoint written by this function; the run continues in
    the round it belongs to, with the same run id and manifest. ``flow_cache_dir``:
    folder for content-keyed flow targets (None: computed in memory). ``eval_config``:
    settings of the test passes and of the relabelling predictions (give it the
    training heatmap scaling, see :func:`GeneSegNet.cli.args.eval_config_from_args`).

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
    manifest_path = save_dir / RunManifest.file_name_for(run_id)
    for root in (rc.train_dir, rc.val_dir, rc.test_dir):
        if root is not None:
            sample_folders(root)
    if pretrained is not None:
        pretrained_weights(pretrained, net_config)
    if rc.relabels_any_round():
        check_refined_folders(rc, run_id, first)
    settings = RunSettings(
        recursive=rc,
        net=net_config,
        train=train_config,
        eval=eval_config,
        device=str(device),
        pretrained_model=pretrained,
        run_info=dict(run_info or {}),
    )
    manifest = _open_manifest(manifest_path, run_id, settings, resume, first)
    cache = FlowTargetCache(flow_cache_dir, device=device) if flow_cache_dir else None
    previous = manifest.rounds[-1].model_used if manifest.rounds else None
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
            start=Path(start) if start else None,
            resume=resume if n == first else None,
            cache=cache,
            progress=progress,
        )
        previous = record.model_used
        manifest.rounds.append(record)
        manifest.write(save_dir)
        relabelled = (record.relabelled or {}).get("train")
        if n < rc.recursive_num and relabelled and train_config.min_train_masks > 0:
            if relabelled.n_cells == 0:
                raise InputError(
                    f"the round-{n} model found no cells in the training crops, so round "
                    f"{n + 1} has no labels to train on; train longer (--n_epochs) or check "
                    "--diameter / --diam_mean"
                )
    manifest.finish()
    manifest.write(save_dir)
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
) -> RoundRecord:
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
    record = RoundRecord(
        round=n,
        label_folders=folders,
        n_crops={k: len(v) for k, v in crops.items()},
        n_train_used=result.n_train,
        n_val_used=result.n_val,
        dropped=result.dropped,
        model_last=result.last_path,
        model_best=result.best_path,
        model_used=used,
        started_from=str(resume or start) if (resume or start) else None,
        diam_labels=result.diam_labels,
        training=TrainingSummary.from_result(result),
    )
    if rc.test_dir is not None:
        run_dir = Path(rc.save_model_dir) / f"run_{run_id}"
        record.test = _test_round(rc, n, net, meta, eval_config, run_id, used, device, progress,
                                  run_dir)  # fmt: skip
    if n < rc.recursive_num or rc.relabel_last_round:
        record.relabelled = {
            k: relabel_dataset(
                net, meta, v, rc, eval_config, n, run_id, device=device, progress=progress
            )
            for k, v in crops.items()
        }
    record.seconds = round(time.perf_counter() - tic, 2)
    return record


def _test_round(
    rc, n, net, meta, eval_config, run_id, model, device, progress, run_dir
) -> EvaluationRecord:
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
    return EvaluationRecord(
        output_dir=out.savedir,
        n_crops=result["n_crops"],
        metrics=result["metrics"],
        metrics_files=result["metrics_files"],
    )
