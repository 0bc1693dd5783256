"""Data-parallel training over worker processes (torch.distributed): gloo on CPU, NCCL on
GPUs (one worker per GPU), on one node or on several (a gang, see ``gang``).

Each worker loads the model and trains on its shard of every step's batch; the gradients
(and the loss) are summed across workers once per optimizer step, before clipping, which
is what DDP's all-reduce does. It is done explicitly rather than through the
``DistributedDataParallel`` wrapper so that a worker whose shard is empty (a last batch
smaller than the worker count) still takes part, and so that the step-level terms
(regularisation) count once. Every worker then takes the same optimizer step. Global rank
0 (node 0's first worker) reports progress through a queue and writes checkpoints and the
adapter. With ``parallelism="fsdp"`` the frozen base is sharded (``sharding``).

Workers are started with the ``spawn`` method: the trainer service runs training in a
thread of an asyncio process, which must not be forked (nor may CUDA be).
"""

from __future__ import annotations

import ctypes
import os
import queue as queue_mod
import signal
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch._C._distributed_c10d import PrefixStore, TCPStore  # typed here, not re-exported
from torch.multiprocessing.spawn import start_processes

from ftops_trainer.loop import Hooks, Job, TrainingStopped, TrainMetrics, TrainResult, run_training

_POLL_S = 0.05
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Placement:
    backend: str  # torch.distributed backend
    device: torch.device


def placement(device_type: str, local_rank: int, gpu_count: int) -> Placement:
    """Backend and device of the worker ``local_rank`` on a node: one GPU per worker with
    NCCL (``cuda:{local_rank}``), gloo on CPU."""
    if device_type == "cuda":
        if local_rank >= gpu_count:
            raise ValueError(
                f"worker {local_rank} needs GPU {local_rank}, but this node has {gpu_count} "
                "visible (one worker per GPU: world_size must not exceed the GPU count)"
            )
        return Placement("nccl", torch.device("cuda", local_rank))
    if device_type != "cpu":
        raise ValueError(f"unknown device type {device_type!r}")
    return Placement("gloo", torch.device("cpu"))


def worker_device_type(device: str, cuda_available: bool) -> str:
    """``cuda`` or ``cpu`` for a job's device setting (auto|cpu|cuda)."""
    if device == "cuda" and not cuda_available:
        raise ValueError("device='cuda' but this trainer has no CUDA GPU")
    return "cuda" if device == "cuda" or (device == "auto" and cuda_available) else "cpu"


def world_size_problem(device_type: str, world_size: int, gpu_count: int) -> str | None:
    if device_type == "cuda" and world_size > gpu_count:
        return (
            f"world_size={world_size} needs {world_size} GPUs (one worker per GPU) but "
            f"{gpu_count} are visible"
        )
    return None


def visible_gpus() -> int:
    """CUDA devices this process may use (CUDA_VISIBLE_DEVICES applies); 0 without CUDA.
    Neither call initialises CUDA, so the service process stays fork-safe."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@dataclass(frozen=True)
class NodeSpec:
    """This node's place in a multi-node job: workers connect to node 0's TCPStore."""

    nodes: int
    node_rank: int
    store_host: str
    store_port: int
    timeout_s: float  # process-group collectives and the store


@dataclass(frozen=True)
class _Topology:
    local_world_size: int
    device_type: str
    node: NodeSpec | None

    @property
    def world_size(self) -> int:
        return self.local_world_size * (self.node.nodes if self.node else 1)

    def rank(self, local_rank: int) -> int:
        return (self.node.node_rank if self.node else 0) * self.local_world_size + local_rank


class TorchComm:
    """The loop's collectives over the default process group. NCCL only reduces tensors on
    the worker's GPU: everything is moved there (and results copied back)."""

    def __init__(self, rank: int, world_size: int, device: torch.device) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device

    def any(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        flat = torch.cat([t.detach().reshape(-1).float().to(self.device) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.detach().copy_(flat[offset : offset + n].view_as(t))
            offset += n

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            buf = t.detach()
            if buf.device == self.device:
                dist.broadcast(buf, src=0)
            else:
                moved = buf.to(self.device)
                dist.broadcast(moved, src=0)
                buf.copy_(moved)


def _init_process_group(topo: _Topology, place: Placement, rank: int, rendezvous_file: str) -> None:
    if topo.node is None:
        # One node: a file rendezvous and torch's default timeout, as always.
        dist.init_process_group(
            place.backend,
            init_method=f"file://{rendezvous_file}",
            rank=rank,
            world_size=topo.world_size,
        )
        return
    # Several nodes: node 0's TCPStore; every collective times out rather than waiting
    # forever on a node that died or hangs.
    timeout = timedelta(seconds=topo.node.timeout_s)
    store = TCPStore(topo.node.store_host, topo.node.store_port, is_master=False, timeout=timeout)
    dist.init_process_group(
        place.backend,
        store=PrefixStore("pg", store),
        rank=rank,
        world_size=topo.world_size,
        timeout=timeout,
    )


def _die_with_parent(parent_pid: int) -> None:
    """A replica that is SIGKILLed must take its workers along: an orphaned worker would
    keep a dead attempt's gang alive, or as rank 0 write checkpoints beside the attempt
    that replaced it. Linux only (prctl); elsewhere the orphans finish and exit."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os._exit(1)


def _worker(
    local_rank: int,
    job: Job,
    topo: _Topology,
    rendezvous_file: str,
    out: Any,
    stop: Any,
    parent_pid: int,
) -> None:
    _die_with_parent(parent_pid)
    gpus = torch.cuda.device_count() if topo.device_type == "cuda" else 0
    place = placement(topo.device_type, local_rank, gpus)
    if place.device.type == "cuda":
        torch.cuda.set_device(place.device)  # before the NCCL group: its default device
    # Share the cores: N workers each on all cores oversubscribe and crawl.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // topo.local_world_size))
    rank = topo.rank(local_rank)
    _init_process_group(topo, place, rank, rendezvous_file)
    try:
        hooks = Hooks(should_stop=stop.is_set)
        if rank == 0:
            hooks.progress = lambda step, total, loss: out.put(("progress", (step, total, loss)))
            hooks.on_metrics = lambda m: out.put(("metrics", m))
        try:
            result = run_training(job, TorchComm(rank, topo.world_size, place.device), hooks)
        except TrainingStopped as exc:
            out.put(("stopped", str(exc)))
            return
        if rank == 0:
            out.put(("result", result))
    finally:
        dist.destroy_process_group()


def run_data_parallel(
    job: Job, world_size: int, hooks: Hooks, node: NodeSpec | None = None
) -> TrainResult | None:
    """Train with ``world_size`` worker processes on this node (times ``node.nodes`` nodes
    in a gang); callbacks run in the calling thread. Returns global rank 0's result: None
    on a node other than node 0."""
    device_type = worker_device_type(job.params.device, torch.cuda.is_available())
    problem = world_size_problem(device_type, world_size, visible_gpus())
    if problem:
        raise ValueError(problem)
    topo = _Topology(world_size, device_type, node)
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
            args=(job, topo, f"{rendezvous}/store", out, stop, os.getpid()),
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
    if topo.rank(0) != 0:
        return None
    if result is None:
        raise RuntimeError("data-parallel training ended without a result from rank 0")
    return result
