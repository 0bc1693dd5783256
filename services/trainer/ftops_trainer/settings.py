"""Trainer settings (environment variables ``FTOPS_<FIELD>``)."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Literal

from pydantic import Field

from ftops_runtime.auth import AuthSettings
from ftops_runtime.settings import ServiceSettings
from ftops_trainer.gate import DEFAULT_MIN_LEARNED


class TrainerSettings(ServiceSettings, AuthSettings):
    registry_address: str = Field(
        "127.0.0.1:50051", description="gRPC address (host:port) of the registry service."
    )
    registry_api_key: str = Field(
        "",
        description="The trainer's own key for registry calls: trainer in every team it trains "
        "for (or a platform-admin service key).",
    )
    work_dir: Path = Field(
        Path(".ftops/trainer"), description="Scratch space for adapters and parent downloads."
    )
    checkpoint_dir: Path = Field(
        Path(".ftops/trainer/checkpoints"),
        description=(
            "Resumable checkpoints, one directory per job. Put it on storage every trainer "
            "replica mounts, so a job taken over by another replica resumes there."
        ),
    )
    checkpoint_every: int = Field(
        50, ge=0, description="Default optimizer steps between checkpoints (0 = none)."
    )
    dataset_dirs: str = Field(
        "",
        description=(
            "Comma-separated directories a job's dataset_uri may point into; empty refuses "
            "dataset_uri (datasets then come inline or as registry artifacts)."
        ),
    )
    max_dataset_mb: float = Field(
        256, gt=0, description="Largest dataset accepted, in MiB (inline, file or artifact)."
    )
    job_queue: str = Field(
        "default",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description=(
            "Work queue this replica takes jobs from and submits to; replicas of one queue "
            "share its jobs (e.g. separate 'gpu' and 'cpu' pools)."
        ),
    )
    max_concurrent_jobs: int = Field(1, ge=1, description="Jobs trained at the same time.")
    serving_backend: Literal["hf", "vllm"] = Field(
        "hf",
        description=(
            "The backend the inference replicas serve with (their FTOPS_BACKEND): a job whose "
            "method it cannot serve is refused at submit (vllm serves LoRA only, without "
            "DoRA; hf every method)."
        ),
    )
    max_bad_line_ratio: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Share of bad dataset lines tolerated (skipped); above it the job fails.",
    )
    torch_threads: int = Field(0, ge=0, description="torch CPU threads; 0 keeps torch's default.")
    max_model_memory_mb: float = Field(
        0,
        ge=0,
        description=(
            "Memory a base model's weights may take on this trainer, in MiB: a job whose base "
            "model's estimate (parameters x 4 bytes, float32, from the safetensors headers) "
            "exceeds 80% of it is refused at submit; 0 = the memory available at submit."
        ),
    )
    progress_interval_s: float = Field(
        1.0, ge=0, description="Least time between progress updates (job record and events)."
    )
    job_ack_wait_s: float = Field(
        60.0,
        gt=0,
        description=(
            "A replica that stops heartbeating a job for this long is presumed dead and the "
            "job goes to another replica (it heartbeats every third of it)."
        ),
    )
    watch_poll_s: float = Field(0.5, gt=0, description="WatchJob's poll interval on the record.")
    registry_outage_s: float = Field(
        300.0,
        ge=0,
        description=(
            "How long a job that has trained waits out a registry outage (the registry or "
            "its database down) for its uploads, its version's registration and its final "
            "record, retrying with backoff while it keeps its place on the queue; beyond it "
            "the job goes back to the queue and resumes from its checkpoint."
        ),
    )
    reconcile_interval_s: float = Field(
        60.0,
        ge=0,
        description=(
            "How often the reconciler looks for jobs recorded QUEUED but missing from the "
            "work queue (their enqueue was lost: NATS and the registry down at submit) and "
            "re-enqueues them; 0 turns it off."
        ),
    )
    reconcile_grace_s: float = Field(
        60.0,
        ge=0,
        description=(
            "The reconciler leaves a QUEUED record alone until it is this old (since its "
            "last write), so a submit still enqueueing is not raced."
        ),
    )
    reconcile_max_requeues: int = Field(
        3,
        ge=1,
        description=(
            "A job the reconciler re-enqueued this many times (each after a worker took it "
            "and lost it) is marked FAILED instead of going round again."
        ),
    )
    replay_capacity: int = Field(
        2000, ge=0, description="Default records a lineage's replay buffer keeps."
    )
    retention_set_size: int = Field(
        256, ge=1, description="Most records in a job's frozen retention set."
    )
    gate_min_retention: float = Field(
        0.95,
        ge=0,
        le=2,
        description=(
            "The evaluation gate's least retention (score on the retention set after / "
            "before) for a job that does not set its own; fit it to the base model (the "
            "dev stack's tiny model forgets fast: ftops-dev up sets 0.3)."
        ),
    )
    gate_min_learned: float = Field(
        DEFAULT_MIN_LEARNED,
        ge=0,
        le=1,
        description=(
            "The evaluation gate's least share of its own training records a version must "
            "answer exactly (greedy decoding; token accuracy when no record has a short "
            "completion): a version that did not learn what it was given is rejected. 0 "
            "turns the check off (still measured)."
        ),
    )
    gate_general_probes: bool = Field(
        True,
        description=(
            "For a base model whose directory has no ftops_retention.jsonl, measure retention "
            "on the general-knowledge probe set (the questions the base model answers right, "
            "filtered when the trainer first uses it and cached in the model cache by its "
            "fingerprint)."
        ),
    )
    gate_learned_set_size: int = Field(
        64, ge=1, description="Most training records a job's learned figure is measured on."
    )

    advertise_host: str = Field(
        "",
        description=(
            "Host other trainer replicas reach this one at, for a multi-node job's "
            "rendezvous (node 0's torch.distributed TCPStore; the workers' own connections "
            "follow it). Empty: grpc_host, or this machine's name when that is a wildcard."
        ),
    )
    gang_timeout_s: float = Field(
        120.0,
        gt=0,
        description=(
            "A multi-node job whose gang (nodes - 1 idle replicas of the queue joining node "
            "0) has not formed within this time fails with a clear error."
        ),
    )
    distributed_timeout_s: float = Field(
        600.0,
        gt=0,
        description=(
            "A multi-node job's collectives and rendezvous time out after this long (a node "
            "that died or hangs); the job then resumes from its checkpoint."
        ),
    )

    def rendezvous_host(self) -> str:
        if self.advertise_host:
            return self.advertise_host
        if self.grpc_host in ("", "0.0.0.0", "::", "[::]"):
            return socket.getfqdn()
        return self.grpc_host

    def allowed_dataset_dirs(self) -> list[Path]:
        return [Path(p.strip()).resolve() for p in self.dataset_dirs.split(",") if p.strip()]
