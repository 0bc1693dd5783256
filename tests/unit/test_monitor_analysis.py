"""Monitor decisions (pure rule) and release state kept from events (fake bus)."""

from __future__ import annotations

from typing import Any, cast

import pytest
from google.protobuf.message import Message

from ftops.common.v1 import common_pb2
from ftops.events.v1 import events_pb2
from ftops_monitor.analysis import (
    DecisionKind,
    Release,
    ReleaseState,
    Thresholds,
    decide,
    next_step,
)
from ftops_monitor.monitor import Monitor
from ftops_monitor.windows import Figures, Sample, figures
from ftops_runtime.bus import EventBus
from ftops_runtime.errors import FailedPrecondition, NotFound


def _release(step_index: int = 0, **limits: Any) -> Release:
    release = Release(
        release_id="rel_1",
        alias="bot",
        stable_version_id="ver_s",
        candidate_version_id="ver_c",
        steps=[5, 25, 50, 100],
        thresholds=Thresholds(**limits),
        started_at=0.0,
    )
    release.step_index = step_index
    release.weight = release.steps[step_index]
    return release


def _figs(n: int, errors: int = 0, latency: float = 100.0) -> Figures:
    return figures(
        [Sample(at=1, latency_ms=latency, ok=i >= errors) for i in range(n)],
    )


STABLE = _figs(50, latency=100.0)


def test_waits_below_min_requests() -> None:
    decision = decide(_release(), _figs(19), STABLE)
    assert decision.kind is DecisionKind.WAIT


def test_promotes_healthy_candidate_step_by_step() -> None:
    decision = decide(_release(), _figs(20, latency=120.0), STABLE)
    assert decision.kind is DecisionKind.PROMOTE
    assert decision.next is not None
    assert (decision.next.step_index, decision.next.weight, decision.next.final) == (1, 25, False)
    assert decision.figures["requests"] == 20
    assert decision.figures["p95_ms"] == pytest.approx(120.0)
    assert decision.figures["stable_p95_ms"] == pytest.approx(100.0)
    last = decide(_release(step_index=2), _figs(20), STABLE)
    assert last.next is not None
    assert (last.next.step_index, last.next.weight, last.next.final) == (3, 100, True)


def test_final_when_next_is_last_step_even_below_100() -> None:
    release = _release()
    release.steps = [10, 40]
    step = next_step(release)
    assert (step.step_index, step.weight, step.final) == (1, 40, True)


def test_rolls_back_on_error_rate() -> None:
    decision = decide(_release(), _figs(40, errors=3), STABLE)  # 7.5% > 5%
    assert decision.kind is DecisionKind.ROLLBACK
    assert decision.figures["error_rate"] == pytest.approx(0.075)
    ok = decide(_release(), _figs(40, errors=2), STABLE)  # 5% is not above 5%
    assert ok.kind is DecisionKind.PROMOTE


def test_early_rollback_when_errors_already_exceed_budget() -> None:
    # Budget 0.05 * 20 = 1 error; 2 errors after 5 results cannot pass any more.
    assert decide(_release(), _figs(5, errors=2), STABLE).kind is DecisionKind.ROLLBACK
    assert decide(_release(), _figs(4, errors=4), STABLE).kind is DecisionKind.WAIT
    assert decide(_release(), _figs(10, errors=1), STABLE).kind is DecisionKind.WAIT


def test_latency_ratio() -> None:
    slow = _figs(20, latency=350.0)
    assert decide(_release(), slow, STABLE).kind is DecisionKind.ROLLBACK
    # Ratio 0 disables; no stable data disables.
    assert decide(_release(max_latency_ratio=0), slow, STABLE).kind is DecisionKind.PROMOTE
    assert decide(_release(), slow, None).kind is DecisionKind.PROMOTE
    assert decide(_release(), slow, Figures()).kind is DecisionKind.PROMOTE


# -- Monitor state from events -----------------------------------------------------------


class FakeBus:
    service = "monitor"
    instance = "t"
    ready = True

    def __init__(self) -> None:
        self.published: list[tuple[str, Message]] = []

    async def publish(self, subject: str, event: Message, **_: Any) -> None:
        self.published.append((subject, event))


def _meta(event_id: str, at: float = 1000.0) -> common_pb2.EventMeta:
    meta = common_pb2.EventMeta(event_id=event_id)
    meta.occurred_at.FromNanoseconds(int(at * 1e9))
    return meta


def _started(min_requests: int = 4, auto: bool = True) -> events_pb2.ReleaseStarted:
    return events_pb2.ReleaseStarted(
        meta=_meta("started"),
        release_id="rel_1",
        alias="bot",
        stable_version_id="ver_s",
        candidate_version_id="ver_c",
        steps=[5, 50, 100],
        current_weight=5,
        analysis=events_pb2.AnalysisSettings(
            min_requests=min_requests, max_error_rate=0.05, max_latency_ratio=3.0, auto=auto
        ),
    )


def _results(version: str, arm: str, n: int, status: str = "OK", at: float = 1001.0) -> list[Any]:
    out = []
    for i in range(n):
        r = events_pb2.RequestResult(
            request_id=f"{version}-{i}",
            alias="bot",
            version_id=version,
            arm=arm,
            latency_ms=50.0,
            status=status,
            release_id="rel_1",
        )
        r.finished_at.FromNanoseconds(int(at * 1e9))
        out.append(r)
    return out


