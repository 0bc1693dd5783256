"""NATS subjects, their payload types, the JetStream streams that hold them, and the
event envelope every payload carries."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from ftops.common.v1 import common_pb2
from ftops.events.v1 import events_pb2
from ftops_runtime.telemetry import current_trace_context

ADAPTER_READY = "adapter.ready"
ADAPTER_LOADED = "adapter.loaded"
ADAPTER_LOAD_FAILED = "adapter.load_failed"
ADAPTER_REJECTED = "adapter.rejected"
ADAPTER_RETIRED = "adapter.retired"
RELEASE_STARTED = "release.started"
RELEASE_PROMOTE = "release.promote"
RELEASE_ROLLBACK = "release.rollback"
RELEASE_PAUSED = "release.paused"
RELEASE_RESUMED = "release.resumed"
MONITOR_ALERT = "monitor.alert"
ROUTE_CHANGED = "route.changed"
METRICS_REQUESTS = "metrics.requests"
# Users' scores of answers: taken by one monitor replica, applied by every one.
METRICS_FEEDBACK = "metrics.feedback"
TRAINER_JOB = "trainer.job"
# Submitted training jobs wait on ``work.trainer.<queue>`` for a replica of that queue's
# pool (a work queue: each job is taken once).
TRAINER_JOB_QUEUE_PREFIX = "work.trainer"
# A key was revoked: every replica of every service forgets its cached answer for it.
AUTH_KEY_CHANGED = "auth.key_changed"
# Refused calls of every service, aggregated; the registry writes them to its audit log.
AUDIT_DENIED = "audit.denied"


def trainer_job_queue(queue: str) -> str:
    return f"{TRAINER_JOB_QUEUE_PREFIX}.{queue}"


DEAD_LETTER_PREFIX = "deadletter"

# Replica announcements: one subject per replica; the stream keeps the last of each, so a
# consumer with DeliverPolicy.LAST_PER_SUBJECT learns every live replica at once.
REPLICA_PREFIX = "inference.replica"
REPLICA_ANNOUNCEMENTS = f"{REPLICA_PREFIX}.>"


def replica_subject(replica_id: str) -> str:
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in replica_id)
    return f"{REPLICA_PREFIX}.{safe}"


PAYLOAD_TYPES: dict[str, type[Message]] = {
    ADAPTER_READY: events_pb2.AdapterReady,
    ADAPTER_LOADED: events_pb2.AdapterLoaded,
    ADAPTER_LOAD_FAILED: events_pb2.AdapterLoadFailed,
    ADAPTER_REJECTED: events_pb2.AdapterRejected,
    ADAPTER_RETIRED: events_pb2.AdapterRetired,
    RELEASE_STARTED: events_pb2.ReleaseStarted,
    RELEASE_PROMOTE: events_pb2.ReleasePromote,
    RELEASE_ROLLBACK: events_pb2.ReleaseRollback,
    RELEASE_PAUSED: events_pb2.ReleasePaused,
    RELEASE_RESUMED: events_pb2.ReleaseResumed,
    MONITOR_ALERT: events_pb2.Alert,
    REPLICA_ANNOUNCEMENTS: events_pb2.ReplicaAnnounce,
    ROUTE_CHANGED: events_pb2.RouteChanged,
    METRICS_REQUESTS: events_pb2.RequestResultBatch,
    METRICS_FEEDBACK: events_pb2.FeedbackSubmitted,
    TRAINER_JOB: events_pb2.JobEvent,
    AUTH_KEY_CHANGED: events_pb2.ApiKeyChanged,
    AUDIT_DENIED: events_pb2.AccessDeniedBatch,
}


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    # Seconds to keep messages; 0 keeps them until limits (the history is the audit trail).
    max_age_s: float = 0
    # Work-queue retention: a message is removed once a consumer acks it.
    work_queue: bool = False
    # Keep only the newest N messages of each subject (0 = no per-subject limit).
    max_msgs_per_subject: int = 0


# Thirty days bounds the two history streams (a soak grew them with every version and
# release, and every monitor start replays route.changed from the first): what reads them
# from the start needs far less. A monitor rebuilds a release from its newest
# route.changed, so a release left running or paused longer than this without any change
# is not rebuilt by a monitor started after that (resume, promote or roll it back by hand);
# a gateway learns loaded versions from the replicas' announcements as well.
HISTORY_MAX_AGE_S = 30 * 24 * 3600

STREAMS: tuple[StreamSpec, ...] = (
    StreamSpec("FTOPS_ADAPTER", ("adapter.>",), max_age_s=HISTORY_MAX_AGE_S),
    StreamSpec("FTOPS_RELEASE", ("release.>", "route.>"), max_age_s=HISTORY_MAX_AGE_S),
    # Request metrics and feedback are only useful for minutes (the monitor forgets
    # requests after an hour, FTOPS_FEEDBACK_MAX_AGE_S); an hour bounds the stream's size.
    StreamSpec("FTOPS_METRICS", ("metrics.>",), max_age_s=3600),
    StreamSpec("FTOPS_TRAINER", ("trainer.>",), max_age_s=7 * 24 * 3600),
    StreamSpec("FTOPS_WORK", ("work.>",), work_queue=True),
    # The last announcement of each replica; a replica silent for 5 minutes is forgotten.
    StreamSpec("FTOPS_REPLICA", (REPLICA_ANNOUNCEMENTS,), max_age_s=300, max_msgs_per_subject=1),
    StreamSpec("FTOPS_MONITOR", ("monitor.>",), max_age_s=7 * 24 * 3600),
    # Revocations matter for seconds; denials until the registry has written them.
    StreamSpec("FTOPS_AUTH", ("auth.>", "audit.>"), max_age_s=7 * 24 * 3600),
    StreamSpec("FTOPS_DEADLETTER", (f"{DEAD_LETTER_PREFIX}.>",), max_age_s=30 * 24 * 3600),
)


# Namespace of the event ids derived from what an event says (uuid5).
_DERIVED_IDS = uuid.UUID("e81725f7-6495-42e3-b600-d94a0cc14f4d")


def derived_event_id(*parts: object) -> str:
    """An event id that every replica computes alike from the same parts, for an event
    several replicas may publish: the bus sends the id as ``Nats-Msg-Id``, so JetStream
    keeps one copy (``new_meta`` ids are random: one per publish)."""
    key = json.dumps([str(p) for p in parts])  # unambiguous whatever the parts contain
    return uuid.uuid5(_DERIVED_IDS, key).hex


def new_meta(service: str, instance: str) -> common_pb2.EventMeta:
    """A fresh envelope: unique id, now, producer, and the caller's trace context."""
    now = Timestamp()
    now.GetCurrentTime()
    return common_pb2.EventMeta(
        event_id=uuid.uuid4().hex,
        occurred_at=now,
        producer_service=service,
        producer_instance=instance,
        trace=current_trace_context(),
    )
