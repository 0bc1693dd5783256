"""Release history from events: idempotent on event id, tolerant of any arrival order."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from ftops.common.v1 import common_pb2
from ftops.events.v1 import events_pb2
from ftops.registry.v1 import registry_pb2
from ftops_registry.artifacts import FileSpec
from ftops_registry.audit import AuditLog
from ftops_registry.db import Database
from ftops_registry.registry import Registry, RejectedVersionError
from ftops_registry.releases import ReleaseHistory
from ftops_runtime import events
from ftops_runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermanentEventError,
)


@pytest.fixture
def history(tmp_path: Path) -> Iterator[ReleaseHistory]:
    db = Database(f"sqlite:///{tmp_path}/registry.db")
    db.migrate()
    yield ReleaseHistory(db)
    db.close()


def meta(seconds: int) -> common_pb2.EventMeta:
    """An envelope for an event that happened ``seconds`` after a fixed epoch."""
    m = events.new_meta("test", "t1")
    m.occurred_at.CopyFrom(Timestamp(seconds=1_700_000_000 + seconds))
    return m


def started(
    release: str, t: int = 0, stable: str = "ver_a", candidate: str = "ver_b"
) -> events_pb2.ReleaseStarted:
    return events_pb2.ReleaseStarted(
        meta=meta(t),
        release_id=release,
        alias="support-bot",
        stable_version_id=stable,
        candidate_version_id=candidate,
        strategy=events_pb2.RELEASE_STRATEGY_CANARY,
        steps=[10, 50, 100],
        current_weight=10,
    )


def promote(
    release: str, weight: int, t: int, final: bool = False, candidate: str = "ver_b"
) -> events_pb2.ReleasePromote:
    return events_pb2.ReleasePromote(
        meta=meta(t),
        release_id=release,
        alias="support-bot",
        candidate_version_id=candidate,
        stable_version_id="ver_a",
        weight=weight,
        final=final,
        reason="healthy",
        figures={"error_rate": 0.0},
    )


def rollback(release: str, t: int) -> events_pb2.ReleaseRollback:
    return events_pb2.ReleaseRollback(
        meta=meta(t), release_id=release, alias="support-bot", reason="errors", manual=True
    )


def test_full_release_and_duplicate_events(history: ReleaseHistory) -> None:
    start = started("rel-1")
    assert history.apply_started(start)
    assert not history.apply_started(start)  # same event again: nothing new
    step = promote("rel-1", 50, 10)
    assert history.apply_promote(step)
    assert not history.apply_promote(step)
    assert history.apply_promote(promote("rel-1", 100, 20, final=True))
    release = history.get("rel-1")
    assert release.state == "promoted"
    assert release.current_weight == 100
    assert release.strategy == "canary"
    assert list(release.steps) == [10, 50, 100]
    assert [d.kind for d in release.history] == ["started", "promote", "promote"]
    assert release.history[1].weight == 50
    assert dict(release.history[1].figures) == {"error_rate": 0.0}


def test_decision_before_started_creates_the_release(history: ReleaseHistory) -> None:
    history.apply_promote(promote("rel-2", 50, 10))
    early = history.get("rel-2")
    assert early.state == "running"
    assert early.current_weight == 50
    history.apply_started(started("rel-2", 0))
    release = history.get("rel-2")
    assert release.current_weight == 50  # the older started event does not undo the step
    assert release.strategy == "canary"
    assert list(release.steps) == [10, 50, 100]
    assert [d.kind for d in release.history] == ["started", "promote"]


def test_rollback_is_terminal_and_late_promotes_do_not_revive(history: ReleaseHistory) -> None:
    history.apply_started(started("rel-3"))
    history.apply_rollback(rollback("rel-3", 30))
    history.apply_promote(promote("rel-3", 50, 10))  # older, delivered late
    release = history.get("rel-3")
    assert release.state == "rolled_back"
    assert release.current_weight == 0
    assert release.history[-1].kind == "rollback"
    assert release.history[-1].manual
    assert len(release.history) == 3


def test_rollback_after_full_promotion_undoes_the_release(history: ReleaseHistory) -> None:
    history.apply_started(started("rel-4"))
    history.apply_promote(promote("rel-4", 100, 10, final=True))
    history.apply_rollback(rollback("rel-4", 20))
    release = history.get("rel-4")
    assert release.state == "rolled_back"
    assert release.current_weight == 0
    assert [d.kind for d in release.history] == ["started", "promote", "rollback"]


def test_list_and_errors(history: ReleaseHistory) -> None:
    for i in range(3):
        history.apply_started(started(f"rel-list-{i}", i))
    page = history.list("support-bot", 2)
    assert [r.release_id for r in page.releases] == ["rel-list-2", "rel-list-1"]
    rest = history.list("support-bot", 2, page.next_page_token)
    assert [r.release_id for r in rest.releases] == ["rel-list-0"]
    assert not rest.next_page_token
    assert history.list("other").releases == []
    with pytest.raises(NotFound, match="ghost"):
        history.get("ghost")
    with pytest.raises(InvalidArgument):
        history.get("")
    with pytest.raises(PermanentEventError):
        history.apply_started(events_pb2.ReleaseStarted(release_id="x"))


def test_releases_never_put_traffic_on_a_rejected_version(history: ReleaseHistory) -> None:
    registry = Registry(history.db)
    registry.register_base_model("tiny", "a" * 64, "/models/tiny")
    artifact = registry.record_artifact([FileSpec("adapter.safetensors", "1" * 64, 3)])
    base = registry_pb2.RegisterVersionRequest(
        adapter="support-bot", base_model="tiny", artifact_id=artifact.artifact_id
    )
    good = registry.register_version(base)
    base.rejected = True
    base.evaluation.reasons.append("new_loss 2.0 > parent 1.0")
    bad = registry.register_version(base)

    # Refused: permanent for the event consumer (dead-lettered, no retries) and
    # FAILED_PRECONDITION for anything that maps errors to gRPC.
    with pytest.raises(RejectedVersionError, match=r"rejected .*new_loss 2\.0") as err:
        history.apply_started(started("rel-bad", 0, good.version_id, bad.version_id))
    assert isinstance(err.value, PermanentEventError)
    assert isinstance(err.value, FailedPrecondition)
    assert "candidate version of release rel-bad" in str(err.value)
    with pytest.raises(FailedPrecondition):
        history.apply_promote(promote("rel-bad", 50, 10, candidate=bad.version_id))
    with pytest.raises(FailedPrecondition, match="stable version"):
        history.apply_started(started("rel-bad-2", 0, bad.version_id, good.version_id))
    with pytest.raises(NotFound):
        history.get("rel-bad")
    # Taking traffic away from it is always recorded.
    back = rollback("rel-bad", 20)
    back.candidate_version_id = bad.version_id
    assert history.apply_rollback(back)
    assert history.get("rel-bad").state == "rolled_back"
    # Ready versions (and ids this registry does not know) are recorded as before.
    assert history.apply_started(started("rel-ok", 0, "ver_a", good.version_id))
    # Each decision, refused ones too, is audited with the event's producer as actor.
    entries = AuditLog(history.db).list(resource_prefix="release:rel-bad").entries
    assert [(e.resource, e.method, e.outcome) for e in reversed(entries)] == [
        ("release:rel-bad", "release.started", "FAILED_PRECONDITION"),
        ("release:rel-bad", "release.promote", "FAILED_PRECONDITION"),
        ("release:rel-bad-2", "release.started", "FAILED_PRECONDITION"),
        ("release:rel-bad", "release.rollback", "ok"),
    ]
    assert {e.actor for e in entries} == {"test/t1"}


def changed(
    release: str,
    revision: int,
    state: str,
    kind: str,
    t: int,
    weight: int = 10,
    *,
    reason: str = "",
    final: bool = False,
) -> events_pb2.RouteChanged:
    """The gateway's route.changed after it applied ``kind`` at ``t``."""
    event = events_pb2.RouteChanged(
        meta=meta(t),
        alias="support-bot",
        revision=revision,
        release=events_pb2.ReleaseSnapshot(
            release_id=release,
            state=state,
            strategy=events_pb2.RELEASE_STRATEGY_CANARY,
            stable_version_id="ver_a",
            candidate_version_id="ver_b",
            candidate_weight=weight,
            steps=[10, 50, 100],
            change=events_pb2.ReleaseChange(
                kind=kind,
                event_id=f"{release}-{kind}-{revision}",
                weight=weight,
                reason=reason,
                final=final,
            ),
        ),
    )
    event.release.change.occurred_at.CopyFrom(Timestamp(seconds=1_700_000_000 + t))
    event.release.started_at.CopyFrom(Timestamp(seconds=1_700_000_000))
    return event