def _monitor() -> tuple[Monitor, FakeBus]:
    bus = FakeBus()
    return Monitor(cast(EventBus, bus), window_s=1e9, clock=lambda: 1002.0), bus


async def test_monitor_promotes_through_steps_and_finishes() -> None:
    monitor, bus = _monitor()
    monitor.apply_started(_started())
    monitor.ingest(_results("ver_s", "stable", 10))
    monitor.ingest(_results("ver_c", "candidate", 3))
    assert await monitor.analyze_once() == []
    monitor.ingest(_results("ver_c", "candidate", 1))
    [decision] = await monitor.analyze_once()
    assert decision.kind is DecisionKind.PROMOTE
    subject, event = bus.published[-1]
    assert subject == "release.promote"
    assert isinstance(event, events_pb2.ReleasePromote)
    assert (event.step_index, event.weight, event.final) == (1, 50, False)
    release = monitor.release_for("bot")
    assert release is not None
    assert (release.step_index, release.weight, release.step_samples) == (1, 50, [])
    # Our own event coming back from NATS changes nothing.
    monitor.apply_promote(event)
    assert release.step_index == 1
    # Results finished before the step began do not count for it.
    monitor.ingest(_results("ver_c", "candidate", 10, at=999.0))
    assert await monitor.analyze_once() == []
    monitor.ingest(_results("ver_c", "candidate", 4, at=release.step_started_at + 0.1))
    [final] = await monitor.analyze_once()
    assert final.next is not None
    assert final.next.final
    assert release.state is ReleaseState.PROMOTED
    assert monitor.analysis("bot").state == "promoted"


async def test_client_faults_do_not_count_against_a_version() -> None:
    monitor, _ = _monitor()
    monitor.apply_started(_started(min_requests=4))
    monitor.ingest(_results("ver_c", "candidate", 10, status="INVALID_ARGUMENT"))
    monitor.ingest(_results("ver_c", "candidate", 10, status="CANCELLED"))
    assert await monitor.analyze_once() == []
    monitor.ingest(_results("ver_c", "candidate", 4))
    [decision] = await monitor.analyze_once()
    assert decision.kind is DecisionKind.PROMOTE


async def test_monitor_rolls_back_failing_candidate() -> None:
    monitor, bus = _monitor()
    monitor.apply_started(_started(min_requests=20))
    monitor.ingest(_results("ver_c", "candidate", 5, status="UNAVAILABLE"))
    [decision] = await monitor.analyze_once()
    assert decision.kind is DecisionKind.ROLLBACK
    _, event = bus.published[-1]
    assert isinstance(event, events_pb2.ReleaseRollback)
    assert event.stable_version_id == "ver_s"
    assert event.figures["errors"] == 5
    assert monitor.analysis("bot").state == "rolled_back"
    with pytest.raises(FailedPrecondition):
        await monitor.rollback("bot", "again")


async def test_decision_before_started_is_parked_and_order_tolerated() -> None:
    monitor, _ = _monitor()
    promote = events_pb2.ReleasePromote(
        meta=_meta("p1"), release_id="rel_1", alias="bot", step_index=1, weight=50
    )
    monitor.apply_promote(promote)
    assert monitor.release_for("bot") is None
    monitor.apply_started(_started())
    monitor.apply_started(_started())  # redelivered: idempotent
    release = monitor.release_for("bot")
    assert release is not None
    assert (release.step_index, release.weight) == (1, 50)
    # A stale earlier step arriving late does not go backwards.
    monitor.apply_promote(
        events_pb2.ReleasePromote(
            meta=_meta("p0"), release_id="rel_1", alias="bot", step_index=0, weight=5
        )
    )
    assert release.step_index == 1


async def test_manual_decisions_and_rollback_after_promotion() -> None:
    monitor, bus = _monitor()
    with pytest.raises(NotFound, match="bot"):
        await monitor.promote("bot", "")
    monitor.apply_started(_started(auto=False))
    monitor.ingest(_results("ver_c", "candidate", 50))
    assert await monitor.analyze_once() == []  # manual release: no automatic decision
    analysis = await monitor.promote("bot", "looks good")
    assert (analysis.step_index, analysis.weight, analysis.state) == (1, 50, "running")
    analysis = await monitor.promote("bot", "ship it")
    assert analysis.state == "promoted"
    _, final = bus.published[-1]
    assert isinstance(final, events_pb2.ReleasePromote)
    assert final.final
    assert final.manual
    analysis = await monitor.rollback("bot", "users complain")
    assert analysis.state == "rolled_back"
    _, back = bus.published[-1]
    assert isinstance(back, events_pb2.ReleaseRollback)
    # Back to the version that was stable before the promotion.
    assert (back.stable_version_id, back.candidate_version_id) == ("ver_s", "ver_c")
    assert back.manual


def test_stats_queries() -> None:
    monitor, _ = _monitor()
    monitor.ingest(_results("ver_s", "stable", 3) + _results("ver_s", "stable", 1, status="X"))
    stats = monitor.version_stats("bot", "ver_s")
    assert (stats.requests, stats.errors) == (4, 1)
    assert [s.version_id for s in monitor.list_stats("bot").stats] == ["ver_s"]
    assert monitor.analysis("bot").state == "none"
    with pytest.raises(NotFound, match="ghost"):
        monitor.version_stats("ghost", "ver_s")
    with pytest.raises(NotFound, match="ghost"):
        monitor.analysis("ghost")
