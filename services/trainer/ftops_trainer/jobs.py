"""The job manager: validation, idempotent submission, a bounded queue of workers, and the
pipeline each job runs (dataset -> base model -> parent -> train -> upload -> register ->
adapter.ready).

Job state lives in memory for now: a restart forgets queued and finished jobs (the
registry-backed job records come in a later issue). The registered versions themselves
are durable in the registry.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from ftops.events.v1 import events_pb2
from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
from ftops.trainer.v1 import trainer_pb2
from ftops_runtime import events, hashing
from ftops_runtime.artifacts import download_artifact
from ftops_runtime.errors import FailedPrecondition, FtopsError, InvalidArgument, NotFound
from ftops_runtime.retry import retry_forever
from ftops_runtime.tasks import cancel_and_wait
from ftops_trainer import artifacts
from ftops_trainer.dataset import load_dataset
from ftops_trainer.settings import TrainerSettings
from ftops_trainer.training import (
    ADAPTER_FILES,
    NothingToTrain,
    TrainingStopped,
    TrainParams,
    train_adapter,
)

log = logging.getLogger(__name__)

JobState = events_pb2.JobState
TERMINAL = frozenset(
    {JobState.JOB_STATE_SUCCEEDED, JobState.JOB_STATE_FAILED, JobState.JOB_STATE_CANCELLED}
)
ADAPTER_NAME = re.compile(r"[a-z0-9][a-z0-9\-_.]{0,62}")
METHOD_LORA = "lora"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
REGISTRY_TIMEOUT_S = 30.0

Publish = Callable[[str, Message], Awaitable[None]]


class JobFailed(Exception):
    """Ends a job as FAILED with a message meant for the user."""


def _now() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


def _local_fingerprint(model_dir: Path) -> str:
    if not model_dir.is_dir():
        raise FileNotFoundError("that is not a directory on the trainer")
    return hashing.model_fingerprint(model_dir)


# -- spec validation and defaults ----------------------------------------------------------


def validate_spec(spec: trainer_pb2.JobSpec) -> None:
    """Reject what can never train, before the job is queued (INVALID_ARGUMENT)."""
    problems: list[str] = []
    if not ADAPTER_NAME.fullmatch(spec.adapter):
        problems.append(
            f"adapter {spec.adapter!r} must match {ADAPTER_NAME.pattern} "
            "(lower-case letters, digits, '-', '_', '.'; at most 63 characters)"
        )
    if not spec.base_model:
        problems.append("base_model is required (a base model name registered in the registry)")
    which = spec.WhichOneof("dataset")
    if (
        which is None
        or (which == "dataset_jsonl" and not spec.dataset_jsonl)
        or (which == "dataset_uri" and not spec.dataset_uri)
    ):
        problems.append("a dataset is required: dataset_jsonl (bytes) or dataset_uri (a path)")
    if spec.method and spec.method != METHOD_LORA:
        problems.append(f"method {spec.method!r} is not supported (only {METHOD_LORA!r})")
    lora, hp = spec.lora, spec.hyperparameters
    if lora.r > 256:
        problems.append(f"lora.r={lora.r} is too large (at most 256)")
    if not 0 <= lora.dropout < 1:
        problems.append(f"lora.dropout={lora.dropout} must be in [0, 1)")
    if hp.learning_rate < 0 or hp.learning_rate > 1:
        problems.append(f"hyperparameters.learning_rate={hp.learning_rate} must be in (0, 1]")
    if hp.batch_size > 1024:
        problems.append(f"hyperparameters.batch_size={hp.batch_size} is too large (at most 1024)")
    if hp.num_epochs > 1000:
        problems.append(f"hyperparameters.num_epochs={hp.num_epochs} is too large (at most 1000)")
    if hp.cutoff_len and hp.cutoff_len < 2:
        problems.append("hyperparameters.cutoff_len must be at least 2 tokens")
    if problems:
        raise InvalidArgument("invalid job spec: " + "; ".join(problems))


def effective_spec(spec: trainer_pb2.JobSpec) -> trainer_pb2.JobSpec:
    """The spec with every default filled in, so a job shows what it actually ran with."""
    d = TrainParams()
    out = trainer_pb2.JobSpec()
    out.CopyFrom(spec)
    out.method = spec.method or METHOD_LORA
    out.lora.r = spec.lora.r or d.r
    out.lora.alpha = spec.lora.alpha or d.alpha
    if not spec.lora.target_modules:
        out.lora.target_modules.extend(d.target_modules)
    hp = out.hyperparameters
    hp.learning_rate = hp.learning_rate or d.learning_rate
    hp.num_epochs = hp.num_epochs or d.num_epochs
    hp.batch_size = hp.batch_size or d.batch_size
    hp.cutoff_len = hp.cutoff_len or d.cutoff_len
    return out


def train_params(spec: trainer_pb2.JobSpec) -> TrainParams:
    """TrainParams from an effective spec."""
    hp = spec.hyperparameters
    return TrainParams(
        r=spec.lora.r,
        alpha=spec.lora.alpha,
        dropout=spec.lora.dropout,
        target_modules=tuple(spec.lora.target_modules),
        learning_rate=hp.learning_rate,
        num_epochs=hp.num_epochs,
        batch_size=hp.batch_size,
        cutoff_len=hp.cutoff_len,
        seed=hp.seed,
        max_steps=hp.max_steps,
    )


# -- the job record ----------------------------------------------------------------------


@dataclass
class _Entry:
    job: trainer_pb2.Job
    request_spec: trainer_pb2.JobSpec  # as submitted; compared on idempotent resubmits
    # Replaced on every change: watchers wait on the one current when they took a snapshot.
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    last_progress: float = 0.0
    last_progress_event: float = 0.0


class JobManager:
    """Plain-Python core of the trainer service (the gRPC servicer only delegates here)."""

    def __init__(
        self,
        settings: TrainerSettings,
        registry: registry_pb2_grpc.RegistryServiceAsyncStub,
        publish: Publish,
    ) -> None:
        self._settings = settings
        self._registry = registry
        self._publish = publish
        self._jobs: dict[str, _Entry] = {}
        self._by_key: dict[str, str] = {}
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._stop_training = threading.Event()
        # Fire-and-forget progress events; referenced so they are not garbage collected.
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._settings.work_dir.mkdir(parents=True, exist_ok=True)
        if self._settings.torch_threads:
            import torch

            torch.set_num_threads(self._settings.torch_threads)
        for i in range(self._settings.max_concurrent_jobs):
            self._workers.append(asyncio.create_task(self._worker(), name=f"trainer-worker-{i}"))

    async def close(self) -> None:
        """Stop the workers; a job in training stops at its next step and ends FAILED."""
        self._stop_training.set()
        for task in self._workers:
            task.cancel()
        await cancel_and_wait(self._workers)
        self._workers.clear()

    # -- API -----------------------------------------------------------------------------

    async def submit(self, spec: trainer_pb2.JobSpec, idempotency_key: str = "") -> trainer_pb2.Job:
        validate_spec(spec)
        if idempotency_key and idempotency_key in self._by_key:
            entry = self._jobs[self._by_key[idempotency_key]]
            if entry.request_spec != spec:
                raise FailedPrecondition(
                    f"idempotency key {idempotency_key!r} was used for job "
                    f"{entry.job.job_id} with a different spec"
                )
            return self._snapshot(entry)
        now = _now()
        job = trainer_pb2.Job(
            job_id=f"job_{uuid.uuid4().hex[:16]}",
            spec=effective_spec(spec),
            state=JobState.JOB_STATE_QUEUED,
            created_at=now,
            updated_at=now,
        )
        entry = _Entry(job=job, request_spec=spec)
        self._jobs[job.job_id] = entry
        if idempotency_key:
            self._by_key[idempotency_key] = job.job_id
        log.info("job %s queued for adapter %s", job.job_id, spec.adapter)
        await self._job_event(entry, "queued")
        self._queue.put_nowait(job.job_id)
        return self._snapshot(entry)

    def get(self, job_id: str) -> trainer_pb2.Job:
        return self._snapshot(self._entry(job_id))

    def list(
        self, adapter: str = "", page_size: int = 0, page_token: str = ""
    ) -> trainer_pb2.ListJobsResponse:
        """Newest first; the page token is an offset into that order."""
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        try:
            offset = int(page_token) if page_token else 0
        except ValueError:
            raise InvalidArgument(f"invalid page_token {page_token!r}") from None
        jobs = [e.job for e in self._jobs.values() if not adapter or e.job.spec.adapter == adapter]
        jobs.sort(key=lambda j: (j.created_at.seconds, j.created_at.nanos), reverse=True)
        page = jobs[offset : offset + size]
        more = offset + size < len(jobs)
        return trainer_pb2.ListJobsResponse(
            jobs=[self._copy(j) for j in page], next_page_token=str(offset + size) if more else ""
        )

    async def watch(self, job_id: str) -> AsyncIterator[trainer_pb2.Job]:
        """The current state, then every change, until the job ends."""
        entry = self._entry(job_id)
        while True:
            # Snapshot and waiter taken together (no await between): no change is missed.
            waiter, job = entry.changed, self._snapshot(entry)
            yield job
            if job.state in TERMINAL:
                return
            await waiter.wait()

    # -- internals -----------------------------------------------------------------------

    def _entry(self, job_id: str) -> _Entry:
        entry = self._jobs.get(job_id)
        if entry is None:
            raise NotFound(f"job {job_id!r} not found (job records live in memory until restart)")
        return entry

    @staticmethod
    def _copy(job: trainer_pb2.Job) -> trainer_pb2.Job:
        out = trainer_pb2.Job()
        out.CopyFrom(job)
        return out

    def _snapshot(self, entry: _Entry) -> trainer_pb2.Job:
        return self._copy(entry.job)

    def _changed(self, entry: _Entry) -> None:
        entry.job.updated_at.CopyFrom(_now())
        entry.changed.set()
        entry.changed = asyncio.Event()

    async def _job_event(self, entry: _Entry, message: str = "") -> None:
        """trainer.job is informational: a NATS outage must not fail the job."""
        job = entry.job
        event = events_pb2.JobEvent(
            meta=events.new_meta("trainer", self._settings.instance_id),
            job_id=job.job_id,
            state=job.state,
            step=job.step,
            total_steps=job.total_steps,
            loss=job.loss,
            message=message or job.error,
            version_id=job.version_id,
        )
        try:
            await self._publish(events.TRAINER_JOB, event)
        except Exception as exc:
            log.warning("could not publish trainer.job for %s: %s", job.job_id, exc)

    async def _set_state(self, entry: _Entry, state: int, message: str = "") -> None:
        entry.job.state = state  # type: ignore[assignment]
        self._changed(entry)
        await self._job_event(entry, message)

    def _on_progress(self, entry: _Entry, step: int, total: int, loss: float) -> None:
        """Runs on the event loop (the training thread schedules it). Throttled, except
        for the last step, so watchers and NATS see a bounded rate on big jobs."""
        now = time.monotonic()
        interval = self._settings.progress_interval_s
        if step < total and now - entry.last_progress < interval:
            return
        entry.last_progress = now
        entry.job.step, entry.job.total_steps, entry.job.loss = step, total, loss
        self._changed(entry)
        if now - entry.last_progress_event >= max(interval, 1.0) or step == total:
            entry.last_progress_event = now
            task = asyncio.create_task(self._job_event(entry, "progress"))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _worker(self) -> None:
        while True:
            job_id = await self._queue.get()
            entry = self._jobs[job_id]
            try:
                await self._run(entry)
            except asyncio.CancelledError:
                entry.job.error = "the trainer shut down while the job ran"
                entry.job.state = JobState.JOB_STATE_FAILED
                self._changed(entry)
                raise
            finally:
                self._queue.task_done()

    async def _run(self, entry: _Entry) -> None:
        job = entry.job
        work = self._settings.work_dir / job.job_id
        await self._set_state(entry, JobState.JOB_STATE_RUNNING, "started")
        started = time.monotonic()
        try:
            version = await self._pipeline(entry, work, started)
        except (JobFailed, FtopsError, NothingToTrain) as exc:
            await self._fail(entry, str(exc))
        except TrainingStopped as exc:
            await self._fail(entry, f"the trainer shut down while the job trained ({exc})")
        except grpc.aio.AioRpcError as exc:
            await self._fail(
                entry,
                f"registry at {self._settings.registry_address} answered "
                f"{exc.code().name}: {exc.details()}",
            )
        except Exception as exc:
            log.exception("job %s crashed", job.job_id)
            await self._fail(entry, f"internal error: {exc!r}")
        else:
            job.version_id, job.version_number = version.version_id, version.number
            log.info(
                "job %s succeeded: %s (%s:%d)",
                job.job_id,
                version.version_id,
                version.adapter,
                version.number,
            )
            await self._set_state(entry, JobState.JOB_STATE_SUCCEEDED, "succeeded")
        finally:
            shutil.rmtree(work, ignore_errors=True)

    async def _fail(self, entry: _Entry, message: str) -> None:
        log.warning("job %s failed: %s", entry.job.job_id, message)
        entry.job.error = message
        await self._set_state(entry, JobState.JOB_STATE_FAILED, message)

    async def _read_dataset(self, spec: trainer_pb2.JobSpec) -> bytes:
        if spec.WhichOneof("dataset") == "dataset_jsonl":
            return spec.dataset_jsonl
        uri = spec.dataset_uri
        path = Path(uri.removeprefix("file://"))
        try:
            return await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            raise JobFailed(f"cannot read dataset_uri {uri!r}: {exc.strerror or exc}") from exc

    async def _pipeline(self, entry: _Entry, work: Path, started: float) -> registry_pb2.Version:
        job, spec = entry.job, entry.job.spec
        data = await self._read_dataset(spec)
        dataset = load_dataset(data, self._settings.max_bad_line_ratio)  # DatasetError: FAILED
        job.records_total = dataset.total
        job.records_used = len(dataset.records)
        job.records_skipped = len(dataset.errors)
        if dataset.errors:
            log.info(
                "job %s skips %d bad lines:\n%s", job.job_id, len(dataset.errors), dataset.report()
            )
        self._changed(entry)

        base = await self._resolve_base_model(spec.base_model)
        parent_dir: Path | None = None
        if spec.parent_version_id:
            parent_dir = await self._fetch_parent(spec, base, work / "parent")

        loop = asyncio.get_running_loop()

        def progress(step: int, total: int, loss: float) -> None:
            loop.call_soon_threadsafe(self._on_progress, entry, step, total, loss)

        result = await asyncio.to_thread(
            train_adapter,
            Path(base.uri),
            dataset.records,
            train_params(spec),
            work / "adapter",
            base_model_name=base.name,
            parent_adapter_dir=parent_dir,
            progress=progress,
            should_stop=self._stop_training.is_set,
        )
        job.records_used = result.examples
        job.records_skipped = job.records_total - result.examples

        files = await asyncio.to_thread(artifacts.describe_files, result.adapter_dir, ADAPTER_FILES)
        artifact = await artifacts.upload_artifact(self._registry, result.adapter_dir, files)
        version: registry_pb2.Version = await self._registry.RegisterVersion(
            registry_pb2.RegisterVersionRequest(
                adapter=spec.adapter,
                team=spec.team,
                base_model=base.name,
                parent_version_id=spec.parent_version_id,
                artifact_id=artifact.artifact_id,
                job_id=job.job_id,
                dataset_fingerprint=dataset.fingerprint,
                method=spec.method,
                metrics={
                    "final_loss": result.final_loss,
                    "train_records": float(result.examples),
                    "train_steps": float(result.steps),
                    "train_seconds": round(time.monotonic() - started, 3),
                },
                labels=dict(spec.labels),
                # A retried registration after a lost reply returns the same version.
                idempotency_key=job.job_id,
            ),
            timeout=REGISTRY_TIMEOUT_S,
        )
        ready = events_pb2.AdapterReady(
            meta=events.new_meta("trainer", self._settings.instance_id),
            version_id=version.version_id,
            adapter=version.adapter or spec.adapter,
            version_number=version.number,
            base_model=base.name,
            base_model_fingerprint=base.fingerprint,
            files=list(version.files) or files,
            job_id=job.job_id,
            parent_version_id=spec.parent_version_id,
            team=spec.team,
        )

        async def announce() -> None:
            await self._publish(events.ADAPTER_READY, ready)

        # The version exists now; inference learns of it only through this event, so keep
        # trying through a NATS outage (the event id dedups a publish that did land).
        await retry_forever(f"publish adapter.ready for {version.version_id}", announce)
        return version

    async def _resolve_base_model(self, name: str) -> registry_pb2.BaseModel:
        try:
            base: registry_pb2.BaseModel = await self._registry.GetBaseModel(
                registry_pb2.GetBaseModelRequest(name=name), timeout=REGISTRY_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise JobFailed(
                    f"base model {name!r} is not registered in the registry "
                    "(inference registers the model it serves at start)"
                ) from exc
            raise
        try:
            local = await asyncio.to_thread(_local_fingerprint, Path(base.uri))
        except FileNotFoundError as exc:
            raise JobFailed(f"base model {name!r} registered at {base.uri!r}: {exc}") from exc
        if local != base.fingerprint:
            raise JobFailed(
                f"base model {name!r} at {base.uri!r} has fingerprint {local[:16]}..., but the "
                f"registry recorded {base.fingerprint[:16]}...: the files changed since it "
                "was registered; refusing to train an adapter for the wrong weights"
            )
        return base

    async def _fetch_parent(
        self, spec: trainer_pb2.JobSpec, base: registry_pb2.BaseModel, dest: Path
    ) -> Path:
        try:
            parent: registry_pb2.Version = await self._registry.GetVersion(
                registry_pb2.GetVersionRequest(version_id=spec.parent_version_id),
                timeout=REGISTRY_TIMEOUT_S,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise JobFailed(
                    f"parent version {spec.parent_version_id!r} not found in the registry"
                ) from exc
            raise
        if parent.base_model_fingerprint and parent.base_model_fingerprint != base.fingerprint:
            raise JobFailed(
                f"parent version {parent.version_id} was trained on base model "
                f"{parent.base_model!r} (fingerprint {parent.base_model_fingerprint[:16]}...), "
                f"not on {base.name!r} ({base.fingerprint[:16]}...)"
            )
        files = await download_artifact(
            self._registry,
            parent.artifact_id,
            dest,
            label=f"parent version {parent.version_id}",
            expected=list(parent.files),
        )
        missing = set(ADAPTER_FILES) - {f.path for f in files}
        if missing:
            raise JobFailed(
                f"parent version {parent.version_id} artifact lacks {', '.join(sorted(missing))}"
            )
        return dest
