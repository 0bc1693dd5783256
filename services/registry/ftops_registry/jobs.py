"""Training job records, written by the trainer replicas so that any replica answers for
any job and a job outlives the replica that ran it.

The registry stores the trainer's ``Job`` message as serialized bytes (it is the trainer's
record, not the registry's) and copies the fields it filters and orders by into columns.
Writers use optimistic concurrency: every write names the revision it read and fails
ABORTED when another writer got there first, so two replicas never silently overwrite
each other's progress.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Collection
from datetime import UTC, datetime, timedelta

import grpc
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from ftops.events.v1 import events_pb2
from ftops.registry.v1 import registry_pb2
from ftops.trainer.v1 import trainer_pb2
from ftops_registry import audit, convert
from ftops_registry.db import Database
from ftops_registry.models import JobRow, utcnow
from ftops_registry.registry import page_size
from ftops_runtime.errors import AlreadyExists, FtopsError, InvalidArgument, NotFound

log = logging.getLogger(__name__)

# A job record is metadata; datasets travel as artifacts. Far above any real record, far
# below what would bloat rows and every ListJobs page.
MAX_JOB_BYTES = 1024 * 1024
# The width of the job_id / adapter / team columns.
MAX_FIELD_LEN = 128
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Aborted(FtopsError):
    """A compare-and-set lost against a concurrent writer: re-read and retry."""

    code = grpc.StatusCode.ABORTED


def state_name(state: int) -> str:
    try:
        return events_pb2.JobState.Name(state).removeprefix("JOB_STATE_")  # type: ignore[arg-type]
    except ValueError:
        return str(state)


def _micros(dt: datetime) -> int:
    delta = convert.as_utc(dt) - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def encode_job_token(created_at: datetime, job_id: str) -> str:
    raw = f"j1:{_micros(created_at)}:{job_id}"
    return base64.urlsafe_b64encode(raw.encode()).decode()


def decode_job_token(token: str) -> tuple[datetime, str] | None:
    """Keyset position (created_at, job_id) of the last job of the previous page."""
    if not token:
        return None
    try:
        kind, micros, job_id = base64.urlsafe_b64decode(token.encode()).decode().split(":", 2)
        if kind != "j1" or not job_id:
            raise ValueError(kind)
        return EPOCH + timedelta(microseconds=int(micros)), job_id
    except (ValueError, OverflowError):
        raise InvalidArgument(f"page_token {token!r} is not one this server issued") from None


def _check_field(name: str, value: str, *, required: bool) -> None:
    if required and not value:
        raise InvalidArgument(f"{name} is required")
    if len(value) > MAX_FIELD_LEN:
        raise InvalidArgument(f"{name} {value[:40]!r}... is longer than {MAX_FIELD_LEN} chars")


def validate_job(job: trainer_pb2.Job) -> None:
    _check_field("job.job_id", job.job_id, required=True)
    _check_field(f"job {job.job_id}: spec.adapter", job.spec.adapter, required=True)
    _check_field(f"job {job.job_id}: spec.team", job.spec.team, required=False)
    size = job.ByteSize()
    if size > MAX_JOB_BYTES:
        raise InvalidArgument(
            f"job {job.job_id}: the record is {size} bytes, more than the {MAX_JOB_BYTES} "
            "a job record may take. Inline data does not belong in it: store the dataset "
            "(spec.dataset_jsonl) and retention set (spec.gate.retention_jsonl) as "
            "artifacts and strip them from the job before PutJob"
        )


class JobRecords:
    def __init__(self, db: Database) -> None:
        self.db = db

    def put(self, job: trainer_pb2.Job, expected_revision: int) -> registry_pb2.JobRecord:
        """Create (``expected_revision`` 0) or replace a job record (compare-and-set)."""
        validate_job(job)
        job_id = job.job_id

        def work(s: Session) -> registry_pb2.JobRecord:
            stored = trainer_pb2.Job()
            stored.CopyFrom(job)
            now = utcnow()
            if expected_revision == 0:
                if s.get(JobRow, job_id) is not None:
                    raise AlreadyExists(
                        f"job {job_id} already has a record; update it with the revision "
                        "you read (GetJob)"
                    )
                _fill_timestamps(stored, created=now, now=now)
                row = JobRow(job_id=job_id, revision=1)
                _copy_into(row, stored, now)
                s.add(row)
                # A concurrent creator makes this flush fail; Database.write retries and
                # the retry answers ALREADY_EXISTS.
                s.flush()
                log.info("job %s (%s) recorded: %s", job_id, row.adapter, state_name(row.state))
                audit.record(
                    s, "PutJob", f"job:{job_id}", team=row.team, detail=state_name(row.state)
                )
                return registry_pb2.JobRecord(job=stored, revision=row.revision)

            # Locked (Postgres; SQLite writers are serialized already) so the compare and
            # the bump are one step.
            existing = s.get(JobRow, job_id, with_for_update=True)
            if existing is None:
                raise NotFound(
                    f"job {job_id} has no record to update (expected_revision "
                    f"{expected_revision}); create it with expected_revision 0"
                )
            if existing.revision != expected_revision:
                raise Aborted(
                    f"job {job_id} is at revision {existing.revision}, not "
                    f"{expected_revision}: another writer updated it; re-read and retry"
                )
            _fill_timestamps(stored, created=existing.created_at, now=now)
            previous_state = existing.state
            _copy_into(existing, stored, now)
            existing.revision += 1
            s.flush()
            if existing.state != previous_state:
                log.info(
                    "job %s (%s): %s -> %s (revision %d)",
                    job_id,
                    existing.adapter,
                    state_name(previous_state),
                    state_name(existing.state),
                    existing.revision,
                )
            audit.record(
                s,
                "PutJob",
                f"job:{job_id}",
                team=existing.team,
                detail=f"{state_name(existing.state)} (revision {existing.revision})",
            )
            return registry_pb2.JobRecord(job=stored, revision=existing.revision)

        return self.db.write(work)

    def get(self, job_id: str) -> registry_pb2.JobRecord:
        if not job_id:
            raise InvalidArgument("job_id is required")
        with self.db.read() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise NotFound(f"job {job_id!r} has no record")
            return convert.job_record(row)

    def list(
        self,
        adapter: str = "",
        team: str = "",
        states: list[int] | None = None,
        size: int = 0,
        token: str = "",
        teams: Collection[str] | None = None,
    ) -> registry_pb2.ListJobRecordsResponse:
        """Newest first (job.created_at, then job_id), keyset-paginated so jobs created
        while a client pages neither repeat nor shift entries. ``teams``: only jobs of
        these teams (None: any)."""
        after = decode_job_token(token)
        limit = page_size(size)
        query = select(JobRow)
        if adapter:
            query = query.where(JobRow.adapter == adapter)
        if team:
            query = query.where(JobRow.team == team)
        if teams is not None:
            query = query.where(JobRow.team.in_(list(teams)))
        if states:
            query = query.where(JobRow.state.in_(states))
        if after is not None:
            created, job_id = after
            query = query.where(
                or_(
                    JobRow.created_at < created,
                    and_(JobRow.created_at == created, JobRow.job_id < job_id),
                )
            )
        query = query.order_by(JobRow.created_at.desc(), JobRow.job_id.desc()).limit(limit + 1)
        with self.db.read() as s:
            rows = s.scalars(query).all()
            page = rows[:limit]
            return registry_pb2.ListJobRecordsResponse(
                jobs=[convert.job_record(r) for r in page],
                next_page_token=(
                    encode_job_token(page[-1].created_at, page[-1].job_id)
                    if len(rows) > limit
                    else ""
                ),
            )


def _fill_timestamps(job: trainer_pb2.Job, *, created: datetime, now: datetime) -> None:
    """A record always has both times: the list order and its page tokens rely on them."""
    if not job.HasField("created_at"):
        job.created_at.CopyFrom(convert.timestamp(created))
    if not job.HasField("updated_at"):
        job.updated_at.CopyFrom(convert.timestamp(now))


def _copy_into(row: JobRow, job: trainer_pb2.Job, now: datetime) -> None:
    row.adapter = job.spec.adapter
    row.team = job.spec.team
    row.state = int(job.state)
    # Truncated to microseconds, as both databases keep it; page tokens carry that value.
    row.created_at = convert.from_timestamp(job.created_at)
    row.updated_at = now
    row.job = job.SerializeToString(deterministic=True)
