"""Puts back on the work queue the jobs whose queue message was lost.

A job's record and its queue message are written one after the other (registry, then
NATS), so they can disagree: a submit that stored the record while NATS was down and could
not mark it FAILED because the registry then went down too, a trainer that died between
the two writes, or a job handed back at shutdown on its last allowed delivery (the bus
dead-letters it). Such a job stays QUEUED forever with nothing to run it.

Every ``reconcile_interval_s`` each replica lists the QUEUED records of its queue, reads
which job ids the work queue holds (waiting or being trained: JetStream removes a message
only when it is acked), and re-enqueues the records last written more than
``reconcile_grace_s`` ago that the queue does not hold. Idempotent: the message id is
derived from the job and its record revision, so replicas reconciling at once (and a pass
repeated before anything changed) store one message; a job whose record changed since it
was listed is left for the next pass; a redelivery of a job that is running or finished
is ignored by the worker (it checks the record).

A job that never gets through (one that kills its trainer on every delivery, such as a
job too large for the machine's memory) would be dead-lettered and re-enqueued forever:
after ``max_requeues`` re-enqueues by this replica, each of a new revision of its record
(a worker took it in between and handed it back), it is marked FAILED instead, saying so.
A pass repeated on the same revision (nothing took the job since) does not count.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from ftops.events.v1 import events_pb2
from ftops.registry.v1 import registry_pb2
from ftops.trainer.v1 import trainer_pb2
from ftops_runtime import events
from ftops_runtime.bus import EventBus
from ftops_trainer.store import JobState, JobStore

log = logging.getLogger(__name__)

DEFAULT_QUEUE = "default"
_PAGE_SIZE = 200

# (job, event id) -> the job is on its queue.
Enqueue = Callable[[trainer_pb2.Job, str], Awaitable[None]]


def job_queue(job: trainer_pb2.Job) -> str:
    """The queue a job belongs to; records older than Job.queue belong to the default."""
    return job.queue or DEFAULT_QUEUE


class Reconciler:
    def __init__(
        self,
        store: JobStore,
        bus: EventBus,
        enqueue: Enqueue,
        *,
        queue: str,
        interval_s: float,
        grace_s: float,
        max_requeues: int = 3,
    ) -> None:
        self._store = store
        self._bus = bus
        self._enqueue = enqueue
        self._queue = queue
        self._interval_s = interval_s
        self._grace_s = grace_s
        self._max_requeues = max_requeues
        # job id -> the record revisions this replica re-enqueued it at
        self._requeues: dict[str, set[int]] = {}

    async def run(self) -> None:
        """Reconcile every ``interval_s`` until cancelled; a pass that fails (the registry
        or NATS down) is logged and the next one tries again."""
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.reconcile_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("job reconciliation on queue %s failed: %r", self._queue, exc)

    async def reconcile_once(self) -> list[str]:
        """One pass; the ids of the jobs it put back on the queue."""
        stale = [r for r in await self._queued_records() if self._due(r.job)]
        if not stale:
            return []
        subject = events.trainer_job_queue(self._queue)
        held = {e.job_id for e in await self._bus.stored(subject, events_pb2.JobEvent)}
        requeued = []
        for listed in stale:
            job_id = listed.job.job_id
            if job_id in held:
                continue
            # Taken, cancelled or requeued since it was listed: not ours to touch now.
            current = await self._store.get(job_id)
            if (
                current.revision != listed.revision
                or current.job.state != JobState.JOB_STATE_QUEUED
            ):
                continue
            revisions = self._requeues.setdefault(job_id, set())
            if current.revision not in revisions and len(revisions) >= self._max_requeues:
                await self._give_up(current.job)
                continue
            revisions.add(current.revision)
            event_id = events.derived_event_id("requeue", job_id, current.revision)
            await self._enqueue(current.job, event_id)
            log.warning(
                "job %s was QUEUED but not on work queue %s: re-enqueued", job_id, self._queue
            )
            requeued.append(job_id)
        return requeued

    async def _give_up(self, job: trainer_pb2.Job) -> None:
        times = len(self._requeues.pop(job.job_id, set()))
        last = f" (last error: {job.error})" if job.error else ""
        message = (
            f"re-enqueued {times} times and never finished: every delivery of it was lost, "
            f"for example by a trainer killed while running it{last}"
        )

        def fail(current: trainer_pb2.Job) -> bool:
            if current.state != JobState.JOB_STATE_QUEUED:
                return False
            current.state = JobState.JOB_STATE_FAILED
            current.error = message
            return True

        await self._store.update(job.job_id, fail)
        log.error("job %s failed: %s", job.job_id, message)

    def _due(self, job: trainer_pb2.Job) -> bool:
        age = time.time() - job.updated_at.ToSeconds()
        return job_queue(job) == self._queue and age >= self._grace_s

    async def _queued_records(self) -> list[registry_pb2.JobRecord]:
        records: list[registry_pb2.JobRecord] = []
        token = ""
        while True:
            page = await self._store.list(
                "", "", _PAGE_SIZE, token, states=[JobState.JOB_STATE_QUEUED]
            )
            records.extend(page.jobs)
            token = page.next_page_token
            if not token:
                return records
