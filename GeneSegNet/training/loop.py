"""Training loop of one recursion round: loss, learning-rate schedule, checkpoints (spec §5).

Upstream semantics kept: AdamW (β 0.9/0.999, eps 1e-8, decoupled weight decay), the
per-epoch schedule of :func:`learning_rate_schedule`, loss = MSE(flows, 5·target flows) +
BCE-with-logits(cell probability), images rescaled by their label diameter and augmented
with :func:`GeneSegNet.training.augment.random_rotate_and_resize` into ``tile × tile`` patches,
validation loss at epochs ``e % 10 == 0`` or ``e == 5`` (scale range 0, seed 42).

Changes (spec §12 items 30, 31, 38): every random draw comes from explicit generators —
weights from a ``torch.Generator(seed)``, the epoch order from ``(seed, epoch)``, each
batch's augmentation from ``(seed, epoch, batch)`` — so a run is reproducible, independent
of the number of loader workers, and resumable exactly from its ``_last`` checkpoint;
the validation loss selects a ``_best`` checkpoint; warm starts from a checkpoint.

Checkpoint files under ``model_dir``: ``{model_name}_last.pt`` (full training state),
``{model_name}_best.pt`` (lowest validation loss) and, with ``save_each``,
``{model_name}_epoch_{e}.pt``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from GeneSegNet.data.dataset import Crop, network_input
from GeneSegNet.data.model_input import CHECKPOINT_KEY as MODEL_INPUT_KEY
from GeneSegNet.data.model_input import ModelInput
from GeneSegNet.device import as_device
from GeneSegNet.dynamics.flow_targets import FlowTargetCache
from GeneSegNet.errors import InputError, Interrupted
from GeneSegNet.model.checkpoint import load_checkpoint, save_checkpoint
from GeneSegNet.model.net import GeneSegUNet, NetConfig
from GeneSegNet.training import ddp
from GeneSegNet.training.batches import (
    PatchBatches,
    TrainData,
    data_fingerprint,
    epoch_plan,
    make_loader,
    prepare_data,
    validation_batches,
)
from GeneSegNet.training.config import TrainConfig
from GeneSegNet.training.interrupt import StopRequest

logger = logging.getLogger(__name__)

# Settings that must be unchanged for a resumed run to continue the same run.
_RESUME_FIXED = tuple(
    "learning_rate weight_decay batch_size min_train_masks rescale scale_range tile seed "
    "heatmap_mode val_every".split()
)
_HISTORY_KEYS = ("epoch", "lr", "train_loss", "val_loss", "seconds")


def learning_rate_schedule(lr: float, n_epochs: int) -> np.ndarray:
    """Per-epoch learning rates (spec §5); entry ``e`` is used for epoch ``e``.

    Warm-up ``linspace(0, lr, 10)`` (so epoch 0 runs at 0). If ``n_epochs > 250``: ``lr``
    for ``n_epochs - 100`` epochs, then 10 blocks of 10 epochs each at half the previous
    block (the last block is never reached). Otherwise ``lr`` to the end.

    Returns
    -------
    ndarray [max(n_epochs, 10) or n_epochs + 10] float64, at least ``n_epochs`` entries.
    """
    warmup = np.linspace(0.0, lr, 10)
    if n_epochs > 250:
        decay = lr * 0.5 ** np.repeat(np.arange(1, 11), 10)
        return np.concatenate([warmup, np.full(n_epochs - 100, lr), decay])
    return np.concatenate([warmup, np.full(max(0, n_epochs - 10), lr)])


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """GeneSegNet loss (spec §4.2): ``MSE(out[:, :2], 5·flows) + BCEWithLogits(out[:, 2])``.

    ``output`` [B, 3, H, W]: network output (dY, dX, cell-probability logit); ``target``
    [B, 3, H, W]: (binary cell mask, dY, dX unit flows). Returns a float32 scalar; both
    terms are means over their elements.
    """
    output = output.float()
    target = target.to(output.device, torch.float32)
    flow = F.mse_loss(output[:, :2], 5.0 * target[:, 1:3])
    prob = F.binary_cross_entropy_with_logits(output[:, 2], (target[:, 0] > 0.5).float())
    return flow + prob


@dataclass
class TrainResult:
    """What :func:`train_network` produced. ``history``: one dict per epoch run
    (``epoch``, ``lr``, ``train_loss``, ``val_loss`` or None, ``seconds``);
    ``diam_labels``: mean training label diameter (pixels)."""

    last_path: Path
    best_path: Path
    history: list[dict[str, Any]]
    diam_labels: float
    model_name: str
    n_train: int = 0
    n_val: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    best_epoch: int | None = None
    best_val_loss: float | None = None


def model_name_for(
    net_config: NetConfig, save_model_dir: str | Path, timestamp: datetime | None = None
) -> str:
    """Upstream's model file stem: ``GeneSegNet_residual_{on|off}_style_{on|off}_
    concatenation_{on|off}_{basename(save_model_dir)}_{YYYY_MM_DD_HH_MM_SS.ffffff}``."""

    flag = {True: "on", False: "off"}
    stamp = (timestamp or datetime.now()).strftime("%Y_%m_%d_%H_%M_%S.%f")
    c = net_config
    parts = f"residual_{flag[c.residual_on]}_style_{flag[c.style_on]}_concatenation_"
    return (
        f"GeneSegNet_{parts}{flag[c.concatenation]}_{Path(save_model_dir).resolve().name}_{stamp}"
    )


def init_weights(net: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default initialisation of every Conv2d and Linear layer, drawn from
    ``generator`` (kaiming-uniform weights with a = √5, biases U(±1/√fan_in))."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
                if module.bias is not None:
                    fan_in = module.weight[0].numel()
                    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                    nn.init.uniform_(module.bias, -bound, bound, generator=generator)


def _autocast(device: torch.device, bf16: bool):
    if bf16 and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _use_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.bf16 and device.type != "cuda":
        logger.warning("bf16 autocast is only used on CUDA; training on %s in float32", device)
        return False
    return cfg.bf16


def _arch_differences(want: NetConfig, have: NetConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    a, b = want.to_dict(), have.to_dict()
    return [
        f"{k}: {b[k]} in the checkpoint vs {a[k]} requested"
        for k in a
        if k not in ignore and a[k] != b[k]
    ]


def pretrained_weights(path: str | Path, net_config: NetConfig) -> dict[str, torch.Tensor]:
    """Weights (without the diameters) of a checkpoint to warm-start ``net_config`` from.

    Raises InputError for an unreadable file or a different architecture (``diam_mean``
    and ``style_on`` may differ: they do not change the weights' shapes).
    """
    path = Path(path)
    source, meta = load_checkpoint(path, device="cpu", expect_nchan=net_config.nchan)
    diff = _arch_differences(net_config, source.config, ignore=("diam_mean", "style_on"))
    if diff:
        raise InputError(
            "--pretrained_model has a different architecture: " + "; ".join(diff), path
        )
    if source.config.style_on != net_config.style_on:
        styles = (source.config.style_on, net_config.style_on)
        logger.warning("pretrained model has style_on=%s; training with style_on=%s", *styles)
    logger.info("warm start from %s (%s)", path, meta["source"])
    return {k: v for k, v in source.state_dict().items() if not k.startswith("diam_")}


def _resume_state(
    path: Path, net_config: NetConfig, cfg: TrainConfig, device: torch.device
) -> tuple[GeneSegUNet, dict[str, Any]]:
    """Network and saved training state of a ``_last`` checkpoint, checked against the run."""
    net, meta = load_checkpoint(path, device=device, expect_nchan=net_config.nchan)
    extra = meta["extra"]
    if "optimizer" not in extra or "epoch" not in extra or meta["train_config"] is None:
        raise InputError(
            "not a resumable checkpoint (use the '_last' file of a training run)", path
        )
    diff = _arch_differences(net_config, net.config)
    saved = TrainConfig.from_dict(meta["train_config"])
    diff += [
        f"{k}: {getattr(saved, k)} in the checkpoint vs {getattr(cfg, k)} requested"
        for k in _RESUME_FIXED
        if getattr(saved, k) != getattr(cfg, k)
    ]
    if diff:
        raise InputError("--resume checkpoint does not match this run: " + "; ".join(diff), path)
    done = int(extra["epoch"]) + 1
    old = learning_rate_schedule(saved.learning_rate, saved.n_epochs)[:done]
    new = learning_rate_schedule(cfg.learning_rate, cfg.n_epochs)[:done]
    if not np.array_equal(old, new):
        msg = f"n_epochs {saved.n_epochs} -> {cfg.n_epochs} changes the rates of epochs run"
        logger.warning("%s", msg)
    return net, extra


class _Run:
    """State of one training run (network, optimizer, history, checkpoint paths)."""

    def __init__(
        self,
        net: GeneSegUNet,
        cfg: TrainConfig,
        device: torch.device,
        model_dir: Path,
        model_name: str,
        extra: dict[str, Any],
    ) -> None:
        self.net, self.cfg, self.device, self.extra = net, cfg, device, dict(extra)
        # under torchrun: DDP around the network (global-batch BatchNorm); else ``net``
        self.env, self.model = ddp.current_env(), ddp.wrap(net, device)
        self.optimizer = torch.optim.AdamW(
            net.parameters(),
            lr=cfg.learning_rate,
            betas=(0.9, 0.999),
            eps=1e-8,
            weight_decay=cfg.weight_decay,
        )
        self.model_dir, self.model_name = model_dir, model_name
        self.last_path = model_dir / f"{model_name}_last.pt"
        self.best_path = model_dir / f"{model_name}_best.pt"
        self.history: list[dict[str, Any]] = []
        self.best_val_loss: float | None = None
        self.best_epoch: int | None = None
        self.bf16 = _use_bf16(cfg, device)
        self.saved_epoch: int | None = None  # epoch of the _last file written by this run
        self._saved_at = time.monotonic()
        self._snapshot: tuple[int, dict[str, Any], dict[str, Any]] | None = None

    def restore(self, saved: dict[str, Any]) -> int:
        self.optimizer.load_state_dict(saved["optimizer"])
        self.history = list(saved.get("history", []))
        self.best_val_loss = saved.get("best_val_loss")
        self.best_epoch = saved.get("best_epoch")
        return int(saved["epoch"]) + 1

    def step(self, imgs: torch.Tensor, lbls: torch.Tensor, n_global: int = 0) -> float:
        """One optimizer step; under DDP ``imgs`` is this rank's shard of a global batch
        of ``n_global`` crops. Returns the global batch's mean loss."""
        imgs = imgs.to(self.device, non_blocking=True)
        lbls = lbls.to(self.device, non_blocking=True)
        if self.env.world > 1:
            with _autocast(self.device, self.bf16):
                return ddp.ddp_step(self.model, self.optimizer, imgs, lbls, n_global)
        with _autocast(self.device, self.bf16):
            out = self.net(imgs)[0]
        loss = loss_fn(out, lbls)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return float(loss.item())

    def validation_loss(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
        self.net.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for k, (imgs, lbls) in enumerate(batches):
                if k % self.env.world != self.env.rank:
                    continue  # under DDP each rank scores every world-th batch
                with _autocast(self.device, self.bf16):
                    out = self.net(imgs.to(self.device, non_blocking=True))[0]
                total += float(loss_fn(out, lbls.to(self.device)).item()) * len(imgs)
                count += len(imgs)
        self.net.train()
        if self.env.world > 1:
            total, count = ddp.all_sum([total, count])
        return total / count

    def _payload(self, epoch: int, kind: str) -> dict[str, Any]:
        diam = {k: float(getattr(self.net, k).item()) for k in ("diam_mean", "diam_labels")}
        out = dict(
            self.extra,
            kind=kind,
            epoch=epoch,
            model_name=self.model_name,
            **diam,
            best_val_loss=self.best_val_loss,
            best_epoch=self.best_epoch,
            history=self.history,
        )
        if kind == "last":
            out.update(optimizer=self.optimizer.state_dict(), schedule_position=epoch + 1)
        return out

    def save(self, epoch: int, kind: str) -> Path:
        path = {"last": self.last_path, "best": self.best_path}.get(
            kind, self.model_dir / f"{self.model_name}_epoch_{epoch}.pt"
        )
        written = path  # checkpoints are written by rank 0 only
        if ddp.is_main():
            written = save_checkpoint(path, self.net, train_config=self.cfg.to_dict(),
                                      extra=self._payload(epoch, kind))
        if kind == "last":
            self.saved_epoch, self._saved_at, self._snapshot = epoch, time.monotonic(), None
        return written

    def _keep_snapshot(self, epoch: int) -> None:
        """In-memory copy of an epoch's end state whose ``_last`` file was not written
        (``checkpoint_minutes``), so that a stop request can still save it."""
        if not ddp.is_main():
            return
        net_state = {k: v.detach().to("cpu", copy=True) for k, v in self.net.state_dict().items()}
        opt_state = copy.deepcopy(self.optimizer.state_dict())
        self._snapshot = (epoch, net_state, opt_state)

    def save_completed(self) -> int | None:
        """Write ``_last`` for the last completed epoch (after a stop request mid-epoch);
        returns that epoch, or None when no epoch was completed."""
        if self._snapshot is not None:
            epoch, net_state, opt_state = self._snapshot
            self.net.load_state_dict(net_state)
            self.optimizer.load_state_dict(opt_state)
            self.history = [h for h in self.history if h["epoch"] <= epoch]
            self.save(epoch, "last")
        return self.saved_epoch

    def end_epoch(
        self, epoch: int, lr: float, train_loss: float, val_loss: float | None, seconds: float
    ) -> None:
        if not math.isfinite(train_loss):
            msg = f"training diverged (loss {train_loss} at epoch {epoch}); lower the rate"
            raise InputError(msg)
        values = (epoch, lr, train_loss, val_loss, round(seconds, 3))
        self.history.append(dict(zip(_HISTORY_KEYS, values, strict=True)))
        val_text = "" if val_loss is None else f", val_loss {val_loss:.4f}"
        msg = f"epoch {epoch}/{self.cfg.n_epochs - 1}: lr {lr:.3g}, train_loss {train_loss:.4f}"
        logger.info("%s%s (%.1f s)", msg, val_text, seconds)
        if val_loss is not None and (self.best_val_loss is None or val_loss < self.best_val_loss):
            self.best_val_loss, self.best_epoch = val_loss, epoch
            self.save(epoch, "best")
        cfg = self.cfg
        due = epoch == cfg.n_epochs - 1 or epoch % cfg.save_every == 1 % cfg.save_every
        if due or time.monotonic() - self._saved_at >= 60.0 * cfg.checkpoint_minutes:
            self.save(epoch, "last")
        else:
            self._keep_snapshot(epoch)
        if due and cfg.save_each:
            self.save(epoch, "epoch")


def _check_inputs(crops: Sequence[Crop], net_config: NetConfig, cfg: TrainConfig,
                  model_input: ModelInput) -> None:
    if cfg.tile % net_config.size_multiple:
        raise InputError(f"tile {cfg.tile} must be a multiple of {net_config.size_multiple}")
    density = model_input.transcripts.mode == "density"
    for crop in crops:
        nchan = network_input(crop, density=density).shape[0]
        if nchan != net_config.nchan:
            msg = (f"{nchan} input channels but the network takes {net_config.nchan} "
                   f"(--chan and {model_input.n_transcripts} {model_input.transcripts.mode} "
                   "transcript channel(s))")
            raise InputError(f"crop {crop.name}: {msg}", crop.image_path)


def _initial_network(
    net_config: NetConfig,
    cfg: TrainConfig,
    device: torch.device,
    pretrained: str | Path | None,
    resume: str | Path | None,
) -> tuple[GeneSegUNet, dict[str, Any] | None]:
    """A resumed network and its saved state, or a seeded fresh / warm-started one."""
    if resume is not None:
        return _resume_state(Path(resume), net_config, cfg, device)
    net = GeneSegUNet(net_config)
    init_weights(net, torch.Generator().manual_seed(cfg.seed))
    if pretrained is not None:
        missing, _ = net.load_state_dict(pretrained_weights(pretrained, net_config), False)
        assert all(k.startswith("diam_") for k in missing)
    return net, None


def train_network(
    train_crops: Sequence[Crop],
    val_crops: Sequence[Crop] | None,
    net_config: NetConfig,
    train_config: TrainConfig,
    *,
    device: torch.device | str = "cpu",
    model_dir: str | Path,
    model_name: str,
    pretrained: str | Path | None = None,
    resume: str | Path | None = None,
    flow_cache: FlowTargetCache | None = None,
    progress: bool = False,
    checkpoint_extra: dict[str, Any] | None = None,
    model_input: ModelInput | None = None,
) -> TrainResult:
    """Train a network on labelled crops; write ``_last`` / ``_best`` checkpoints.

    Parameters
    ----------
    train_crops, val_crops : crops with labels (``val_crops`` None or empty: no validation
        loss, and ``best_path`` is the last checkpoint).
    net_config : architecture; ``diam_mean`` is the target cell diameter (pixels).
    train_config : :class:`TrainConfig`.
    device : torch device.
    model_dir, model_name : checkpoints go to ``model_dir/{model_name}_{last,best}.pt``;
        existing files are never overwritten (except a resumed run's own files).
    pretrained : checkpoint to warm-start from (weights only; same architecture).
    resume : a ``_last`` checkpoint of an interrupted run; training continues at the next
        epoch with the saved optimizer state, history and file names.
    flow_cache : content-keyed cache of flow targets.
    checkpoint_extra : plain-typed entries added to every checkpoint (e.g. the round).
    model_input : transcript input, gene embedding, training pixel size and image
        normalisation of the inputs (default: upstream's heatmap + percentile); stored in
        every checkpoint under :data:`GeneSegNet.data.model_input.CHECKPOINT_KEY`.

    Raises
    ------
    InputError : no crop with enough cells, channel or tile mismatch, unusable
        ``pretrained`` / ``resume`` checkpoint, files that would be overwritten.
    """
    cfg, device = train_config, as_device(device)
    model_dir = Path(model_dir)
    model_name = ddp.broadcast_object(model_name)  # rank 0's name on every rank
    progress = progress and ddp.is_main()
    model_input = model_input or ModelInput()
    _check_inputs(list(train_crops) + list(val_crops or []), net_config, cfg, model_input)
    if pretrained is not None and resume is not None:
        raise InputError("give either a pretrained model or a checkpoint to resume, not both")
    net, saved = _initial_network(net_config, cfg, device, pretrained, resume)
    if saved is not None:
        model_name = str(saved.get("model_name", model_name))
    prep = (cfg, net_config.diam_mean, device, flow_cache, progress, model_input)
    train, dropped_train = prepare_data(train_crops, "train", *prep)
    if not train.crops:
        msg = f"no training crop has at least {cfg.min_train_masks} cell(s) "
        raise InputError(msg + f"({len(train_crops)} crop(s) loaded); check the label images")
    val, dropped_val = None, 0
    if val_crops:
        val, dropped_val = prepare_data(val_crops, "val", *prep)
        if not val.crops:
            logger.warning("no validation crop has cells: no validation loss")
            val = None
    else:
        logger.info("no validation crops: no validation loss, best model = last model")
    sizes = train.diameters[train.diameters > 0]
    diam_labels = float(sizes.mean()) if sizes.size else net_config.diam_mean
    with torch.no_grad():
        net.diam_mean.fill_(net_config.diam_mean)
        net.diam_labels.fill_(diam_labels)
    net.to(device).train()
    data_key = data_fingerprint(train.crops)
    extra = {**(checkpoint_extra or {}), "data_key": data_key, "n_train": len(train.crops),
             MODEL_INPUT_KEY: model_input.to_dict()}
    run = _Run(net, cfg, device, model_dir, model_name, extra)
    start = 0
    if saved is not None:
        start = run.restore(saved)
        if saved.get("data_key") not in (None, data_key):
            logger.warning("the training data differ from those of the resumed run")
        logger.info("resuming %s at epoch %d", resume, start)
    elif run.last_path.exists() or run.best_path.exists():
        raise InputError("model file exists already; refusing to overwrite", run.last_path)
    n_val = 0 if val is None else len(val.crops)
    msg = f"training on {len(train.crops)} crops ({n_val} validation), epochs {start}.."
    logger.info("%s%d on %s, diam_labels %.2f px", msg, cfg.n_epochs - 1, device, diam_labels)
    with StopRequest() as stop:
        _run_epochs(run, train, val, start, progress, stop)
    ddp.barrier()  # rank 0's checkpoints are written before any rank reads them
    if stop.requested is not None:
        _stopped(run, stop.requested, start)
    if not run.last_path.exists():  # resumed after the final epoch: nothing was run
        run.save(cfg.n_epochs - 1, "last")
    best = run.best_path if run.best_epoch is not None and run.best_path.exists() else None
    epoch = "" if run.saved_epoch is None else f" (epoch {run.saved_epoch})"
    best_text = "" if best is None else (f"; best validation loss {run.best_val_loss:.4f} at "
                                         f"epoch {run.best_epoch}: {best}")
    logger.info("model %s%s%s", run.last_path, epoch, best_text)
    dropped = {"train": dropped_train, "val": dropped_val}
    result = (len(train.crops), n_val, dropped, run.best_epoch, run.best_val_loss)
    return TrainResult(
        run.last_path, best or run.last_path, run.history, diam_labels, model_name, *result
    )


def _stopped(run: _Run, signum: int, start: int) -> None:
    """After a stop request: save the last completed epoch and raise Interrupted."""
    name = signal.Signals(signum).name
    epoch = run.save_completed()
    if epoch is None and start > 0:
        epoch = start - 1  # nothing completed since the resumed checkpoint
    if epoch is None:
        raise Interrupted(f"stopped by {name} before the first epoch ended; nothing to "
                          "resume (start the run again)", signum)
    raise Interrupted(
        f"stopped by {name}: epochs 0..{epoch} of {run.cfg.n_epochs} are saved in "
        f"{run.last_path}; continue with --resume {run.last_path}",
        signum,
    )


def _run_epochs(
    run: _Run, train: TrainData, val: TrainData | None, start: int, progress: bool,
    stop: StopRequest | None = None,
) -> None:
    cfg = run.cfg
    n = len(train.crops)
    per_epoch = math.ceil(n / cfg.batch_size)
    schedule = learning_rate_schedule(cfg.learning_rate, cfg.n_epochs)
    plan = epoch_plan(n, cfg, range(start, cfg.n_epochs))
    dataset = PatchBatches(train, plan, cfg.seed, cfg.scale_range, cfg)
    if run.env.world > 1:  # this rank's share of each global batch, drawn exactly
        dataset = ddp.ShardPatchBatches(train, plan, cfg.seed, cfg.scale_range, cfg, run.env)
    val_batches = None if val is None else validation_batches(val, cfg, run.device)
    bar = tqdm(total=cfg.n_epochs - start, desc="epochs", disable=not progress)
    total, tic = 0.0, time.perf_counter()
    for k, (imgs, lbls) in enumerate(make_loader(dataset, cfg.num_workers, run.device)):
        if stop is not None and ddp.any_rank(stop.requested is not None):
            stop.requested = stop.requested or signal.SIGTERM  # every rank stops here
            break  # at a batch boundary; the caller saves the last completed epoch
        _, epoch, batch_no, idx = plan[k]
        if batch_no == 0:
            for group in run.optimizer.param_groups:
                group["lr"] = float(schedule[epoch])
            total, tic = 0.0, time.perf_counter()
        total += run.step(imgs, lbls, len(idx)) * len(idx)
        if batch_no < per_epoch - 1:
            continue
        val_loss = None
        if val_batches is not None and (epoch % cfg.val_every == 0 or epoch == 5):
            val_loss = run.validation_loss(val_batches)
        run.end_epoch(epoch, float(schedule[epoch]), total / n, val_loss, time.perf_counter() - tic)
        losses = {"train_loss": f"{total / n:.4f}"}
        bar.set_postfix(losses if val_loss is None else {**losses, "val_loss": f"{val_loss:.4f}"})
        bar.update(1)
    bar.close()
