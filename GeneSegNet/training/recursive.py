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
   (:mod:`GeneSegNet.training.relabel`, which also guards existing label folders); a
   relabelling that loses more than ``max_cell_loss`` of the round's cells logs a WARNING.

``refine_method`` ``"auto"`` is resolved first (``"grow"`` when every train/validation
crop has spots and a pixel size). With ``"grow"`` and ``grow_start_labels``, the starting
labels are grown before round 1 and written as round 0's refined labels, which round 1
trains on (``labels/`` is never modified; the manifest's ``start_labels``).

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

from GeneSegNet.data.dataset import Crop, load_dataset, sample_folders
from GeneSegNet.data.model_input import (
    DEFAULT_TRAIN_IMAGE_NORM,
    ModelInput,
    image_channels_for,
    training_model_input,
)
from GeneSegNet.dynamics.flow_targets import FlowTargetCache
from GeneSegNet.errors import InputError
from GeneSegNet.evaluation.test_pass import OutputOptions, evaluate_dataset, format_metrics
from GeneSegNet.io.layout import label_folder_for_round
from GeneSegNet.model.checkpoint import load_checkpoint
from GeneSegNet.model.net import NetConfig
from GeneSegNet.model.predict import EvalConfig
from GeneSegNet.training import ddp
from GeneSegNet.training.config import AUTO_METHOD, GROW_METHOD, RecursiveConfig, TrainConfig
from GeneSegNet.training.label_folders import check_refined_folders
from GeneSegNet.training.loop import model_name_for, pretrained_weights, train_network
from GeneSegNet.training.manifest import (
    EvaluationRecord,
    RelabelRecord,
    RoundRecord,
    RunManifest,
    RunSettings,
    TrainingSummary,
)
from GeneSegNet.training.relabel import (
    grow_start_labels,
    relabel_dataset,
    resolve_refine_method,
    sample_folder_of,
    summarise_labels,
    warn_cell_loss,
)

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


def _label_round(rc: RecursiveConfig, n: int) -> int:
    """Round whose label folder round ``n`` reads: round 1 reads round 0's refined labels
    (the grown starting labels) like round 2 reads round 1's."""
    return 2 if n == 1 and rc.grows_start_labels() else n


def _load_sets(rc: RecursiveConfig, n: int) -> dict[str, list[Crop]]:
    """Train (and validation) crops with the labels of round ``n``."""
    kwargs = {"round_index": _label_round(rc, n), "refined_name": rc.refined_name,
              **rc.load_kwargs()}  # fmt: skip
    sets = {"train": rc.train_dir, "val": rc.val_dir}
    return {k: load_dataset(d, **kwargs) for k, d in sets.items() if d is not None}


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
    image_norm: str = DEFAULT_TRAIN_IMAGE_NORM,
) -> RunManifest:
    """Run the recursive train -> test -> relabel loop; return the manifest (module doc).

    ``pretrained``: checkpoint every round starts from (round 1 only with
    ``rc.warm_start_rounds``, later rounds then start from the previous round's model).
    ``resume``: a ``_last`` checkpoint written by this function; the run continues in
    the round it belongs to, with the same run id and manifest. ``flow_cache_dir``:
    folder for content-keyed flow targets (None: computed in memory). ``eval_config``:
    settings of the test passes and of the relabelling predictions (give it the
    training heatmap scaling, see :func:`GeneSegNet.cli.args.eval_config_from_args`).
    ``image_norm``: image normalisation of the model (``--image_norm``, "local" or
    "percentile"). The transcript input (``sample.json`` of the sample folders) and the
    image channels of ``rc.chan`` set ``net_config.nchan``; the test passes and the
    relabelling use the same input (``eval_config``'s input fields are replaced).

    Raises
    ------
    InputError : bad folders or files, unusable checkpoints, refined-label folders this
        run may not replace; raised before anything is written where it can be checked.
    """
    model_input = training_model_input([rc.train_dir, rc.val_dir, rc.test_dir],
                                       image_norm=image_norm, diam_mean=net_config.diam_mean)
    net_config = replace(net_config,
                         nchan=image_channels_for(rc.chan) + model_input.n_transcripts)
    eval_config = replace(eval_config, **model_input.eval_fields())
    saved = _resume_info(Path(resume), net_config.nchan) if resume is not None else {}
    run_id = ddp.broadcast_object(  # under torchrun: rank 0's id on every rank
        str(saved.get("run_id") or datetime.now().strftime("%Y_%m_%d_%H_%M_%S.%f")))
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
    start_crops: dict[str, list[Crop]] = {}
    if rc.refine_method in (AUTO_METHOD, GROW_METHOD):
        start_crops = _load_sets(replace(rc, grow_start_labels=False), 1)  # labels/
        rc = resolve_refine_method(rc, [c for v in start_crops.values() for c in v])
    if rc.writes_refined_labels():
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
    if first == 1 and rc.grows_start_labels():
        manifest.start_labels = {
            k: _relabel_split(lambda mine, v=v: grow_start_labels(mine, rc, run_id), v, rc,
                              k, 1)
            for k, v in start_crops.items()
        }
        _write_manifest(manifest, save_dir)
    del start_crops
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
            model_input=model_input,
        )
        previous = record.model_used
        manifest.rounds.append(record)
        _write_manifest(manifest, save_dir)
        relabelled = (record.relabelled or {}).get("train")
        if n < rc.recursive_num and relabelled and train_config.min_train_masks > 0:
            if relabelled.n_cells == 0:
                raise InputError(
                    f"the round-{n} model found no cells in the training crops, so round "
                    f"{n + 1} has no labels to train on; train longer (--n_epochs) or check "
                    "--diameter / --diam_mean"
                )
    manifest.finish()
    _write_manifest(manifest, save_dir)
    return manifest


