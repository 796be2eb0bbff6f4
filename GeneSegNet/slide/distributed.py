"""dask.distributed execution of out-of-core whole-slide inference.

The window pass and the mask blocks of :mod:`GeneSegNet.slide.outofcore` become dask tasks:

- one task per window batch (network; the batches of the in-process run, so the same
  outputs), one task per field chunk that depends on the batches whose windows touch it
  (adds them in plan order, divides, writes the chunk and its marker);
- one task per mask block (reads its region of the field, writes its kept cells and its
  marker).

The merge stays in the client process. Results are therefore those of the in-process
run, bit for bit. Tasks already marked done in the run store are not submitted (resume).
Chunk rows are submitted a few at a time so that window outputs held by the workers stay
bounded (about ``rows_in_flight`` rows of chunks).

Clusters: a ``LocalCluster`` on this machine (``workers``), an existing scheduler
(``scheduler="tcp://host:8786"``) or a ``dask_jobqueue.SLURMCluster`` (``slurm`` keyword
arguments, e.g. queue, cores, memory, walltime; ``workers`` jobs). An unreachable
scheduler, a worker that dies (after dask's own retries) and a full disk raise
:class:`GeneSegNet.errors.InputError`; what was marked done stays valid for a rerun.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from GeneSegNet.errors import InputError
from GeneSegNet.model.tiling import taper_mask
from GeneSegNet.slide.blockwise import block_grid
from GeneSegNet.slide.outofcore import (
    MaskSettings,
    add_to_chunk,
    block_cells,
    field_plan,
    forward_batch,
    new_chunk,
)
from GeneSegNet.slide.store import SlideStore, disk_errors
from GeneSegNet.slide.windows import _finalize

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DaskSettings:
    """Where the dask tasks run.

    workers : LocalCluster workers, or SLURM jobs to start.
    threads_per_worker : threads per local worker.
    processes : local workers as processes (True) or threads of this process (False).
    scheduler : address of a running scheduler (``tcp://host:8786``); overrides the rest.
    slurm : keyword arguments of ``dask_jobqueue.SLURMCluster`` (None: no SLURM).
    timeout_s : seconds to wait for the scheduler.
    rows_in_flight : chunk rows of the window pass submitted ahead.
    """

    workers: int = 2
    threads_per_worker: int = 1
    processes: bool = True
    scheduler: str | None = None
    slurm: dict[str, Any] | None = field(default=None)
    timeout_s: float = 30.0
    rows_in_flight: int = 2


@contextmanager
def dask_client(settings: DaskSettings) -> Iterator[Any]:
    """A ``distributed.Client`` for ``settings`` (cluster closed on exit)."""
    from distributed import Client, LocalCluster

    cluster = None
    try:
        if settings.scheduler:
            try:
                client = Client(settings.scheduler, timeout=settings.timeout_s)
            except (OSError, TimeoutError) as exc:
                raise InputError(f"cannot reach the dask scheduler {settings.scheduler} "
                                 f"within {settings.timeout_s:g} s ({exc})") from None
        elif settings.slurm is not None:
            from dask_jobqueue import SLURMCluster

            cluster = SLURMCluster(**settings.slurm)
            cluster.scale(jobs=settings.workers)
            client = Client(cluster, timeout=settings.timeout_s)
        else:
            cluster = LocalCluster(n_workers=settings.workers,
                                   threads_per_worker=settings.threads_per_worker,
                                   processes=settings.processes, dashboard_address=None)
            client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
    finally:
        if cluster is not None:
            cluster.close()


def _blend_chunk(store: SlideStore, i: int, j: int, dtype: str, window: int,
                 items: list[tuple[int, int, tuple[int, int]]], *outs: np.ndarray) -> int:
    """Task: chunk (i, j) from the window outputs ``outs`` (one array per batch);
    ``items`` = (batch position in ``outs``, row in the batch, window start), plan order."""
    acc = new_chunk(store, i, j, dtype)
    weight = taper_mask(window)
    for pos, row, start in items:
        add_to_chunk(acc, store, i, j, outs[pos][row], start, weight)
    with disk_errors(store.path):
        store.write_field_chunk(i, j, _finalize(acc))
    return 1


def _block_task(store: SlideStore, k: int, ms: MaskSettings, device: str) -> int:
    with disk_errors(store.path):
        return block_cells(store, k, ms, device)


class DaskExecutor:
    """Runs stages 1 and 2 of :func:`GeneSegNet.slide.outofcore.segment_slide_out_of_core` on
    a ``distributed.Client`` (pass :meth:`run` as its ``executor``)."""

    def __init__(self, client, settings: DaskSettings, worker_device: str = "cpu") -> None:
        self.client, self.settings, self.worker_device = client, settings, worker_device

    def run(self, net, inputs, plan, store: SlideStore, cfg, ms: MaskSettings, device) -> None:
        from distributed import KilledWorker

        try:
            self._field(net, inputs, plan, store, cfg)
            self._blocks(store, ms)
        except KilledWorker as exc:
            raise InputError(f"a dask worker died while running {exc.task!r} (after dask's "
                             "retries); finished chunks and blocks are kept in the store: "
                             "rerun to resume", store.path) from None

    def _field(self, net, inputs, plan, store: SlideStore, cfg) -> None:
        from distributed import wait

        client = self.client
        fp = field_plan(plan, store.shape, store.chunk, cfg.evaluation.batch_size)
        done = store.field_done()
        batch_of = np.zeros(len(plan.starts), np.int64)
        for b, idx in enumerate(fp.batches):
            batch_of[idx] = b
        by_chunk: dict[tuple[int, int], list[int]] = {}
        for k, cells in enumerate(fp.touches):  # plan order
            for cell in cells:
                by_chunk.setdefault(cell, []).append(k)
        chunks_by_row: dict[int, list[tuple[int, int, list[int]]]] = {}
        last_row = {}
        for i, j in zip(*np.nonzero(~done), strict=True):
            i, j = int(i), int(j)
            windows = by_chunk.get((i, j), [])
            chunks_by_row.setdefault(i, []).append((i, j, windows))
            for k in windows:
                last_row[int(batch_of[k])] = i
        if not chunks_by_row:
            return
        [net_f] = client.scatter([net], broadcast=True)
        [inputs_f] = client.scatter([inputs], broadcast=True)
        batch_f: dict[int, Any] = {}
        pending: list[list[Any]] = []
        n_chunks = 0
        for i in sorted(chunks_by_row):
            row_futures = []
            for _, j, windows in chunks_by_row[i]:
                batches = sorted({int(batch_of[k]) for k in windows})
                for b in batches:
                    if b not in batch_f:
                        batch_f[b] = client.submit(forward_batch, net_f, inputs_f, plan,
                                                   fp.batches[b], self.worker_device,
                                                   pure=False)
                pos = {b: p for p, b in enumerate(batches)}
                items = [(pos[int(batch_of[k])], fp.batches[int(batch_of[k])].index(k),
                          plan.starts[k]) for k in windows]
                row_futures.append(client.submit(
                    _blend_chunk, store, i, j, cfg.canvas_dtype, plan.window, items,
                    *[batch_f[b] for b in batches], pure=False))
            for b in [b for b, r in last_row.items() if r == i]:
                batch_f.pop(b, None)  # the chunk tasks hold them now
            pending.append(row_futures)
            n_chunks += len(row_futures)
            while len(pending) > self.settings.rows_in_flight:
                _wait_all(wait, pending.pop(0))
        for futures in pending:
            _wait_all(wait, futures)
        logger.info("field: %d chunks on %d dask worker(s)", n_chunks,
                    len(client.scheduler_info().get("workers", {})))

    def _blocks(self, store: SlideStore, ms: MaskSettings) -> None:
        from distributed import wait

        store.ensure_blocks(len(block_grid(store.shape, ms.block_size)))
        todo = [int(k) for k in np.flatnonzero(~store.blocks_done())]
        futures = [self.client.submit(_block_task, store, k, ms, self.worker_device,
                                      pure=False) for k in todo]
        _wait_all(wait, futures)
        logger.info("blocks: %d on dask", len(todo))


def _wait_all(wait, futures: list[Any]) -> None:
    """Wait for ``futures``; re-raise the first task error (InputError, KilledWorker...)."""
    wait(futures)
    for f in futures:
        if f.status != "finished":
            f.result()  # raises the task's exception
