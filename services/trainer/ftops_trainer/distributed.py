"""Data-parallel training over worker processes on CPU (torch.distributed, gloo).

Each worker loads the model and trains on its shard of every step's batch; the gradients
(and the loss) are summed across workers once per optimizer step, before clipping, which
is what DDP's all-reduce does. It is done explicitly rather than through the
``DistributedDataParallel`` wrapper so that a worker whose shard is empty (a last batch
smaller than the worker count) still takes part, and so that the step-level terms
(regularisation) count once. Every worker then takes the same optimizer step. Rank 0
reports progress through a queue and writes checkpoints and the adapter. FSDP is not
implemented: adapters are small, the base is replicated on every worker.

Workers are started with the ``spawn`` method: the trainer service runs training in a
thread of an asyncio process, which must not be forked.
"""

from __future__ import annotations

import os
import queue as queue_mod
import tempfile
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import start_processes

from ftops_trainer.loop import Hooks, Job, TrainingStopped, TrainMetrics, TrainResult, run_training

_POLL_S = 0.05


class GlooComm:
    def __init__(self, rank: int, world_size: int) -> None:
        self.rank = rank
        self.world_size = world_size

    def any(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.detach().copy_(flat[offset : offset + n].view_as(t))
            offset += n

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            dist.broadcast(t.detach(), src=0)


def _worker(rank: int, job: Job, world_size: int, init_method: str, out: Any, stop: Any) -> None:
    # Share the cores: N workers each on all cores oversubscribe and crawl.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    try:
        hooks = Hooks(should_stop=stop.is_set)
        if rank == 0:
            hooks.progress = lambda step, total, loss: out.put(("progress", (step, total, loss)))
            hooks.on_metrics = lambda m: out.put(("metrics", m))
        try:
            result = run_training(job, GlooComm(rank, world_size), hooks)
        except TrainingStopped as exc:
            if rank == 0:
                out.put(("stopped", str(exc)))
            return
        if rank == 0:
            out.put(("result", result))
    finally:
        dist.destroy_process_group()


def run_data_parallel(job: Job, world_size: int, hooks: Hooks) -> TrainResult:
    """Train with ``world_size`` worker processes; callbacks run in the calling thread."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    stop = ctx.Event()
    result: TrainResult | None = None
    stopped: str | None = None

    def drain() -> None:
        nonlocal result, stopped
        while True:
            try:
                kind, value = out.get_nowait()
            except queue_mod.Empty:
                return
            if kind == "progress" and hooks.progress is not None:
                hooks.progress(*value)
            elif kind == "metrics" and hooks.on_metrics is not None:
                assert isinstance(value, TrainMetrics)
                hooks.on_metrics(value)
            elif kind == "result":
                result = value
            elif kind == "stopped":
                stopped = value

    with tempfile.TemporaryDirectory(prefix="ftops-ddp-") as rendezvous:
        context = start_processes(  # type: ignore[no-untyped-call]
            _worker,
            args=(job, world_size, f"file://{rendezvous}/store", out, stop),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        # join() raises if a worker failed (and then ends the others).
        while not context.join(timeout=_POLL_S):
            drain()
            if hooks.should_stop is not None and hooks.should_stop():
                stop.set()
        drain()
    if stopped is not None:
        raise TrainingStopped(stopped)
    if result is None:
        raise RuntimeError("data-parallel training ended without a result from rank 0")
    return result
