"""DDP training: 2 gloo CPU processes match one process on the same global batches."""

from __future__ import annotations

import os
import socket

import numpy as np
import torch
import torch.multiprocessing as mp

from GeneSegNet.model.net import GeneSegUNet, NetConfig
from GeneSegNet.training.ddp import (
    DistEnv,
    ShardedPlan,
    ddp_step,
    finish_distributed,
    init_distributed,
    wrap,
)

N, BATCH, STEPS, TILE = 8, 4, 3, 32


def data():
    rng = np.random.default_rng(0)
    imgs = torch.from_numpy(rng.normal(size=(N, 2, TILE, TILE)).astype(np.float32))
    lbls = torch.from_numpy(rng.normal(size=(N, 3, TILE, TILE)).astype(np.float32))
    lbls[:, 0] = (lbls[:, 0] > 0).float()
    return imgs, lbls


def new_net():
    torch.manual_seed(0)
    return GeneSegUNet(NetConfig(nchan=2, nbase=(4, 8)))


def train(env: DistEnv):
    net = new_net()
    model = wrap(net, torch.device("cpu"))
    # SGD: Adam turns the round-off-sized gradients of conv biases followed by BatchNorm
    # (zero in exact arithmetic) into lr-sized steps of random sign in either run.
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    imgs, lbls = data()
    plan = ShardedPlan(N, BATCH, seed=5, env=env)
    steps = 0
    for epoch in range(2):
        plan.set_epoch(epoch)
        for _, idx in plan:
            if steps == STEPS:
                break
            ddp_step(model, opt, imgs[idx], lbls[idx])
            steps += 1
    return net


def worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    env, _ = init_distributed(DistEnv(rank, 2, rank))
    net = train(env)
    if env.rank == 0:  # spawn joins every process before the test reads the file
        torch.save(net.state_dict(), out)
    # the package's exit: a barrier, then destroy. Destroying while the other rank was
    # still saving aborted a gloo thread (SIGABRT) about once in 12 runs.
    finish_distributed()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_match_one_process(tmp_path):
    out = str(tmp_path / "ddp.pt")
    mp.spawn(worker, args=(free_port(), out), nprocs=2, join=True)
    ddp = torch.load(out)
    single = train(DistEnv()).state_dict()
    assert single.keys() == ddp.keys()
    for name, value in single.items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-4, atol=1e-5, msg=name)
    changed = [k for k, v in single.items() if v.is_floating_point()
               and not torch.equal(v, new_net().state_dict()[k])]
    assert changed


def test_sharded_plan_covers_the_global_batch():
    shards = [list(ShardedPlan(N, BATCH, 5, DistEnv(r, 2)).__iter__()) for r in range(2)]
    one = ShardedPlan(N, BATCH, 5, DistEnv()).global_batches()
    for (b0, a), (b1, c), full in zip(*shards, one, strict=True):
        assert b0 == b1 and sorted([*a, *c]) == sorted(full)