def _write_manifest(manifest: RunManifest, save_dir: Path) -> None:
    """Write the run manifest (rank 0 only under torchrun)."""
    if ddp.is_main():
        manifest.write(save_dir)


def _relabel_split(relabel, crops: list[Crop], rc: RecursiveConfig, what: str,
                   round_index: int) -> RelabelRecord:
    """``relabel(crops)`` (a relabelling that writes the crops' refined labels and returns
    its record); under torchrun each rank relabels the crops of its share of the sample
    folders, and rank 0 records the whole set: counts summed, folders in order, the label
    statistics of the written labels (re-read), on every rank."""
    env = ddp.current_env()
    if env.world == 1:
        return relabel(crops)
    mine = ddp.shard_by_group(crops, sample_folder_of, env)
    parts = [p for p in ddp.gather_objects(relabel(mine) if mine else None) if p is not None]
    record = None
    if ddp.is_main():
        root = {"train": rc.train_dir, "val": rc.val_dir}[what]
        written = load_dataset(root, round_index=max(2, round_index + 1),
                               refined_name=rc.refined_name, **rc.load_kwargs())
        stats = summarise_labels(written, rc.pixel_size_um)
        order = {f: i for i, f in enumerate(dict.fromkeys(sample_folder_of(c) for c in crops))}
        merges = [p.merge for p in parts if p.merge is not None]
        record = RelabelRecord(
            n_crops=sum(p.n_crops for p in parts), n_cells=stats.n_cells,
            folders=sorted((f for p in parts for f in p.folders),
                           key=lambda f: order.get(Path(f).parent, len(order))),
            method=parts[0].method, stats=stats,
            merge={k: sum(m[k] for m in merges) for k in merges[0]} if merges else None)
    return ddp.broadcast_object(record)


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
    model_input: ModelInput | None = None,
) -> RoundRecord:
    tic = time.perf_counter()
    sets = {"train": rc.train_dir, "val": rc.val_dir}
    crops = _load_sets(rc, n)
    label_round = _label_round(rc, n)
    folders = {
        k: sorted(
            {label_folder_for_round(f, label_round, rc.refined_name) for f in sample_folders(d)}
        )
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
        model_input=model_input,
    )
    used = result.best_path if rc.select_model == "best" else result.last_path
    net, meta = load_checkpoint(used, device=device, expect_nchan=net_config.nchan)
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
        input_labels={k: summarise_labels(v, rc.pixel_size_um) for k, v in crops.items()},
    )
    if rc.test_dir is not None and ddp.is_main():  # the test pass runs on rank 0
        run_dir = Path(rc.save_model_dir) / f"run_{run_id}"
        record.test = _test_round(rc, n, net, meta, eval_config, run_id, used, device, progress,
                                  run_dir)  # fmt: skip
    ddp.barrier()
    if n < rc.recursive_num or rc.relabel_last_round:
        record.relabelled = {
            k: _relabel_split(
                lambda mine: relabel_dataset(net, meta, mine, rc, eval_config, n, run_id,
                                             device=device, progress=progress),
                v, rc, k, n)
            for k, v in crops.items()
        }
        for k, relabelled in record.relabelled.items():
            warn_cell_loss(
                f"round {n} relabelling ({k}, {relabelled.method})",
                record.input_labels[k].n_cells,
                relabelled.n_cells,
                rc.max_cell_loss,
            )
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
