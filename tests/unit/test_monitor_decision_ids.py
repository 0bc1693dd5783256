"""Decision and alert event ids derived from what the event says: replicas that take the
same decision publish the same id (JetStream stores it once), different decisions never
share one."""

from __future__ import annotations

from typing import Any, cast

from google.protobuf.message import Message

from ftops.common.v1 import common_pb2
from ftops.events.v1 import events_pb2
from ftops_monitor.alerts import FIRING, RESOLVED, AlertBook, AlertRules
from ftops_monitor.analysis import DecisionKind
from ftops_monitor.monitor import Monitor
from ftops_monitor.windows import Figures
from ftops_runtime.bus import EventBus
from ftops_runtime.events import derived_event_id


class FakeBus:
    service = "monitor"
    ready = True

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.published: list[tuple[str, Message]] = []

    async def publish(self, subject: str, event: Message, **_: Any) -> None:
        self.published.append((subject, event))

    def ids(self, subject: str) -> list[str]:
        return [e.meta.event_id for s, e in self.published if s == subject]  # type: ignore[attr-defined]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _meta(event_id: str, at: float) -> common_pb2.EventMeta:
    meta = common_pb2.EventMeta(event_id=event_id)
    meta.occurred_at.FromNanoseconds(int(at * 1e9))
    return meta


def _started(release_id: str = "rel_1", **analysis: Any) -> events_pb2.RouteChanged:
    """The gateway's route.changed for a release it started at 1000."""
    event = events_pb2.RouteChanged(
        meta=_meta(f"started-{release_id}", 1000.0),
        alias="bot",
        revision=1,
        release=events_pb2.ReleaseSnapshot(
            release_id=release_id,
            state="running",
            stable_version_id="ver_s",
            candidate_version_id="ver_c",
            steps=[5, 50, 100],
            candidate_weight=5,
            analysis=events_pb2.AnalysisSettings(min_requests=4, auto=True, **analysis),
            change=events_pb2.ReleaseChange(kind="started", event_id=f"started-{release_id}"),
        ),
    )
    event.release.started_at.FromNanoseconds(1000 * 10**9)
    event.release.step_started_at.FromNanoseconds(1000 * 10**9)
    return event


def _next(
    before: events_pb2.RouteChanged, at: float, kind: str, **fields: Any
) -> events_pb2.RouteChanged:
    """The gateway's next state: a new revision, the step begun at ``at`` when it moved."""
    event = events_pb2.RouteChanged()
    event.CopyFrom(before)
    event.revision += 1
    for name, value in fields.items():
        setattr(event.release, name, value)
    event.release.change.kind = kind
    if kind in ("promote", "resumed"):
        event.release.step_started_at.FromNanoseconds(int(at * 1e9))
    return event


def _results(
    version: str, arm: str, n: int, *, at: float, status: str = "OK", release_id: str = "rel_1"
) -> list[Any]:
    out = []
    for i in range(n):
        r = events_pb2.RequestResult(
            request_id=f"{version}-{arm}-{at}-{i}",
            alias="bot",
            version_id=version,
            arm=arm,
            latency_ms=50.0 + i % 5,
            status=status,
            release_id=release_id,
        )
        r.finished_at.FromNanoseconds(int(at * 1e9))
        out.append(r)
    return out


def _monitor(name: str, now: float, **kwargs: Any) -> tuple[Monitor, FakeBus, Clock]:
    bus, clock = FakeBus(name), Clock(now)
    return Monitor(cast(EventBus, bus), window_s=1e9, clock=clock, **kwargs), bus, clock


def _healthy_step(monitor: Monitor, at: float, release_id: str = "rel_1") -> None:
    monitor.ingest(
        _results("ver_s", "stable", 10, at=at, release_id=release_id)
        + _results("ver_c", "candidate", 4, at=at, release_id=release_id)
    )


async def test_replicas_deciding_a_promotion_publish_one_id() -> None:
    # Two replicas on their own clocks, the same events and results.
    a, bus_a, _ = _monitor("a", 1002.0)
    b, bus_b, _ = _monitor("b", 1002.3)
    for m in (a, b):
        m.apply_route_changed(_started())
        _healthy_step(m, 1001.0)
        [decision] = await m.analyze_once()
        assert decision.kind is DecisionKind.PROMOTE
    [first] = bus_a.ids("release.promote")
    assert bus_b.ids("release.promote") == [first]
    # The gateway applied it at 1002.1; the next step is another decision.
    step1 = _next(_started(), 1002.1, "promote", step_index=1, candidate_weight=50)
    for m in (a, b):
        m.apply_route_changed(step1)
        _healthy_step(m, 1002.5)
        [decision] = await m.analyze_once()
        assert decision.next is not None
        assert decision.next.final
    _, second = bus_a.ids("release.promote")
    assert bus_b.ids("release.promote")[1] == second
    assert second != first
    # The same step of another release too.
    c, bus_c, _ = _monitor("c", 1002.0)
    c.apply_route_changed(_started("rel_2"))
    _healthy_step(c, 1001.0, "rel_2")
    [decision] = await c.analyze_once()
    assert decision.next is not None
    assert decision.next.step_index == 1
    [other] = bus_c.ids("release.promote")
    assert other != first