def test_history_from_route_changed_records_what_the_gateway_applied(
    history: ReleaseHistory,
) -> None:
    assert history.apply_route_changed(changed("rel-rc", 1, "running", "started", 0))
    assert history.apply_route_changed(changed("rel-rc", 2, "paused", "paused", 5, reason="look"))
    assert history.get("rel-rc").state == "paused"  # the route's and the release's agree
    assert history.apply_route_changed(changed("rel-rc", 3, "running", "resumed", 9))
    step = changed("rel-rc", 4, "running", "promote", 12, weight=50, reason="healthy")
    assert history.apply_route_changed(step)
    assert not history.apply_route_changed(step)  # redelivered: recorded once
    # A change that touched no release (a retirement, a plain SetRoute) records nothing.
    retired = changed("rel-rc", 5, "running", "promote", 12, weight=50)
    retired.release.change.event_id = step.release.change.event_id
    assert not history.apply_route_changed(retired)
    assert not history.apply_route_changed(events_pb2.RouteChanged(alias="x", revision=1))
    record = history.get("rel-rc")
    assert [d.kind for d in record.history] == ["started", "paused", "resumed", "promote"]
    assert (record.state, record.current_weight) == ("running", 50)
    assert history.apply_route_changed(
        changed("rel-rc", 6, "promoted", "promote", 20, weight=100, final=True)
    )
    assert (history.get("rel-rc").state, history.get("rel-rc").current_weight) == ("promoted", 100)
