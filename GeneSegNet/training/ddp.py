"""Data-parallel training on several GPUs (or CPU processes) with PyTorch DDP.

Launch one process per GPU with ``torchrun --nproc_per_node N ...``; each process reads
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (:func:`init_distributed`: NCCL on CUDA, gloo
on CPU). The pieces:

- :class:`ShardedPlan`: the epoch plan of :func:`GeneSegNet.training.batches.epoch_plan`
  (``DistributedSampler``-equivalent): :meth:`ShardedPlan.set_epoch` draws the same
  permutation on every rank (``default_rng([seed, 0, epoch])``), and each global batch
  of ``batch_size`` crops is split into ``world`` equal shards (``idx[rank::world]``), so
  the ranks together see the global batch of a single-process run and DDP's mean of the
  rank gradients equals its gradient;
- :func:`rank_generator`: per-rank augmentation generator
  ``default_rng([seed, tag, epoch, batch, rank])``;
- :func:`ddp_step`: one AdamW step of a ``DistributedDataParallel`` network on the
  rank's shard (the loss of :func:`GeneSegNet.training.loop.loss_fn`);
- :func:`is_main` / :func:`main_only`: checkpoints and logs from rank 0 only;
- :func:`split_items` / :func:`gather_items`: relabelling between rounds split across
  ranks (each relabels ``items[rank::world]``; the results are gathered on every rank in
  the original order).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from GeneSegNet.training.loop import loss_fn

logger = logging.getLogger(__name__)
T = TypeVar("T")


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


def init_distributed(env: DistEnv | None = None) -> tuple[DistEnv, torch.device]:
    """Join the process group (torchrun's env:// rendezvous); returns (env, device):
    ``cuda:LOCAL_RANK`` with NCCL when CUDA is available, else CPU with gloo."""
    env = env or env_from_torchrun()
    use_cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{env.local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if env.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=env.rank,
                                world_size=env.world)
    return env, device


def is_main() -> bool:
    """True on rank 0 (and without a process group)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def main_only(fn: Callable[..., T], *args, **kwargs) -> T | None:
    """Run ``fn`` on rank 0 only (checkpoints, logs); the other ranks wait for it."""
    out = fn(*args, **kwargs) if is_main() else None
    if dist.is_initialized():
        dist.barrier()
    return out


class ShardedPlan:
    """Per-rank batches of the single-process epoch plan (module docstring).

    n : crops; batch_size : global batch size (a multiple of ``world`` so shards are
    equal); seed : the run's seed.
    """

    def __init__(self, n: int, batch_size: int, seed: int, env: DistEnv) -> None:
        if batch_size % env.world:
            raise ValueError(f"batch_size {batch_size} must be a multiple of the "
                             f"{env.world} processes")
        self.n, self.batch_size, self.seed, self.env = n, batch_size, seed, env
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (same permutation on every rank)."""
        self.epoch = int(epoch)

    def global_batches(self) -> list[np.ndarray]:
        """The epoch's global batches (indices), as a single process draws them; a last
        batch smaller than ``batch_size`` is dropped when it cannot be split evenly."""
        order = np.random.default_rng([self.seed, 0, self.epoch]).permutation(self.n)
        out = [order[s : s + self.batch_size] for s in range(0, self.n, self.batch_size)]
        return [b for b in out if len(b) % self.env.world == 0]

    def __iter__(self):
        """(batch number, this rank's indices) of the epoch."""
        for b, idx in enumerate(self.global_batches()):
            yield b, idx[self.env.rank :: self.env.world]


def rank_generator(seed: int, tag: int, epoch: int, batch: int, rank: int
                   ) -> np.random.Generator:
    """Augmentation generator of one rank's shard of one batch."""
    return np.random.default_rng([seed, tag, epoch, batch, rank])


def wrap(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``DistributedDataParallel`` around ``net`` with its BatchNorm layers synchronised
    (``SyncBatchNorm``, in place); ``net`` unchanged without a process group."""
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
    ``SyncBatchNorm`` does not. Input [B, C, H, W]."""

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
            setattr(module, name, new)
        else:
            global_batchnorm(child)
    return module


def ddp_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, imgs: torch.Tensor,
             lbls: torch.Tensor) -> float:
    """One optimizer step on this rank's shard (gradients averaged by DDP); returns
    the mean loss over ranks. imgs [b, C, t, t], lbls [b, 3, t, t]."""
    out = model(imgs)[0]
    loss = loss_fn(out, lbls)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    value = loss.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value.item())


def split_items(items: Sequence[T], env: DistEnv) -> list[T]:
    """This rank's share of the items (e.g. the crops to relabel between rounds)."""
    return list(items[env.rank :: env.world])


def gather_items(mine: list[Any], n: int, env: DistEnv) -> list[Any]:
    """Inverse of :func:`split_items`: every rank's results, in the original order."""
    if env.world == 1 or not dist.is_initialized():
        return list(mine)
    parts: list[Any] = [None] * env.world
    dist.all_gather_object(parts, mine)
    out: list[Any] = [None] * n
    for r, part in enumerate(parts):
        out[r::env.world] = part
    return out
