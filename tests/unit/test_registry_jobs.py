"""Job records on a real SQLite file: compare-and-set writes, filters, newest-first pages
and the size guard."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from ftops.events.v1 import events_pb2
from ftops.trainer.v1 import trainer_pb2
from ftops_registry.db import Database
from ftops_registry.jobs import MAX_JOB_BYTES, Aborted, JobRecords
from ftops_runtime.errors import AlreadyExists, InvalidArgument, NotFound

QUEUED, RUNNING, SUCCEEDED, REJECTED = (
    events_pb2.JOB_STATE_QUEUED,
    events_pb2.JOB_STATE_RUNNING,
    events_pb2.JOB_STATE_SUCCEEDED,
    events_pb2.JOB_STATE_REJECTED,
)


@pytest.fixture
def jobs(tmp_path: Path) -> Iterator[JobRecords]:
    db = Database(f"sqlite:///{tmp_path}/registry.db")
    db.migrate()
    yield JobRecords(db)
    db.close()


def job(
    job_id: str,
    adapter: str = "support-bot",
    team: str = "support",
    state: events_pb2.JobState.ValueType = QUEUED,
    created: int | None = None,
) -> trainer_pb2.Job:
    return trainer_pb2.Job(
        job_id=job_id,
        spec=trainer_pb2.JobSpec(adapter=adapter, team=team, base_model="tiny"),
        state=state,
        created_at=Timestamp(seconds=1_700_000_000 + created) if created is not None else None,
    )


def test_create_get_and_compare_and_set(jobs: JobRecords) -> None:
    created = jobs.put(job("job-1"), 0)
    assert created.revision == 1
    assert created.job.HasField("created_at")
    assert created.job.HasField("updated_at")
    assert jobs.get("job-1") == created
    with pytest.raises(AlreadyExists, match="job-1"):
        jobs.put(job("job-1"), 0)

    running = trainer_pb2.Job()
    running.CopyFrom(created.job)
    running.state = RUNNING
    running.step = 3
    running.ClearField("created_at")  # a writer that drops it keeps the stored one
    updated = jobs.put(running, 1)
    assert updated.revision == 2
    assert updated.job.step == 3
    assert updated.job.created_at == created.job.created_at
    assert jobs.get("job-1") == updated

    # A writer that read revision 1 lost the race: told which revision is current.
    with pytest.raises(Aborted, match="revision 2, not 1") as err:
        jobs.put(running, 1)
    assert err.value.code.name == "ABORTED"
    with pytest.raises(Aborted, match="revision 2, not 7"):
        jobs.put(running, 7)
    assert jobs.get("job-1").revision == 2
    with pytest.raises(NotFound, match="job-2"):
        jobs.put(job("job-2"), 4)
    with pytest.raises(NotFound, match="ghost"):
        jobs.get("ghost")
    with pytest.raises(InvalidArgument):
        jobs.get("")


def test_concurrent_writers_of_one_revision_one_wins(jobs: JobRecords) -> None:
    jobs.put(job("job-race"), 0)
    wins: list[int] = []
    losses: list[BaseException] = []

    def write(step: int) -> None:
        update = job("job-race", state=RUNNING)
        update.step = step
        try:
            wins.append(jobs.put(update, 1).job.step)
        except BaseException as exc:
            losses.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert len(losses) == 7
    assert all(isinstance(e, Aborted) for e in losses)
    record = jobs.get("job-race")
    assert (record.revision, record.job.step) == (2, wins[0])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda j: j.ClearField("job_id"), "job_id is required"),
        (lambda j: j.spec.ClearField("adapter"), "spec.adapter is required"),
        (lambda j: setattr(j.spec, "team", "t" * 129), "longer than 128"),
        (lambda j: setattr(j, "job_id", "j" * 129), "longer than 128"),
    ],
)
def test_invalid_jobs_are_refused(jobs: JobRecords, mutate: object, message: str) -> None:
    bad = job("job-bad")
    mutate(bad)  # type: ignore[operator]
    with pytest.raises(InvalidArgument, match=message):
        jobs.put(bad, 0)


def test_oversized_records_are_refused(jobs: JobRecords) -> None:
    big = job("job-big")
    big.spec.dataset_jsonl = b'{"text": "x"}\n' * (MAX_JOB_BYTES // 14 + 1)
    with pytest.raises(InvalidArgument, match=r"dataset_jsonl.*as artifacts"):
        jobs.put(big, 0)
    with pytest.raises(NotFound):
        jobs.get("job-big")
    big.spec.dataset_jsonl = b'{"text": "x"}\n' * 1000  # small inline data is fine
    assert jobs.put(big, 0).job.spec.dataset_jsonl == big.spec.dataset_jsonl


def test_list_is_newest_first_filtered_and_paged(jobs: JobRecords) -> None:
    for i in range(7):
        jobs.put(job(f"job-{i}", created=i * 10, state=SUCCEEDED if i % 2 else QUEUED), 0)
    jobs.put(job("job-other", adapter="other-bot", team="other", created=35), 0)
    # Same created_at as job-6: the id breaks the tie, so no page repeats or skips it.
    jobs.put(job("job-6b", created=60, state=REJECTED), 0)

    def all_ids(size: int = 2, **filters: object) -> list[str]:
        ids: list[str] = []
        token = ""
        while True:
            page = jobs.list(size=size, token=token, **filters)  # type: ignore[arg-type]
            assert len(page.jobs) <= size
            ids += [r.job.job_id for r in page.jobs]
            token = page.next_page_token
            if not token:
                return ids

    assert all_ids() == [
        "job-6b",
        "job-6",
        "job-5",
        "job-4",
        "job-other",
        "job-3",
        "job-2",
        "job-1",
        "job-0",
    ]
    assert all_ids(size=1) == all_ids(size=500)  # the tie straddles a page boundary
    assert all_ids(adapter="other-bot") == ["job-other"]
    assert all_ids(team="support", states=[SUCCEEDED, REJECTED]) == [
        "job-6b",
        "job-5",
        "job-3",
        "job-1",
    ]
    assert all_ids(adapter="ghost") == []
    assert [r.revision for r in jobs.list(states=[REJECTED]).jobs] == [1]

    # Jobs created while a client pages do not shift the pages it has yet to read.
    first = jobs.list(size=3)
    jobs.put(job("job-new", created=100), 0)
    rest = jobs.list(size=50, token=first.next_page_token)
    assert [r.job.job_id for r in rest.jobs] == [
        "job-4",
        "job-other",
        "job-3",
        "job-2",
        "job-1",
        "job-0",
    ]
    with pytest.raises(InvalidArgument, match="page_token"):
        jobs.list(token="garbage")