async def test_rollback_has_one_id_per_release() -> None:
    a, bus_a, _ = _monitor("a", 1002.0)
    b, bus_b, _ = _monitor("b", 1002.4)
    failing = _results("ver_s", "stable", 10, at=1001.0) + _results(
        "ver_c", "candidate", 10, at=1001.0, status="INTERNAL"
    )
    for m in (a, b):
        m.apply_route_changed(_started(max_error_rate=0.1))
        m.ingest(failing)
        [decision] = await m.analyze_once()
        assert decision.kind is DecisionKind.ROLLBACK
    assert bus_a.ids("release.rollback") == bus_b.ids("release.rollback")
    assert len(bus_a.ids("release.rollback")) == 1
    # Ids have the envelope's format (hex, like new_meta's).
    [event_id] = bus_a.ids("release.rollback")
    assert len(event_id) == 32
    assert int(event_id, 16) >= 0


async def test_a_step_the_gateway_ignored_while_paused_is_taken_again_under_a_new_id() -> None:
    # The gateway paused (1001.5) before the monitor's step (1002) and ignored it; after
    # the resume the same step is a new decision (the gateway remembers the ignored id:
    # reusing it would lose the step).
    monitor, bus, clock = _monitor("a", 1002.0)
    started = _started()
    monitor.apply_route_changed(started)
    _healthy_step(monitor, 1001.0)
    await monitor.analyze_once()
    paused = _next(started, 1001.5, "paused", state="paused")
    monitor.apply_route_changed(paused)
    release = monitor.release_for("bot")
    assert release is not None
    assert release.step_index == 0
    monitor.apply_route_changed(_next(paused, 1003.0, "resumed", state="running"))
    clock.now = 1004.0
    _healthy_step(monitor, 1003.5)
    [decision] = await monitor.analyze_once()
    assert decision.next is not None
    assert decision.next.step_index == 1
    first, again = bus.ids("release.promote")
    assert first != again


async def test_replicas_firing_an_alert_ticks_apart_publish_one_id() -> None:
    rules = AlertRules(error_rate_above=0.2, for_s=3, min_requests=5)
    ids: list[list[str]] = []
    for offset in (0.0, 0.2):  # the replicas tick at their own moments
        monitor, bus, clock = _monitor("r", 1000.0 + offset, alert_rules=rules)
        monitor.ingest(_results("ver_s", "stable", 5, at=1000.0))
        monitor.ingest(_results("ver_s", "stable", 5, status="INTERNAL", at=1000.0))
        await monitor.analyze_once()
        clock.now = 1003.5 + offset
        await monitor.analyze_once()
        monitor.ingest(_results("ver_s", "stable", 100, at=1004.0))
        clock.now = 1005.0 + offset
        await monitor.analyze_once()
        ids.append(bus.ids("monitor.alert"))
    firing, resolved = ids[0]
    assert ids[1] == [firing, resolved]
    assert firing != resolved


def test_alert_episodes_and_versions_get_their_own_ids() -> None:
    book = AlertBook(AlertRules(error_rate_above=0.2, for_s=3, min_requests=5))
    bad = Figures(requests=10, errors=5, error_rate=0.5)
    good = Figures(requests=10, errors=0, error_rate=0.0)
    ids = []
    # Two episodes, each held long enough to fire: the second begins after the first
    # resolved, so more than for_s after the first began.
    for since in (1000.0, 1004.0):
        book.evaluate({("bot", "ver_s"): bad}, since)
        [fired] = book.evaluate({("bot", "ver_s"): bad}, since + 3)
        [ended] = book.evaluate({("bot", "ver_s"): good}, since + 3.5)
        assert (fired.state, ended.state) == (FIRING, RESOLVED)
        ids += [book.event_id(fired), book.event_id(ended)]
    assert len(set(ids)) == 4
    other = AlertBook(book.config)
    other.evaluate({("bot", "ver_c"): bad}, 1000.0)
    [fired] = other.evaluate({("bot", "ver_c"): bad}, 1003.0)
    assert other.event_id(fired) not in ids


def test_derived_ids_do_not_confuse_their_parts() -> None:
    assert derived_event_id("a/b", "c") != derived_event_id("a", "b/c")
    assert derived_event_id("x", 1) == derived_event_id("x", 1)
