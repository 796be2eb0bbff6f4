"""Data-parallel training on several GPUs (or CPU processes) with PyTorch DDP.

``GeneSeg_train.py`` launched by ``torchrun --nproc_per_node N`` (``WORLD_SIZE`` > 1)
trains with one process per device (:func:`distributed_device`: NCCL on CUDA with
``--use_gpu``, gloo on CPU). The pieces, used by :mod:`GeneSegNet.training.loop` and
:mod:`GeneSegNet.training.recursive`:

- the epoch plan (``DistributedSampler``-equivalent): every rank draws the same global
  batches of :func:`GeneSegNet.training.batches.epoch_plan` (``default_rng([seed, 0,
  epoch])``, i.e. ``set_epoch``), and rank r takes the crops at positions ``r, r + world,
  ...`` of each global batch of ``batch_size`` (:class:`ShardedPlan`, :func:`shard_rows`);
- :class:`ShardPatchBatches`: rank r's augmented patches of a global batch. Each crop's
  draws come from the batch generator ``default_rng([seed, tag, epoch, batch])``
  advanced to the crop's position (:data:`DRAWS_PER_CROP` draws per crop), so the
  patches are those a single process draws for the same crops: the ranks together see
  exactly the single-process global batch;
- :class:`GlobalBatchNorm2d` / :func:`wrap`: BatchNorm statistics of the global batch,
  and ``DistributedDataParallel``; :func:`shard_loss_weight` weights a rank's mean loss
  so that DDP's mean of the rank gradients is the gradient of the global batch's mean
  loss (shards may differ in size by one);
- :func:`is_main`, :func:`barrier`, :func:`broadcast_object`, :func:`any_rank`:
  checkpoints, logs and the run manifest from rank 0 only, names agreed by all ranks;
- :func:`shard_by_group`: relabelling between rounds split across ranks by sample
  folder (the unit a relabelling writes); :func:`gather_objects` collects the results.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from GeneSegNet.training.augment import random_rotate_and_resize
from GeneSegNet.training.batches import PatchBatches, TrainData
from GeneSegNet.training.config import TrainConfig

logger = logging.getLogger(__name__)
T = TypeVar("T")

# random draws per crop in random_rotate_and_resize: flip, angle, scale, shift (2)
DRAWS_PER_CROP = 5
# collective operations wait this long (a rank-0-only test pass can take a while)
TIMEOUT = datetime.timedelta(hours=6)


@dataclass(frozen=True)
class DistEnv:
    """rank, world (processes), local_rank (GPU index on this node)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0


