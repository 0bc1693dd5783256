"""What the dashboard shows, without servers: readable series names (alias:vN, grouped
by alias), the releases list (ten most recent, several per alias), and the increments a
polling page is sent."""

from __future__ import annotations

import asyncio

from ftops.events.v1 import events_pb2
from ftops_monitor.dashboard import FINISHED_SHOWN, Dashboard
from ftops_monitor.dashboard_names import (
    BASE_LABEL,
    UNNAMED_GROUP,
    VersionName,
    VersionNames,
    series_name,
)
from ftops_monitor.dashboard_page import render_page
from ftops_monitor.monitor import Monitor
from ftops_runtime.bus import EventBus
from ftops_runtime.events import RELEASE_PROMOTE, derived_event_id, new_meta


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _monitor(clock: Clock) -> Monitor:
    # Never started: nothing is published.
    return Monitor(EventBus("nats://127.0.0.1:1", service="test", instance="t"), clock=clock)


def _route(
    alias: str, release_id: str, revision: int, at: float, state: str = "running"
) -> events_pb2.RouteChanged:
    meta = new_meta("gateway", "test")
    meta.event_id = derived_event_id("route.changed", alias, revision)
    release = events_pb2.ReleaseSnapshot(
        release_id=release_id,
        state=state,
        stable_version_id=f"ver_{alias}_1",
        candidate_version_id=f"ver_{alias}_{revision + 1}",
        candidate_weight=10 if state == "running" else 0,
        steps=[10, 50, 100],
    )
    release.started_at.FromNanoseconds(int(at * 1e9))
    release.step_started_at.FromNanoseconds(int(at * 1e9))
    return events_pb2.RouteChanged(meta=meta, alias=alias, revision=revision, release=release)


def test_series_are_named_alias_vn_and_grouped_by_alias() -> None:
    three = VersionName("support-bot", 3)
    assert series_name("support", "ver_a1", three) == ("support", "support:v3")
    # Straight to a version id: under its adapter's name, with the alias of that name.
    assert series_name("", "ver_a1", three) == ("support-bot", "support-bot:v3 direct")
    assert series_name("", "", None) == (BASE_LABEL, BASE_LABEL)
    # Not named by the registry (yet): the id, never an untitled group.
    assert series_name("support", "ver_a1", None) == ("support", "support:ver_a1")
    assert series_name("", "ver_a1", None) == (UNNAMED_GROUP, "ver_a1")


async def test_names_come_from_the_registry_once_and_back_off_while_it_is_away() -> None:
    clock = Clock()
    asked: list[str] = []
    registry_up = False

    async def lookup(version_id: str) -> VersionName | None:
        asked.append(version_id)
        if not registry_up:
            raise ConnectionError("UNAVAILABLE: connection refused")
        return VersionName("bot", int(version_id.removeprefix("ver_"))) if version_id else None

    names = VersionNames(lookup, clock=clock)

    async def round_of(version_ids: list[str]) -> None:
        names.learn(version_ids)
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    await round_of(["ver_1", "ver_2"])
    assert asked == ["ver_1"]  # the first failure pauses the round
    await round_of(["ver_1", "ver_2"])
    assert asked == ["ver_1"]  # ...and the next ones, for a while
    assert names.name("bot", "ver_1").label == "bot:ver_1"
    registry_up = True
    clock.now += 31
    await round_of(["ver_1", "ver_2", ""])
    assert names.name("bot", "ver_2").label == "bot:v2"
    await round_of(["ver_1", "ver_2"])
    assert asked == ["ver_1", "ver_1", "ver_2"]  # remembered: asked once each
    await names.close()


def test_releases_list_the_ten_most_recent_not_one_per_alias() -> None:
    clock = Clock()
    monitor = _monitor(clock)
    # Three releases of one alias, each rolled back, and twelve of others.
    for n in range(3):
        release_id = f"rel_same_{n}"
        monitor.apply_route_changed(_route("same", release_id, 2 * n + 1, clock.now))
        clock.now += 10
        monitor.apply_route_changed(_route("same", release_id, 2 * n + 2, clock.now, "rolled_back"))
    for n in range(12):
        clock.now += 10
        monitor.apply_route_changed(_route(f"other{n}", f"rel_o{n}", 1, clock.now, "promoted"))
    clock.now += 10
    monitor.apply_route_changed(_route("live", "rel_live", 1, clock.now))
    releases = Dashboard(monitor).releases()
    assert releases[0]["release_id"] == "rel_live"
    finished = [r["release_id"] for r in releases[1:]]
    assert len(finished) == FINISHED_SHOWN
    assert finished[:3] == ["rel_o11", "rel_o10", "rel_o9"]

    only_same = Dashboard(monitor).releases(lambda alias, version_id: alias == "same")
    assert [r["release_id"] for r in only_same] == ["rel_same_2", "rel_same_1", "rel_same_0"]
    assert {r["state"] for r in only_same} == {"rolled_back"}


def test_a_polling_page_gets_only_what_it_has_not_drawn() -> None:
    clock = Clock()
    monitor = _monitor(clock)
    dashboard = Dashboard(monitor, clock=clock)
    dashboard.history.sample(clock.now)
    monitor.apply_route_changed(_route("poll", "rel_poll", 1, clock.now))
    clock.now += 1
    dashboard.history.sample(clock.now)
    first = dashboard.snapshot()
    assert [len(s["points"]) for s in first["splits"]] == [1]
    assert first["events"] == []
    clock.now += 1
    dashboard.history.sample(clock.now)
    promote = events_pb2.ReleasePromote(
        meta=new_meta("monitor", "t"), release_id="rel_poll", alias="poll", step_index=1
    )
    dashboard.add_event(RELEASE_PROMOTE, promote)
    later = dashboard.snapshot(since=first["now"], events_revision=first["events_revision"])
    assert [[p["t"] for p in s["points"]] for s in later["splits"]] == [[clock.now]]
    assert [e["subject"] for e in later["events"]] == [RELEASE_PROMOTE]
    # Nothing new: no points, and the event list is not sent again.
    idle = dashboard.snapshot(since=later["now"], events_revision=later["events_revision"])
    assert idle["splits"] == []
    assert idle["versions"] == []
    assert "events" not in idle
    assert [r["release_id"] for r in idle["releases"]] == ["rel_poll"]


def test_the_page_counts_steps_from_one_and_names_versions() -> None:
    clock = Clock()
    monitor = _monitor(clock)
    monitor.apply_route_changed(_route("count", "rel_count", 1, clock.now))
    names = VersionNames(None)
    names.remember("ver_count_1", VersionName("count", 1))  # as adapter.ready tells
    dashboard = Dashboard(monitor, clock=clock, names=names)
    html = render_page(dashboard.snapshot())
    assert '<dd class="step">1/3</dd>' in html
    assert '<span title="ver_count_1">count:v1</span>' in html
    assert '<span title="ver_count_2">count:ver_count_2</span>' in html
