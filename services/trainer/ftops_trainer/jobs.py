"""The job manager: submission, the shared work queue, job records, watch and cancel.

A submitted job is checked (spec, dataset, base model, parent) before anything is stored,
so bad input fails the RPC instead of a job later. Its dataset becomes a registry
artifact, its record goes to the registry, and its id onto a JetStream work queue that all
trainer replicas pull from: each job runs once, on whichever replica is free. A replica
heartbeats the job while it trains; one that dies stops heartbeating, the queue hands the
job to another replica, and training resumes from the last checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ftops.events.v1 import events_pb2
from ftops.registry.v1 import registry_pb2_grpc
from ftops.trainer.v1 import trainer_pb2
from ftops_runtime import events
from ftops_runtime.bus import Delivery, EventBus
from ftops_runtime.errors import FailedPrecondition, NotFound, PermanentEventError
from ftops_runtime.tasks import cancel_and_wait
from ftops_trainer.distributed import visible_gpus
from ftops_trainer.gang import gang_subject, slot_expired
from ftops_trainer.intake import Intake, describe_skipped, skipped_lines
from ftops_trainer.outage import through_registry_outage
from ftops_trainer.reconciler import Reconciler
from ftops_trainer.runner import JobRunner, StopReason, TransientJobError
from ftops_trainer.settings import TrainerSettings
from ftops_trainer.spec import (
    effective_spec,
    spec_fingerprint,
    validate_placement,
    validate_spec,
)
from ftops_trainer.store import JobExists, JobState, JobStore, is_terminal

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 50
_PASS_ON_DELAY_S = 0.5
MAX_PAGE_SIZE = 500


@dataclass
class _Running:
    """A job this replica is training right now."""

    job: trainer_pb2.Job  # the working copy the runner updates
    stop: threading.Event = field(default_factory=threading.Event)
    reason: StopReason = StopReason.NONE
    dirty: asyncio.Event = field(default_factory=asyncio.Event)
    last_event: float = 0.0


def job_id_for(idempotency_key: str) -> str:
    """A resubmit with the same key maps to the same job id on every replica."""
    if idempotency_key:
        return "job_" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:16]
    return f"job_{uuid.uuid4().hex[:16]}"


class JobManager:
    """Plain-Python core of the trainer service (the gRPC servicer only delegates here)."""

    def __init__(
        self,
        settings: TrainerSettings,
        registry: registry_pb2_grpc.RegistryServiceAsyncStub,
        bus: EventBus,
    ) -> None:
        self._settings = settings
        self._bus = bus
        self._store = JobStore(registry)
        self._intake = Intake(settings, registry)
        self._runner = JobRunner(settings, registry, bus.publish, self._intake)
        self._running: dict[str, _Running] = {}
        # Gang memberships: nodes > 0 of other replicas' multi-node jobs, by job/node.
        self._members: dict[str, threading.Event] = {}
        # Jobs plus memberships running here; at most max_concurrent_jobs.
        self._active = 0
        self._closing = False
        self._idle = asyncio.Event()  # set whenever no job (or membership) runs here
        self._idle.set()
        self.reconciler = Reconciler(
            self._store,
            bus,
            self._enqueue,
            queue=settings.job_queue,
            interval_s=settings.reconcile_interval_s,
            grace_s=settings.reconcile_grace_s,
            max_requeues=settings.reconcile_max_requeues,
        )
        self._reconcile_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._settings.work_dir.mkdir(parents=True, exist_ok=True)
        self._settings.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if self._settings.torch_threads:
            import torch

            torch.set_num_threads(self._settings.torch_threads)
        # One pull subscription per concurrent job, all on the shared durable consumer:
        # batch=1 so a replica never holds jobs it is not yet training.
        for _ in range(self._settings.max_concurrent_jobs):
            self._bus.subscribe(
                events.trainer_job_queue(self._settings.job_queue),
                f"trainer-{self._settings.job_queue}",
                self._on_queued_job,
                payload_type=events_pb2.JobEvent,
                ack_wait_s=self._settings.job_ack_wait_s,
                batch=1,
            )
        # Member slots of multi-node jobs (see gang.py): taken while this replica is idle.
        self._bus.subscribe(
            gang_subject(self._settings.job_queue),
            f"trainer-{self._settings.job_queue}-gang",
            self._on_gang_slot,
            payload_type=trainer_pb2.GangSlot,
            ack_wait_s=self._settings.job_ack_wait_s,
            batch=1,
        )
        if self._settings.reconcile_interval_s > 0:
            self._reconcile_task = asyncio.create_task(self.reconciler.run(), name="reconcile")

    def interrupt(self) -> None:
        """Stop taking jobs and stop the running ones at their next step (they keep their
        checkpoints and go back to the queue for another replica)."""
        self._closing = True
        for running in self._running.values():
            running.reason = StopReason.SHUTDOWN
            running.stop.set()
        for stop in self._members.values():
            stop.set()

    async def close(self) -> None:
        """Interrupt running jobs and wait for their handlers to hand them back."""
        self.interrupt()
        if self._reconcile_task is not None:
            await cancel_and_wait([self._reconcile_task])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), max(self._settings.shutdown_grace_s, 5.0))

    # -- API -----------------------------------------------------------------------------

    async def submit(self, spec: trainer_pb2.JobSpec, idempotency_key: str = "") -> trainer_pb2.Job:
        validate_spec(spec)
        validate_placement(spec, visible_gpus())
        fingerprint = spec_fingerprint(spec)
        job_id = job_id_for(idempotency_key)
        if idempotency_key:
            existing = await self._existing(job_id, idempotency_key, fingerprint)
            if existing is not None:
                return existing
        prepared = await self._intake.prepare(spec)  # every check that can fail early
        now = trainer_pb2.Job().created_at
        now.GetCurrentTime()
        job = trainer_pb2.Job(
            job_id=job_id,
            spec=effective_spec(prepared.spec, self._settings),
            state=JobState.JOB_STATE_QUEUED,
            created_at=now,
            updated_at=now,
            spec_fingerprint=fingerprint,
            records_total=prepared.records_total,
            records_skipped=len(prepared.skipped),
            skipped_lines=skipped_lines(prepared.skipped),
            queue=self._settings.job_queue,
        )
        try:
            await self._store.create(job)
        except JobExists:
            existing = await self._existing(job_id, idempotency_key, fingerprint)
            assert existing is not None
            return existing
        try:
            # The event id is the job id: a retried enqueue is stored once (Nats-Msg-Id).
            await self._enqueue(job, f"enqueue-{job_id}")
        except Exception as exc:
            reason = f"could not enqueue: {exc}"
            await self._store.update(job_id, lambda j: _fail(j, reason))
            raise
        log.info("job %s queued for adapter %s", job_id, job.spec.adapter)
        if job.records_skipped:
            log.warning("job %s: %s", job_id, describe_skipped(job))
        await self._job_event(job, "queued")
        return job

    async def _enqueue(self, job: trainer_pb2.Job, event_id: str) -> None:
        """Put the job on its work queue (``event_id`` is the Nats-Msg-Id)."""
        queued = events_pb2.JobEvent(
            meta=events.new_meta("trainer", self._settings.instance_id),
            job_id=job.job_id,
            adapter=job.spec.adapter,
            state=JobState.JOB_STATE_QUEUED,
        )
        queued.meta.event_id = event_id
        await self._bus.publish(events.trainer_job_queue(self._settings.job_queue), queued)

    async def get(self, job_id: str) -> trainer_pb2.Job:
        return (await self._store.get(job_id)).job

    async def list(
        self, adapter: str = "", team: str = "", page_size: int = 0, page_token: str = ""
    ) -> trainer_pb2.ListJobsResponse:
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        reply = await self._store.list(adapter, team, size, page_token)
        return trainer_pb2.ListJobsResponse(
            jobs=[r.job for r in reply.jobs], next_page_token=reply.next_page_token
        )

    async def watch(self, job_id: str) -> AsyncIterator[trainer_pb2.Job]:
        """The current state, then every change, until the job ends (any replica)."""
        revision = -1
        while True:
            record = await self._store.get(job_id)
            if record.revision != revision:
                revision = record.revision
                yield record.job
            if is_terminal(record.job):
                return
            await asyncio.sleep(self._settings.watch_poll_s)

    async def cancel(self, job_id: str) -> trainer_pb2.Job:
        def change(job: trainer_pb2.Job) -> bool:
            if is_terminal(job):
                return False
            job.state = JobState.JOB_STATE_CANCELLED
            job.error = "cancelled by request"
            return True

        record = await self._store.update(job_id, change)
        if record.job.state != JobState.JOB_STATE_CANCELLED:
            raise FailedPrecondition(
                f"job {job_id} already ended as {JobState.Name(record.job.state)}"
            )
        running = self._running.get(job_id)
        if running is not None:  # elsewhere the runner notices at its next progress write
            running.reason = StopReason.CANCELLED
            running.stop.set()
        await self._job_event(record.job, "cancelled")
        return record.job

    # -- the worker side ---------------------------------------------------------------

    async def _existing(self, job_id: str, key: str, fingerprint: str) -> trainer_pb2.Job | None:
        try:
            record = await self._store.get(job_id)
        except NotFound:
            return None
        if record.job.spec_fingerprint != fingerprint:
            raise FailedPrecondition(
                f"idempotency key {key!r} was used for job {job_id} with a different spec"
            )
        return record.job

    async def _on_queued_job(self, event: events_pb2.JobEvent, delivery: Delivery) -> None:
        if self._closing:
            raise RuntimeError("trainer shutting down")  # nak: another replica takes it
        # A gang membership may hold the capacity this subscription stands for: wait for
        # it, heartbeating the job (a nak would spend the job's deliveries).
        while self._active >= self._settings.max_concurrent_jobs:
            await delivery.in_progress()
            await asyncio.sleep(min(1.0, self._settings.job_ack_wait_s / 3))
            if self._closing:
                raise RuntimeError("trainer shutting down")
        self._active += 1
        try:
            await self._run_queued(event, delivery)
        finally:
            self._active -= 1

    async def _run_queued(self, event: events_pb2.JobEvent, delivery: Delivery) -> None:
        if not event.job_id:
            raise PermanentEventError("queued job event without a job id")
        record = await self._store.get(event.job_id)
        if is_terminal(record.job):
            return  # cancelled while queued, or a redelivery of a finished job
        job = trainer_pb2.Job()
        job.CopyFrom(record.job)
        resuming = job.state == JobState.JOB_STATE_RUNNING or job.attempts > 0
        job.state = JobState.JOB_STATE_RUNNING
        job.worker = self._settings.instance_id
        job.attempts += 1
        job.error = ""
        job.updated_at.GetCurrentTime()
        await self._store.put(job, record.revision)
        running = _Running(job=job)
        self._running[job.job_id] = running
        self._idle.clear()
        log.info(
            "job %s %s on %s (attempt %d)",
            job.job_id,
            "resumes" if resuming else "starts",
            job.worker,
            job.attempts,
        )
        await self._job_event(job, "resumed" if resuming else "started")
        heartbeat = asyncio.create_task(self._heartbeat(delivery))
        flusher = asyncio.create_task(self._flush_loop(running))
        try:
            # The runner changes the working copy on this loop only, then calls report.
            await self._runner.run(job, running.stop, running.dirty.set)
        except TransientJobError as exc:
            if delivery.num_delivered < self._settings.event_max_deliver:
                job.state = JobState.JOB_STATE_QUEUED
                job.error = f"{exc}; retrying (delivery {delivery.num_delivered})"
                await self._write(running)
                raise  # nak: redelivered after a delay, resumes from its checkpoint
            _fail(job, f"{exc}; gave up after {delivery.num_delivered} attempts")
        finally:
            await cancel_and_wait([heartbeat, flusher])
            del self._running[job.job_id]
            self._update_idle()
        await self._finish(running)

    def _update_idle(self) -> None:
        if not self._running and not self._members:
            self._idle.set()

    async def _on_gang_slot(self, slot: trainer_pb2.GangSlot, delivery: Delivery) -> None:
        if slot_expired(slot):
            return  # node 0 has failed the job by now
        if self._closing or self._active >= self._settings.max_concurrent_jobs:
            await self._pass_on(slot)
            return
        self._active += 1
        key = f"{slot.job_id}/{slot.node_rank}"
        stop = self._members[key] = threading.Event()
        self._idle.clear()
        heartbeat = asyncio.create_task(self._heartbeat(delivery))
        try:
            record = await self._store.get(slot.job_id)
            job = record.job
            if job.state != JobState.JOB_STATE_RUNNING or job.attempts != slot.attempt:
                return  # a slot of an attempt that ended
            log.info("job %s: joining as node %d of %d", job.job_id, slot.node_rank, slot.nodes)
            await self._runner.run_member(job, slot, stop)
        except Exception as exc:
            # Node 0 owns the job and learns of this through the gang (an abort, or its
            # collectives failing): the slot itself is done either way.
            log.warning("job %s: node %d ended with %r", slot.job_id, slot.node_rank, exc)
        finally:
            await cancel_and_wait([heartbeat])
            del self._members[key]
            self._active -= 1
            self._update_idle()

    async def _pass_on(self, slot: trainer_pb2.GangSlot) -> None:
        """Leave a slot to an idle replica: a fresh copy goes back on the queue (a nak
        would spend its deliveries, busy replicas may decline it many times before its
        deadline). Should both copies survive, the rank claim lets only one join."""
        await asyncio.sleep(_PASS_ON_DELAY_S)
        copy = trainer_pb2.GangSlot()
        copy.CopyFrom(slot)
        copy.meta.event_id = f"{slot.meta.event_id.split('~')[0]}~{uuid.uuid4().hex[:8]}"
        await self._bus.publish(gang_subject(self._settings.job_queue), copy)

    async def _finish(self, running: _Running) -> None:
        job = running.job
        # A job the runner finished (a version may exist) keeps that outcome, whatever
        # asked it to stop meanwhile; only an unfinished one is requeued or cancelled.
        if not is_terminal(job) and running.reason == StopReason.SHUTDOWN:
            # Back to the queue: the nak (raised below) hands it to another replica.
            job.state = JobState.JOB_STATE_QUEUED
            await self._write(running, force=True)
            await self._job_event(job, "interrupted; resumes from its last checkpoint")
            raise RuntimeError(f"job {job.job_id} interrupted by shutdown")
        if not is_terminal(job) and running.reason == StopReason.CANCELLED:
            job.state = JobState.JOB_STATE_CANCELLED
            job.error = job.error or "cancelled by request"
        # The outcome must reach the record: a registry outage is waited out (outage.py).
        await through_registry_outage(
            f"job {job.job_id}: recording its end",
            functools.partial(self._write, running, force=True),
            window_s=self._settings.registry_outage_s,
        )
        log.info("job %s ended %s %s", job.job_id, JobState.Name(job.state), job.error)
        await self._job_event(job, job.error or JobState.Name(job.state))

    async def _heartbeat(self, delivery: Delivery) -> None:
        while True:
            await asyncio.sleep(self._settings.job_ack_wait_s / 3)
            try:
                await delivery.in_progress()
            except Exception as exc:  # NATS blip: the next beat may land
                log.warning("job heartbeat failed: %s", exc)

    async def _flush_loop(self, running: _Running) -> None:
        """Write progress to the record at most every progress_interval_s."""
        while True:
            await running.dirty.wait()
            running.dirty.clear()
            await self._write(running)
            now = time.monotonic()
            if now - running.last_event >= max(self._settings.progress_interval_s, 1.0):
                running.last_event = now
                await self._job_event(running.job, "progress")
            await asyncio.sleep(self._settings.progress_interval_s)

    async def _write(self, running: _Running, *, force: bool = False) -> None:
        """Store the working copy unless the job was cancelled meanwhile (then stop it)."""
        job = running.job
        job.updated_at.GetCurrentTime()

        def change(stored: trainer_pb2.Job) -> bool:
            # A cancel wins, unless a version was already registered: the record must say so.
            if stored.state == JobState.JOB_STATE_CANCELLED and not job.version_id:
                if running.reason == StopReason.NONE:
                    running.reason = StopReason.CANCELLED
                running.stop.set()
                return False
            stored.CopyFrom(job)
            return True

        try:
            await self._store.update(job.job_id, change)
        except Exception as exc:
            if force:
                raise
            log.warning("could not record progress of %s: %s", job.job_id, exc)

    async def _job_event(self, job: trainer_pb2.Job, message: str) -> None:
        """trainer.job is informational: a NATS outage must not fail the job."""
        event = events_pb2.JobEvent(
            meta=events.new_meta("trainer", self._settings.instance_id),
            job_id=job.job_id,
            adapter=job.spec.adapter,
            state=job.state,
            step=job.step,
            total_steps=job.total_steps,
            loss=job.loss,
            learning_rate=job.learning_rate,
            tokens_per_second=job.tokens_per_second,
            eta_seconds=job.eta_seconds,
            message=message,
            version_id=job.version_id,
        )
        try:
            await self._bus.publish(events.TRAINER_JOB, event)
        except Exception as exc:
            log.warning("could not publish trainer.job for %s: %s", job.job_id, exc)


def _fail(job: trainer_pb2.Job, message: str) -> bool:
    job.state = JobState.JOB_STATE_FAILED
    job.error = message
    return True
