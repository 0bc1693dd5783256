"""The monitor's state from events, its decisions, feedback and alerts (a fake bus that
records what is published; the real NATS path is in the integration tests)."""

from __future__ import annotations

from typing import Any, cast

import pytest
from google.protobuf.message import Message

from ftops.common.v1 import common_pb2
from ftops.events.v1 import events_pb2
from ftops_monitor.alerts import AlertRules
from ftops_monitor.analysis import DecisionKind, ReleaseState
from ftops_monitor.monitor import Monitor
from ftops_runtime.bus import Delivery, EventBus
from ftops_runtime.errors import (
    InvalidArgument,
    NotFound,
    PermanentEventError,
    Unavailable,
)


class FakeBus:
    service = "monitor"
    instance = "t"
    ready = True

    def __init__(self) -> None:
        self.published: list[tuple[str, Message]] = []

    async def publish(self, subject: str, event: Message, **_: Any) -> None:
        self.published.append((subject, event))

    def of(self, subject: str) -> list[Any]:
        return [e for s, e in self.published if s == subject]


class Clock:
    def __init__(self, now: float = 1002.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _meta(event_id: str, at: float = 1000.0) -> common_pb2.EventMeta:
    meta = common_pb2.EventMeta(event_id=event_id)
    meta.occurred_at.FromNanoseconds(int(at * 1e9))
    return meta


def _started(
    min_requests: int = 4,
    auto: bool = True,
    strategy: int = events_pb2.RELEASE_STRATEGY_CANARY,
    release_id: str = "rel_1",
    **analysis: Any,
) -> events_pb2.RouteChanged:
    """The gateway's route.changed for a release it just started (at 1000)."""
    event = events_pb2.RouteChanged(
        meta=_meta("started"),
        alias="bot",
        revision=1,
        stable_version_id="ver_s",
        release=events_pb2.ReleaseSnapshot(
            release_id=release_id,
            state="running",
            stable_version_id="ver_s",
            candidate_version_id="ver_c",
            strategy=strategy,  # type: ignore[arg-type]
            steps=[5, 50, 100],
            candidate_weight=5,
            analysis=events_pb2.AnalysisSettings(min_requests=min_requests, auto=auto, **analysis),
            change=events_pb2.ReleaseChange(kind="started", event_id="started"),
        ),
    )
    event.release.started_at.FromNanoseconds(1000 * 10**9)
    event.release.step_started_at.FromNanoseconds(1000 * 10**9)
    return event


def _changed(
    before: events_pb2.RouteChanged, at: float, kind: str, **fields: Any
) -> events_pb2.RouteChanged:
    """The gateway's next route.changed: ``before`` with ``fields`` of the snapshot changed."""
    event = events_pb2.RouteChanged()
    event.CopyFrom(before)
    event.revision = before.revision + 1
    event.meta.event_id = f"{before.meta.event_id}+{kind}"
    for name, value in fields.items():
        setattr(event.release, name, value)
    event.release.change.kind = kind
    if kind in ("promote", "resumed"):
        event.release.step_started_at.FromNanoseconds(int(at * 1e9))
    return event


def _applied(before: events_pb2.RouteChanged, decision: Any, at: float) -> events_pb2.RouteChanged:
    """What the gateway publishes once it applied the monitor's decision at ``at``."""
    if isinstance(decision, events_pb2.ReleaseRollback):
        return _changed(before, at, "rollback", state="rolled_back", candidate_weight=0)
    state = "promoted" if decision.final else "running"
    weight = 0 if decision.final else decision.weight
    return _changed(
        before, at, "promote", state=state, step_index=decision.step_index, candidate_weight=weight
    )


_counter = iter(range(10**9))


def _results(
    version: str,
    arm: str,
    n: int,
    status: str = "OK",
    at: float = 1001.0,
    latency: float = 50.0,
    release_id: str = "rel_1",
    **extra: Any,
) -> list[Any]:
    out = []
    for i in range(n):
        r = events_pb2.RequestResult(
            request_id=f"{version}-{arm}-{next(_counter)}",
            alias="bot",
            version_id=version,
            arm=arm,
            latency_ms=latency + i % 5,
            status=status,
            release_id=release_id,
            **extra,
        )
        r.finished_at.FromNanoseconds(int(at * 1e9))
        out.append(r)
    return out


def _monitor(clock: Clock | None = None, **kwargs: Any) -> tuple[Monitor, FakeBus]:
    bus = FakeBus()
    monitor = Monitor(cast(EventBus, bus), window_s=1e9, clock=clock or Clock(), **kwargs)
    return monitor, bus


async def test_monitor_promotes_through_steps_and_finishes() -> None:
    clock = Clock(1002.0)
    monitor, bus = _monitor(clock)
    started = _started()
    monitor.apply_route_changed(started)
    monitor.ingest(_results("ver_s", "stable", 10))
    monitor.ingest(_results("ver_c", "candidate", 3))
    assert await monitor.analyze_once() == []
    monitor.ingest(_results("ver_c", "candidate", 1))
    [decision] = await monitor.analyze_once()
    assert decision.kind is DecisionKind.PROMOTE
    [event] = bus.of("release.promote")
    assert (event.step_index, event.weight, event.final) == (1, 50, False)
    assert event.figures["stable_requests"] == 10
    release = monitor.release_for("bot")
    assert release is not None
    # The monitor only decides: the release moves when the gateway says it moved, and
    # until then the step is not judged again.
    assert (release.step_index, release.weight) == (0, 5)
    monitor.ingest(_results("ver_c", "candidate", 4))
    assert await monitor.analyze_once() == []
    step1 = _applied(started, event, 1002.0)
    monitor.apply_route_changed(step1)
    assert (release.step_index, release.weight, release.candidate.requests) == (1, 50, 0)
    monitor.apply_route_changed(step1)  # redelivered: nothing changes
    assert release.step_index == 1
    # Results finished before the step began do not count for it.
    monitor.ingest(_results("ver_c", "candidate", 10, at=999.0))
    monitor.ingest(_results("ver_s", "stable", 10, at=999.0))
    assert await monitor.analyze_once() == []
    after = release.step_started_at + 0.1
    monitor.ingest(_results("ver_c", "candidate", 4, at=after))
    monitor.ingest(_results("ver_s", "stable", 4, at=after))
    [final] = await monitor.analyze_once()
    assert final.next is not None
    assert final.next.final
    monitor.apply_route_changed(_applied(step1, bus.of("release.promote")[-1], 1003.0))
    assert release.state is ReleaseState.PROMOTED
    assert monitor.analysis("bot").state == "promoted"


async def test_client_faults_and_other_releases_do_not_count() -> None:
    monitor, _ = _monitor()
    monitor.apply_route_changed(_started(min_requests=4))
    monitor.ingest(_results("ver_s", "stable", 4))
    monitor.ingest(_results("ver_c", "candidate", 10, status="INVALID_ARGUMENT"))
    monitor.ingest(_results("ver_c", "candidate", 10, status="CANCELLED"))
    monitor.ingest(_results("ver_c", "candidate", 10, release_id="rel_other"))
    assert await monitor.analyze_once() == []
    monitor.ingest(_results("ver_c", "candidate", 4))
    [decision] = await monitor.analyze_once()
    assert decision.kind is DecisionKind.PROMOTE


async def test_monitor_rolls_back_failing_candidate_with_reasons() -> None:
    monitor, bus = _monitor()
    monitor.apply_route_changed(_started(min_requests=20))
    monitor.ingest(_results("ver_s", "stable", 300))
    # The candidate's own failures (INTERNAL from its replica), not the platform's.
    monitor.ingest(_results("ver_c", "candidate", 10, status="INTERNAL"))
    [decision] = await monitor.analyze_once()
    assert decision.kind is DecisionKind.ROLLBACK
    [event] = bus.of("release.rollback")
    assert event.stable_version_id == "ver_s"
    assert event.figures["errors"] == 10
    assert "error rate above stable" in event.reason
    assert not event.manual
    assert await monitor.analyze_once() == []  # decided once, pending the gateway
    monitor.apply_route_changed(_applied(_started(min_requests=20), event, 1002.0))
    assert monitor.analysis("bot").state == "rolled_back"


async def test_blue_green_judges_shadow_results_and_switches_at_once() -> None:
    monitor, bus = _monitor()
    monitor.apply_route_changed(_started(strategy=events_pb2.RELEASE_STRATEGY_BLUE_GREEN))
    monitor.ingest(_results("ver_s", "stable", 10))
    monitor.ingest(_results("ver_c", "candidate", 10))  # not how blue-green judges
    assert await monitor.analyze_once() == []
    monitor.ingest(_results("ver_c", "shadow", 4, shadow=True, divergence=0.1))
    [decision] = await monitor.analyze_once()
    assert decision.next is not None
    assert (decision.next.weight, decision.next.final) == (100, True)
    assert "shadow results" in decision.reason
    assert bus.of("release.promote")[0].final


async def test_canary_counts_mirrored_results_as_candidate_evidence() -> None:
    monitor, bus = _monitor()
    monitor.apply_route_changed(_started(min_requests=6))
    monitor.ingest(_results("ver_s", "stable", 20))
    monitor.ingest(_results("ver_c", "candidate", 2))
    assert await monitor.analyze_once() == []
    # Mirrored evidence (stable requests also sent to the candidate) fills the step.
    monitor.ingest(_results("ver_c", "shadow", 4, shadow=True, divergence=0.2))
    [decision] = await monitor.analyze_once()
    assert decision.kind is DecisionKind.PROMOTE
    assert "over 6 requests (4 of them mirrored)" in decision.reason
    [event] = bus.of("release.promote")
    assert (event.figures["requests"], event.figures["mirrored_requests"]) == (6, 4)
    assert event.figures["divergence_mean"] == pytest.approx(0.2)


async def test_canary_rolls_back_on_failing_mirrored_results_without_user_feedback() -> None:
    monitor, bus = _monitor()
    monitor.apply_route_changed(_started(min_requests=20))
    monitor.ingest(_results("ver_s", "stable", 300))
    monitor.ingest(_results("ver_c", "candidate", 1))
    mirrored = _results("ver_c", "shadow", 9, status="INTERNAL", shadow=True)
    monitor.ingest(mirrored)
    [decision] = await monitor.analyze_once()
    assert decision.kind is DecisionKind.ROLLBACK
    [event] = bus.of("release.rollback")
    assert (event.figures["errors"], event.figures["mirrored_requests"]) == (9, 9)
    assert "candidate 9/10 errors" in event.reason
    # Nobody saw a mirrored answer: it cannot be rated.
    with pytest.raises(NotFound):
        await monitor.submit_feedback(mirrored[0].request_id, 0.1)


async def test_shadow_release_reports_and_rolls_back_on_failure() -> None:
    monitor, bus = _monitor()
    monitor.apply_route_changed(_started(strategy=events_pb2.RELEASE_STRATEGY_SHADOW))
    monitor.ingest(_results("ver_s", "stable", 200))
    monitor.ingest(_results("ver_c", "shadow", 4, shadow=True))
    assert await monitor.analyze_once() == []
    assert bus.published == []
    analysis = monitor.analysis("bot")
    assert (analysis.last_decision, analysis.verdict, analysis.strategy) == (
        "report",
        "pass",
        "shadow",
    )
    monitor.ingest(_results("ver_c", "shadow", 10, status="INTERNAL", shadow=True))
    [decision] = await monitor.analyze_once()
    assert decision.kind is DecisionKind.ROLLBACK


async def test_pause_stops_decisions_and_resume_restarts_the_step() -> None:
    clock = Clock(1002.0)
    monitor, bus = _monitor(clock)
    started = _started(step_timeout_s=5)
    paused = _changed(started, 1000.5, "paused", state="paused")
    # The gateway's snapshots may arrive in any order: the newest revision wins.
    monitor.apply_route_changed(paused)
    monitor.apply_route_changed(started)
    release = monitor.release_for("bot")
    assert release is not None
    assert release.paused
    monitor.ingest(_results("ver_s", "stable", 10))
    monitor.ingest(_results("ver_c", "candidate", 10, status="INTERNAL"))
    clock.now = 2000.0  # far past the step's time limit
    assert await monitor.analyze_once() == []
    assert release.candidate.requests == 0  # results while paused do not count
    assert monitor.analysis("bot").paused
    monitor.apply_route_changed(_changed(paused, 1999.0, "resumed", state="running"))
    assert not release.paused
    assert release.step_started_at == 1999.0
    assert await monitor.analyze_once() == []  # the step clock restarted
    monitor.ingest(_results("ver_s", "stable", 10, at=1999.5))
    monitor.ingest(_results("ver_c", "candidate", 4, at=1999.5))
    [decision] = await monitor.analyze_once()
    assert decision.kind is DecisionKind.PROMOTE
    assert len(bus.of("release.promote")) == 1


async def test_manual_release_gets_no_automatic_decision_and_follows_the_gateway() -> None:
    monitor, bus = _monitor()
    started = _started(auto=False)
    monitor.apply_route_changed(started)
    monitor.ingest(_results("ver_s", "stable", 50) + _results("ver_c", "candidate", 50))
    assert await monitor.analyze_once() == []  # manual release: no automatic decision
    assert bus.published == []
    # The gateway's manual promotion reaches the monitor as the gateway's new state.
    stepped = _changed(started, 1001.0, "promote", step_index=1, candidate_weight=50)
    stepped.release.change.manual = True
    monitor.apply_route_changed(stepped)
    analysis = monitor.analysis("bot")
    assert (analysis.step_index, analysis.weight, analysis.state) == (1, 50, "running")
    monitor.apply_route_changed(
        _changed(stepped, 1002.0, "rollback", state="rolled_back", candidate_weight=0)
    )
    assert monitor.analysis("bot").state == "rolled_back"
    # A newer release on the alias replaces the old one in the monitor's view.
    monitor.apply_route_changed(_started(release_id="rel_2"))
    assert monitor.analysis("bot").release_id == "rel_2"


async def test_feedback_maps_request_ids_and_changes_the_verdict() -> None:
    monitor, bus = _monitor()
    monitor.apply_route_changed(_started(min_requests=4, min_feedback=3))
    stable = _results("ver_s", "stable", 10)
    candidate = _results("ver_c", "candidate", 4)
    shadow = _results("ver_c", "shadow", 1, shadow=True)
    monitor.ingest(stable + candidate + shadow)
    with pytest.raises(NotFound, match="unknown"):
        await monitor.submit_feedback("nope", 0.5)
    with pytest.raises(NotFound):
        await monitor.submit_feedback(shadow[0].request_id, 0.5)  # nobody saw a shadow answer
    with pytest.raises(InvalidArgument, match=r"0\.\.1"):
        await monitor.submit_feedback(stable[0].request_id, 1.5)
    with pytest.raises(InvalidArgument, match=r"0\.\.1"):
        await monitor.submit_feedback(stable[0].request_id, float("nan"))
    with pytest.raises(InvalidArgument):
        await monitor.submit_feedback("", 0.5)
    for r in stable[:3]:
        await monitor.submit_feedback(r.request_id, 0.9)
    first = await monitor.submit_feedback(candidate[0].request_id, 0.9)
    assert (first.version_id, first.arm, first.replaced) == ("ver_c", "candidate", False)
    again = await monitor.submit_feedback(candidate[0].request_id, 0.1, "changed my mind")
    assert again.replaced
    for r in candidate[1:3]:
        await monitor.submit_feedback(r.request_id, 0.1)
    stats = monitor.version_stats("bot", "ver_c")
    assert stats.feedback_count == 3
    assert stats.feedback_mean == pytest.approx(0.1)
    [decision] = await monitor.analyze_once()
    assert decision.kind is DecisionKind.ROLLBACK
    assert "mean score 0.100" in bus.of("release.rollback")[0].reason


async def test_feedback_after_a_fallback_counts_for_the_version_that_answered() -> None:
    monitor, _ = _monitor()
    monitor.apply_route_changed(_started())
    [failed] = _results("ver_c", "candidate", 1, status="INTERNAL")
    [answered] = _results("ver_s", "stable", 1, fallback=True)
    answered.request_id = failed.request_id
    monitor.ingest([failed, answered])
    reply = await monitor.submit_feedback(failed.request_id, 0.2)
    assert (reply.version_id, reply.arm) == ("ver_s", "stable")
    release = monitor.release_for("bot")
    assert release is not None
    assert (len(release.stable.feedback), len(release.candidate.feedback)) == (1, 0)
    # The failure still counts against the candidate.
    assert (release.candidate.requests, release.candidate.errors) == (1, 1)
    # Arriving in the other order gives the same mapping.
    other, _ = _monitor()
    [failed2] = _results("ver_c", "candidate", 1, status="INTERNAL")
    [answered2] = _results("ver_s", "stable", 1, fallback=True)
    answered2.request_id = failed2.request_id
    other.ingest([answered2])
    other.ingest([failed2])
    assert (await other.submit_feedback(failed2.request_id, 1.0)).version_id == "ver_s"


async def test_feedback_forgets_old_requests() -> None:
    clock = Clock(1002.0)
    monitor, _ = _monitor(clock)
    [result] = _results("ver_s", "stable", 1)
    monitor.ingest([result])
    clock.now += 3601
    with pytest.raises(NotFound):
        await monitor.submit_feedback(result.request_id, 1.0)


async def test_feedback_is_published_and_every_replica_counts_it_once() -> None:
    a, bus = _monitor()
    b, _ = _monitor()
    for replica in (a, b):
        replica.apply_route_changed(_started(min_requests=100, min_feedback=1))
    candidate = _results("ver_c", "candidate", 2)
    stable = _results("ver_s", "stable", 1)
    a.ingest(candidate + stable)
    b.ingest(stable)  # B has not seen the candidate's results yet
    reply = await a.submit_feedback(candidate[0].request_id, 0.2, "wrong price")
    assert (reply.version_id, reply.arm, reply.replaced) == ("ver_c", "candidate", False)
    [event] = bus.of("metrics.feedback")
    assert (event.request_id, event.score, event.comment) == (
        candidate[0].request_id,
        0.2,
        "wrong price",
    )
    assert (event.alias, event.version_id, event.arm, event.release_id) == (
        "bot",
        "ver_c",
        "candidate",
        "rel_1",
    )
    # Applied on A at once (read-your-writes); its own copy from the stream is a no-op.
    assert a.version_stats("bot", "ver_c").feedback_count == 1
    assert not a.apply_feedback(event)
    # B counts it once however often it is delivered.
    assert b.apply_feedback(event)
    assert not b.apply_feedback(event)
    await b.on_feedback(event, cast(Delivery, None))
    for replica in (a, b):
        stats = replica.version_stats("bot", "ver_c")
        assert stats.feedback_count == 1
        assert stats.feedback_mean == pytest.approx(0.2)
        release = replica.release_for("bot")
        assert release is not None
        assert (len(release.candidate.feedback), len(release.stable.feedback)) == (1, 0)
    # B knows the request from the event: a score given there replaces A's.
    again = await b.submit_feedback(candidate[0].request_id, 0.1)
    assert (again.version_id, again.replaced) == ("ver_c", True)

    # A's stable score reaches B, whose verdict then uses both: the candidate's mean is
    # more than 0.1 below the stable's.
    await a.submit_feedback(stable[0].request_id, 0.9)
    b.apply_feedback(bus.of("metrics.feedback")[-1])
    [decision] = await b.analyze_once()
    assert decision.kind is DecisionKind.ROLLBACK
    assert "mean score 0.100" in decision.reason


async def test_the_latest_score_of_a_request_holds_whatever_the_order() -> None:
    clock = Clock(1002.0)
    a, bus = _monitor(clock)
    [result] = _results("ver_s", "stable", 1)
    a.ingest([result])
    await a.submit_feedback(result.request_id, 0.9)
    # Within the same tick of the clock: the second call still replaces the first.
    again = await a.submit_feedback(result.request_id, 0.1)
    assert again.replaced
    first, second = bus.of("metrics.feedback")
    assert second.meta.occurred_at.ToNanoseconds() > first.meta.occurred_at.ToNanoseconds()
    in_order, _ = _monitor(Clock(1003.0))
    assert in_order.apply_feedback(first)
    assert in_order.apply_feedback(second)
    assert not in_order.apply_feedback(first)  # redelivered late: changes nothing
    reverse, _ = _monitor(Clock(1003.0))
    assert reverse.apply_feedback(second)
    assert not reverse.apply_feedback(first)  # older than the score the request holds
    for replica in (a, in_order, reverse):
        stats = replica.version_stats("bot", "ver_s")
        assert stats.feedback_count == 1
        assert stats.feedback_mean == pytest.approx(0.1)


async def test_a_replaced_score_is_judged_again() -> None:
    monitor, _ = _monitor()
    monitor.apply_route_changed(_started(min_requests=100, min_feedback=1))
    stable = _results("ver_s", "stable", 1)
    candidate = _results("ver_c", "candidate", 1)
    monitor.ingest(stable + candidate)
    await monitor.submit_feedback(stable[0].request_id, 0.9)
    await monitor.submit_feedback(candidate[0].request_id, 0.9)
    assert await monitor.analyze_once() == []  # waits for samples
    # As many scores as before, a lower mean: not "nothing new".
    await monitor.submit_feedback(candidate[0].request_id, 0.1)
    [decision] = await monitor.analyze_once()
    assert decision.kind is DecisionKind.ROLLBACK


async def test_feedback_without_nats_is_refused_and_kept_nowhere() -> None:
    bus = FlakyBus(failures=1)
    monitor = Monitor(cast(EventBus, bus), window_s=1e9, clock=Clock())
    [result] = _results("ver_s", "stable", 1)
    monitor.ingest([result])
    with pytest.raises(Unavailable, match="NATS did not store it"):
        await monitor.submit_feedback(result.request_id, 0.5)
    bus.ready = False
    with pytest.raises(Unavailable, match="NATS is unreachable"):
        await monitor.submit_feedback(result.request_id, 0.5)
    assert monitor.version_stats("bot", "ver_s").feedback_count == 0
    assert monitor.requests.held(result.request_id) is None
    assert bus.of("metrics.feedback") == []
    bus.ready = True
    reply = await monitor.submit_feedback(result.request_id, 0.5)
    assert not reply.replaced
    assert monitor.version_stats("bot", "ver_s").feedback_count == 1


async def test_a_malformed_feedback_event_is_dead_lettered() -> None:
    monitor, _ = _monitor()
    for bad in (
        events_pb2.FeedbackSubmitted(meta=_meta("no-id"), score=0.5, alias="bot"),
        events_pb2.FeedbackSubmitted(meta=_meta("too-high"), request_id="r", score=1.5),
    ):
        with pytest.raises(PermanentEventError):
            await monitor.on_feedback(bad, cast(Delivery, None))
    assert monitor.stats.keys() == []


async def test_evaluation_lookup_refusal_rolls_back_and_unreachable_is_skipped() -> None:
    refused = common_pb2.Evaluation(
        gate_passed=False, reasons=["retention 0.2 < 0.95"], metrics={"retention": 0.2}
    )
    lookups: list[str] = []

    async def lookup(version_id: str) -> common_pb2.Evaluation | None:
        lookups.append(version_id)
        return refused if version_id == "ver_c" else None

    monitor, _ = _monitor(evaluations=lookup)
    monitor.apply_route_changed(_started())
    assert await monitor.analyze_once() == []  # starts the lookup in the background
    await monitor.settled()
    [decision] = await monitor.analyze_once()
    assert decision.kind is DecisionKind.ROLLBACK
    assert "retention 0.2 < 0.95" in decision.reason
    assert decision.figures["eval_retention"] == 0.2
    assert lookups == ["ver_c", "ver_s"]

    async def unreachable(version_id: str) -> common_pb2.Evaluation | None:
        return None

    healthy, _ = _monitor(evaluations=unreachable)
    healthy.apply_route_changed(_started())
    await healthy.analyze_once()
    await healthy.settled()
    healthy.ingest(_results("ver_s", "stable", 10) + _results("ver_c", "candidate", 4))
    [decision] = await healthy.analyze_once()
    assert decision.kind is DecisionKind.PROMOTE

    async def passed(version_id: str) -> common_pb2.Evaluation | None:
        # A job that turned its gate off passes with what it would have refused, reported:
        # the release does not re-apply a gate the operator chose to ship without.
        return common_pb2.Evaluation(
            gate_passed=True, reasons=["retention 0.50 < 0.95"], metrics={"retention": 0.97}
        )

    evaluated, _ = _monitor(evaluations=passed)
    evaluated.apply_route_changed(_started())
    await evaluated.analyze_once()
    await evaluated.settled()
    evaluated.ingest(_results("ver_s", "stable", 10) + _results("ver_c", "candidate", 4))
    [decision] = await evaluated.analyze_once()
    assert decision.kind is DecisionKind.PROMOTE
    assert "eval_retention" not in decision.figures  # shown, not repeated in every event
    shown = evaluated.analysis("bot").figures
    assert (shown["eval_retention"], shown["stable_eval_retention"]) == (0.97, 0.97)


async def test_alert_fires_once_and_resolves_once() -> None:
    clock = Clock(1000.0)
    bus = FakeBus()
    monitor = Monitor(
        cast(EventBus, bus),
        window_s=10,
        clock=clock,
        alert_rules=AlertRules(error_rate_above=0.2, for_s=3, min_requests=5),
    )
    monitor.ingest(_results("ver_s", "stable", 5, at=1000.0))
    monitor.ingest(_results("ver_s", "stable", 5, status="INTERNAL", at=1000.0))
    await monitor.analyze_once()
    clock.now = 1002.0
    await monitor.analyze_once()
    assert bus.of("monitor.alert") == []  # not yet held for 3 s
    clock.now = 1003.5
    await monitor.analyze_once()
    await monitor.analyze_once()
    [firing] = bus.of("monitor.alert")
    assert (firing.rule, firing.state, firing.version_id) == ("error_rate", "firing", "ver_s")
    assert firing.value == pytest.approx(0.5)
    assert firing.for_seconds >= 3
    assert [a.rule for a in monitor.list_alerts("bot").alerts] == ["error_rate"]
    assert monitor.list_alerts("other").alerts == []
    monitor.ingest(_results("ver_s", "stable", 40, at=1004.0))  # 10 errors of 50: 20%
    clock.now = 1005.0
    await monitor.analyze_once()
    await monitor.analyze_once()
    _, resolved = bus.of("monitor.alert")
    assert resolved.state == "resolved"
    assert monitor.list_alerts("").alerts == []


def test_stats_queries() -> None:
    monitor, _ = _monitor()
    monitor.ingest(_results("ver_s", "stable", 3) + _results("ver_s", "stable", 1, status="X"))
    stats = monitor.version_stats("bot", "ver_s")
    assert (stats.requests, stats.errors, stats.ok_requests) == (4, 1, 3)
    assert [s.version_id for s in monitor.list_stats("bot").stats] == ["ver_s"]
    assert monitor.analysis("bot").state == "none"
    with pytest.raises(NotFound, match="ghost"):
        monitor.version_stats("ghost", "ver_s")
    with pytest.raises(NotFound, match="ghost"):
        monitor.analysis("ghost")
    with pytest.raises(InvalidArgument):
        monitor.version_stats("bot", "")


def test_analysis_shows_checks_of_the_running_step() -> None:
    monitor, _ = _monitor()
    monitor.apply_route_changed(_started(min_requests=4))
    monitor.ingest(_results("ver_s", "stable", 10) + _results("ver_c", "candidate", 2))
    analysis = monitor.analysis("bot")
    checks = {c.name: c.status for c in analysis.checks}
    assert checks["samples"] == "pending"
    assert checks["errors"] == "pass"
    assert analysis.verdict == "inconclusive"
    assert analysis.figures["requests"] == 2
    assert (analysis.stable_version_id, analysis.candidate_version_id) == ("ver_s", "ver_c")


class FlakyBus(FakeBus):
    """Refuses the first ``failures`` publishes, as JetStream does while NATS is down."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def publish(self, subject: str, event: Message, **_: Any) -> None:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("nats: connection closed")
        await super().publish(subject, event)


async def test_decision_waits_for_nats_and_nothing_is_lost() -> None:
    bus = FlakyBus(failures=2)
    monitor = Monitor(cast(EventBus, bus), window_s=1e9, clock=Clock())
    monitor.apply_route_changed(_started(min_requests=4))
    monitor.ingest(_results("ver_s", "stable", 10) + _results("ver_c", "candidate", 4))
    assert await monitor.analyze_once() == []  # logged; the decision waits
    release = monitor.release_for("bot")
    assert release is not None
    assert not release.pending_decision  # nothing was stored, nothing is pending
    assert await monitor.analyze_once() == []  # the second failure
    # NATS back: the same decision is taken on the next tick, without new results.
    [decision] = await monitor.analyze_once()
    assert decision.kind is DecisionKind.PROMOTE
    assert release.pending_decision
    assert len(bus.of("release.promote")) == 1


async def test_automatic_step_the_gateway_ignored_while_paused_is_taken_again() -> None:
    # The monitor decides at 1002; the gateway had paused at 1001.5 and ignores automatic
    # steps while paused. The monitor's view never moved; after the resume the step starts
    # over and the promotion decided then is a new event, not a duplicate of the first.
    clock = Clock(1002.0)
    monitor, bus = _monitor(clock)
    started = _started(min_requests=4)
    monitor.apply_route_changed(started)
    monitor.ingest(_results("ver_s", "stable", 10) + _results("ver_c", "candidate", 4))
    [decision] = await monitor.analyze_once()
    assert decision.kind is DecisionKind.PROMOTE
    release = monitor.release_for("bot")
    assert release is not None
    paused = _changed(started, 1001.5, "paused", state="paused")
    monitor.apply_route_changed(paused)
    assert (release.step_index, release.weight, release.paused) == (0, 5, True)
    assert release.state is ReleaseState.RUNNING
    monitor.apply_route_changed(_changed(paused, 1003.0, "resumed", state="running"))
    clock.now = 1004.0
    monitor.ingest(
        _results("ver_s", "stable", 10, at=1003.5) + _results("ver_c", "candidate", 4, at=1003.5)
    )
    [again] = await monitor.analyze_once()
    assert again.kind is DecisionKind.PROMOTE
    first, second = bus.of("release.promote")
    assert first.meta.event_id != second.meta.event_id


# -- failures that are not the candidate's (issue 13) ---------------------------------


def _held(monitor: Monitor) -> list[str]:
    """The checks holding the release's step now (GetReleaseAnalysis)."""
    analysis = monitor.analysis("bot")
    return [c.name for c in analysis.checks if c.detail.startswith("release held")]


async def test_a_burst_refused_on_both_arms_holds_the_canary_and_alerts() -> None:
    # 40 concurrent requests on an idle alias: both arms' replicas refuse most of them
    # (RESOURCE_EXHAUSTED from a gateway before failure_origin, or named "capacity").
    clock = Clock(1002.0)
    monitor, bus = _monitor(clock, alert_rules=AlertRules(release_held_for_s=2.0))
    monitor.apply_route_changed(_started(max_error_rate=0.05, step_timeout_s=30))
    monitor.ingest(
        _results("ver_s", "stable", 20, status="RESOURCE_EXHAUSTED")
        + _results("ver_s", "stable", 4)
        + _results("ver_c", "candidate", 6, status="RESOURCE_EXHAUSTED")
        + _results("ver_c", "candidate", 4, status="UNAVAILABLE", failure_origin="capacity")
        + _results("ver_c", "candidate", 6)
    )
    assert await monitor.analyze_once() == []
    assert bus.of("release.rollback") == []
    analysis = monitor.analysis("bot")
    assert analysis.verdict == "inconclusive"
    checks = {c.name: c for c in analysis.checks}
    assert checks["infrastructure"].status == "pending"
    assert "not the candidate's" in checks["infrastructure"].detail
    assert (analysis.figures["errors"], analysis.figures["infra_errors"]) == (0, 10)
    assert analysis.figures["stable_infra_errors"] == 20
    assert monitor.results_total[("bot", "ver_c", "candidate", "capacity")] == 10
    # Held long enough: the alert fires, once.
    clock.now = 1004.5
    await monitor.analyze_once()
    await monitor.analyze_once()
    [alert] = bus.of("monitor.alert")
    assert (alert.rule, alert.state, alert.version_id) == (
        "release_held_infrastructure",
        "firing",
        "ver_c",
    )
    assert alert.threshold == pytest.approx(0.05)
    assert "infrastructure failures above 5%" in alert.message
    assert [a.rule for a in monitor.list_alerts("bot").alerts] == ["release_held_infrastructure"]
    # Past the step's time limit: still held, never rolled back.
    clock.now = 1040.0
    await monitor.analyze_once()
    assert bus.of("release.rollback") == []
    assert _held(monitor) == ["infrastructure"]


async def test_the_hold_alert_resolves_when_the_refusals_are_diluted() -> None:
    clock = Clock(1002.0)
    monitor, bus = _monitor(clock, alert_rules=AlertRules(release_held_for_s=0.0))
    monitor.apply_route_changed(_started(min_requests=20, max_error_rate=0.05))
    monitor.ingest(
        _results("ver_s", "stable", 10, status="RESOURCE_EXHAUSTED")
        + _results("ver_s", "stable", 10)
    )
    await monitor.analyze_once()
    [firing] = bus.of("monitor.alert")
    assert firing.state == "firing"
    # The burst is over: plenty of answered requests, 10 refusals are under 5% now.
    monitor.ingest(_results("ver_s", "stable", 300) + _results("ver_c", "candidate", 20))
    [decision] = await monitor.analyze_once()
    assert decision.kind is DecisionKind.PROMOTE
    _, resolved = bus.of("monitor.alert")
    assert (resolved.rule, resolved.state) == ("release_held_infrastructure", "resolved")
    assert monitor.list_alerts("bot").alerts == []


async def test_a_failure_both_arms_share_over_the_cap_holds_and_alerts() -> None:
    monitor, bus = _monitor(alert_rules=AlertRules(release_held_for_s=0.0))
    monitor.apply_route_changed(_started(min_requests=20, max_error_rate=0.05))
    # The rollback: "candidate 10/16 errors (62.5%), cap 5.0%", stable alike.
    monitor.ingest(
        _results("ver_s", "stable", 40, status="INTERNAL")
        + _results("ver_s", "stable", 24)
        + _results("ver_c", "candidate", 10, status="INTERNAL")
        + _results("ver_c", "candidate", 6)
    )
    assert await monitor.analyze_once() == []
    assert bus.of("release.rollback") == []
    [alert] = bus.of("monitor.alert")
    assert (alert.rule, alert.state) == ("release_held_error_cap", "firing")
    assert "both arms failing over the cap" in alert.message
    assert alert.value == pytest.approx(40 / 64)
    assert _held(monitor) == ["error_cap"]


async def test_capacity_refusals_of_the_candidates_mirrors_are_ignored() -> None:
    monitor, bus = _monitor()
    monitor.apply_route_changed(
        _started(strategy=events_pb2.RELEASE_STRATEGY_BLUE_GREEN, max_error_rate=0.05)
    )
    monitor.ingest(_results("ver_s", "stable", 20))
    monitor.ingest(_results("ver_c", "shadow", 12, status="RESOURCE_EXHAUSTED", shadow=True))
    monitor.ingest(_results("ver_c", "shadow", 4, shadow=True))
    [decision] = await monitor.analyze_once()
    assert decision.kind is DecisionKind.PROMOTE
    [event] = bus.of("release.promote")
    assert (event.figures["errors"], event.figures["mirror_refused"]) == (0, 12)


async def test_a_thirty_percent_failing_candidate_is_rolled_back_during_a_burst() -> None:
    monitor, bus = _monitor()
    monitor.apply_route_changed(_started(min_requests=20, max_error_rate=0.05))
    monitor.ingest(
        _results("ver_s", "stable", 60)
        + _results("ver_s", "stable", 30, status="RESOURCE_EXHAUSTED")
        + _results("ver_c", "candidate", 8, status="RESOURCE_EXHAUSTED")
        + _results("ver_c", "candidate", 14)
        # Its own failures, whatever the status says.
        + _results("ver_c", "candidate", 6, status="UNAVAILABLE", failure_origin="replica")
    )
    [decision] = await monitor.analyze_once()
    assert decision.kind is DecisionKind.ROLLBACK
    [event] = bus.of("release.rollback")
    assert (event.figures["errors"], event.figures["requests"]) == (6, 20)
    assert event.figures["infra_errors"] == 8
    assert "candidate 6/20 errors" in event.reason


async def test_a_two_times_slower_candidate_is_rolled_back_on_latency_during_a_burst() -> None:
    monitor, bus = _monitor()
    monitor.apply_route_changed(_started(min_requests=20, max_error_rate=0.05))
    monitor.ingest(
        _results("ver_s", "stable", 60, latency=100.0)
        + _results("ver_s", "stable", 30, status="RESOURCE_EXHAUSTED", latency=1.0)
        + _results("ver_c", "candidate", 8, latency=200.0)
        + _results("ver_c", "candidate", 8, status="RESOURCE_EXHAUSTED", latency=1.0)
    )
    [decision] = await monitor.analyze_once()
    assert decision.kind is DecisionKind.ROLLBACK
    [event] = bus.of("release.rollback")
    assert "latency worse" in event.reason
    assert "error rate" not in event.reason


async def test_deadlines_only_on_the_candidates_arm_roll_it_back() -> None:
    monitor, bus = _monitor()
    monitor.apply_route_changed(_started(min_requests=20))
    monitor.ingest(
        _results("ver_s", "stable", 200)
        + _results("ver_c", "candidate", 14)
        + _results("ver_c", "candidate", 6, status="DEADLINE_EXCEEDED", latency=5000.0)
    )
    [decision] = await monitor.analyze_once()
    assert decision.kind is DecisionKind.ROLLBACK
    [event] = bus.of("release.rollback")
    assert "deadline exceeded more than stable" in event.reason
    assert (event.figures["deadlines"], event.figures["stable_deadlines"]) == (6, 0)
    # Alike on both arms (overload) they are not the candidate's.
    shared, shared_bus = _monitor()
    shared.apply_route_changed(_started(min_requests=20))
    shared.ingest(
        _results("ver_s", "stable", 160)
        + _results("ver_s", "stable", 40, status="DEADLINE_EXCEEDED", latency=5000.0)
        + _results("ver_c", "candidate", 16)
        + _results("ver_c", "candidate", 4, status="DEADLINE_EXCEEDED", latency=5000.0)
    )
    assert await shared.analyze_once() == []
    assert shared_bus.of("release.rollback") == []
    assert _held(shared) == ["infrastructure"]


async def test_old_releases_are_forgotten_but_each_alias_keeps_its_latest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("ftops_monitor.monitor.KEEP_ENDED_RELEASES", 2)
    monitor, _ = _monitor()
    for i in range(5):
        started = _started(release_id=f"rel_{i}")
        started.release.started_at.FromSeconds(1000 + i)
        monitor.apply_route_changed(started)
    other = _started(release_id="rel_other")
    other.alias = "other-bot"
    other.release.started_at.FromSeconds(900)  # the oldest, but its alias's latest
    monitor.apply_route_changed(other)
    assert sorted(monitor.releases) == ["rel_2", "rel_3", "rel_4", "rel_other"]
    assert monitor.analysis("bot").release_id == "rel_4"