def env_from_torchrun() -> DistEnv:
    """The process's place from torchrun's environment (single process without it)."""
    return DistEnv(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def current_env() -> DistEnv:
    """The place of this process in the initialised process group (``DistEnv()`` without)."""
    if not dist.is_initialized():
        return DistEnv()
    return DistEnv(dist.get_rank(), dist.get_world_size(),
                   int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(env: DistEnv | None = None, use_cuda: bool | None = None
                     ) -> tuple[DistEnv, torch.device]:
    """Join the process group (torchrun's env:// rendezvous); returns (env, device):
    ``cuda:LOCAL_RANK`` with NCCL when ``use_cuda`` (default: CUDA available), else CPU
    with gloo."""
    env = env or env_from_torchrun()
    if use_cuda is None:
        use_cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{env.local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if env.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=env.rank,
                                world_size=env.world, timeout=TIMEOUT)
    return env, device


def distributed_device(use_gpu: bool, gpu_device: int) -> tuple[DistEnv, torch.device]:
    """The training device: under torchrun (``WORLD_SIZE`` > 1) join the process group
    (one process per GPU with ``use_gpu`` and CUDA, else gloo on CPU); otherwise
    :func:`GeneSegNet.device.get_device`."""
    from GeneSegNet.device import get_device

    env = env_from_torchrun()
    if env.world == 1:
        return env, get_device(use_gpu, gpu_device)
    cuda = use_gpu and torch.cuda.is_available()
    if use_gpu and not cuda:
        logger.warning("--use_gpu given but CUDA is not available; training on CPU (gloo)")
    return init_distributed(env, use_cuda=cuda)


def finish_distributed() -> None:
    """Leave the process group (after a last barrier)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_main() -> bool:
    """True on rank 0 (and without a process group)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (e.g. the run id, a model name)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _collective_device() -> torch.device:
    """Where tensors of a collective must live: the current CUDA device under NCCL, else
    the CPU (gloo)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (e.g. a stop request)."""
    return all_sum([1.0 if flag else 0.0])[0] > 0


def all_sum(values: Sequence[float]) -> list[float]:
    """Elementwise sum of ``values`` over the ranks (float64)."""
    if not dist.is_initialized():
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64,
                          device=_collective_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


class ShardedPlan:
    """Per-rank batches of the single-process epoch plan (module docstring).

    n : crops; batch_size : global batch size; seed : the run's seed.
    """

    def __init__(self, n: int, batch_size: int, seed: int, env: DistEnv) -> None:
        self.n, self.batch_size, self.seed, self.env = n, batch_size, seed, env
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (same permutation on every rank)."""
        self.epoch = int(epoch)

    def global_batches(self) -> list[np.ndarray]:
        """The epoch's global batches (indices), as a single process draws them."""
        order = np.random.default_rng([self.seed, 0, self.epoch]).permutation(self.n)
        return [order[s : s + self.batch_size] for s in range(0, self.n, self.batch_size)]

    def __iter__(self):
        """(batch number, this rank's indices) of the epoch."""
        for b, idx in enumerate(self.global_batches()):
            yield b, idx[shard_rows(len(idx), self.env)]


def shard_rows(n: int, env: DistEnv) -> np.ndarray:
    """Positions in a global batch of ``n`` crops taken by rank ``env.rank``."""
    return np.arange(env.rank, n, env.world)


def shard_loss_weight(n_rank: int, n_global: int, world: int) -> float:
    """Factor of a rank's mean loss over its ``n_rank`` crops such that the mean of the
    ``world`` rank gradients (DDP) is the gradient of the mean loss over ``n_global``."""
    return n_rank * world / n_global


class ShardPatchBatches(PatchBatches):
    """Item k = rank ``env.rank``'s patches of global batch ``plan[k]``: the rows
    :func:`shard_rows` of the single-process :class:`PatchBatches` item, drawn exactly
    (module docstring). Empty shards give zero-length tensors."""

    def __init__(self, data: TrainData, plan: list, seed: int, scale_range: float,
                 cfg: TrainConfig, env: DistEnv) -> None:
        super().__init__(data, plan, seed, scale_range, cfg)
        self.env = env

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        tag, epoch, batch_no, idx = self.plan[k]
        mode, tile = self.cfg.heatmap_mode, self.cfg.tile
        rows = shard_rows(len(idx), self.env)
        if not len(rows):  # a global batch smaller than the world: nothing for this rank
            nchan = self.data.network_input(int(idx[0]), mode).shape[0]
            return torch.zeros((0, nchan, tile, tile)), torch.zeros((0, 3, tile, tile))
        imgs, lbls = [], []
        for pos in rows:
            i = int(idx[pos])
            rng = np.random.default_rng([self.seed, tag, epoch, batch_no])
            rng.bit_generator.advance(DRAWS_PER_CROP * int(pos))
            img, lbl, _ = random_rotate_and_resize(
                [self.data.network_input(i, mode)], [self.data.targets[i]],
                rescale=self.data.rescale[[i]], scale_range=self.scale_range,
                xy=(tile, tile), rng=rng)
            imgs.append(img[0])
            lbls.append(lbl[0])
        return torch.from_numpy(np.stack(imgs)), torch.from_numpy(np.stack(lbls))


def wrap(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``DistributedDataParallel`` around ``net`` with its BatchNorm layers computing
    global-batch statistics (in place); ``net`` unchanged without a process group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return net
    ids = [device.index] if device.type == "cuda" else None
    # batch statistics over the global batch (as one process computes them)
    if device.type == "cuda":
        synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    else:
        synced = global_batchnorm(net)
    return torch.nn.parallel.DistributedDataParallel(synced, device_ids=ids)


class GlobalBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch: per-channel
    sums are all-reduced (differentiably) over the ranks; works with gloo on CPU, where
    ``SyncBatchNorm`` does not, and with shards of different (even zero) sizes.
    Input [B, C, H, W]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized():
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        count = torch.full((1,), x.numel() / c, dtype=x.dtype, device=x.device)
        stats = all_reduce(torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), count]))
        total = stats[-1]
        mean = stats[:c] / total
        var = (stats[c : 2 * c] / total - mean * mean).clamp_min(0.0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = 0.1 if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * total / (total - 1))
        y = (x - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + self.eps)
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def global_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every ``BatchNorm2d`` of ``module`` by :class:`GlobalBatchNorm2d` (same
    parameters and buffers), in place; returns ``module``."""
    for name, child in module.named_children():
        if type(child) is torch.nn.BatchNorm2d:
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum,
                                    child.affine, child.track_running_stats)
            new.load_state_dict(child.state_dict())
            setattr(module, name, new.to(child.weight.device if child.affine else "cpu"))
        else:
            global_batchnorm(child)
    return module


def ddp_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, imgs: torch.Tensor,
             lbls: torch.Tensor, n_global: int | None = None) -> float:
    """One optimizer step on this rank's shard (gradients averaged by DDP); returns
    the mean loss over the global batch. imgs [b, C, t, t], lbls [b, 3, t, t];
    ``n_global``: crops in the global batch (default: ``b`` x world)."""
    from GeneSegNet.training.loop import loss_fn

    world = dist.get_world_size() if dist.is_initialized() else 1
    n_global = n_global or len(imgs) * world
    out = model(imgs)[0]
    loss = loss_fn(out, lbls) if len(imgs) else out.sum() * 0.0
    optimizer.zero_grad(set_to_none=True)
    (loss * shard_loss_weight(len(imgs), n_global, world)).backward()
    optimizer.step()
    return all_sum([float(loss.detach()) * len(imgs)])[0] / n_global


def shard_by_group(items: Sequence[T], key: Callable[[T], Any], env: DistEnv) -> list[T]:
    """This rank's items (in their order) when whole groups (``key``: e.g. the sample
    folder) go to the ranks, largest groups first to the least loaded rank."""
    if env.world == 1:
        return list(items)
    groups: dict[Any, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(key(item), []).append(i)
    load = [0] * env.world
    mine: list[int] = []
    for members in sorted(groups.values(), key=lambda m: (-len(m), m[0])):
        rank = int(np.argmin(load))
        load[rank] += len(members)
        if rank == env.rank:
            mine.extend(members)
    return [items[i] for i in sorted(mine)]


def gather_objects(obj: T) -> list[T]:
    """Every rank's ``obj`` (rank order), on every rank."""
    if not dist.is_initialized():
        return [obj]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts
