"""Replica announcements: change coalescing, heartbeats, and failures that never reach
the caller (serving must not feel a NATS outage)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from ftops.events.v1 import events_pb2
from ftops_inference.announce import Announcer


class FakeBus:
    def __init__(self) -> None:
        self.published: asyncio.Queue[tuple[str, events_pb2.ReplicaAnnounce]] = asyncio.Queue()
        self.fail = False

    async def publish(self, subject: str, event: Any, *, timeout: float = 5.0) -> None:
        if self.fail:
            raise ConnectionError("nats: no servers available for connection")
        self.published.put_nowait((subject, event))


class State:
    def __init__(self) -> None:
        self.loaded: list[str] = []

    def snapshot(self) -> events_pb2.ReplicaAnnounce:
        return events_pb2.ReplicaAnnounce(
            replica_id="r1", loaded_versions=self.loaded, serving=True
        )


async def next_reason(bus: FakeBus) -> tuple[str, events_pb2.ReplicaAnnounce]:
    subject, event = await asyncio.wait_for(bus.published.get(), 5)
    return subject, event


async def test_start_change_and_heartbeat_on_the_replica_subject() -> None:
    bus, state = FakeBus(), State()
    announcer = Announcer(bus, state.snapshot, replica_id="r1", interval_s=0.2)  # type: ignore[arg-type]
    announcer.start()
    try:
        subject, start = await next_reason(bus)
        assert subject == "inference.replica.r1"
        assert start.reason == "start"
        assert start.heartbeat_interval_s == 0.2
        state.loaded = ["v1"]
        announcer.changed()
        announcer.changed()  # coalesced with the first
        _, change = await next_reason(bus)
        assert (change.reason, list(change.loaded_versions)) == ("change", ["v1"])
        _, beat = await next_reason(bus)
        assert beat.reason == "heartbeat"
        assert start.meta.event_id != beat.meta.event_id
    finally:
        await announcer.stop()


async def test_failures_are_counted_never_raised_and_the_next_beat_recovers() -> None:
    bus, state = FakeBus(), State()
    bus.fail = True
    announcer = Announcer(bus, state.snapshot, replica_id="r1", interval_s=0.05)  # type: ignore[arg-type]
    assert await announcer.announce("drain") is False
    announcer.start()
    try:
        announcer.changed()
        while announcer.failures < 3:  # noqa: ASYNC110 - the loop keeps trying by itself
            await asyncio.sleep(0.01)
        bus.fail = False
        _, event = await next_reason(bus)
        assert event.reason in ("heartbeat", "change")
    finally:
        await announcer.stop()


class SwallowingBus(FakeBus):
    """A publish that swallows a cancellation (as asyncio.wait_for on Python 3.11 can when
    its timeout fires at the same moment): the announce loop never sees the cancel."""

    async def publish(self, subject: str, event: Any, *, timeout: float = 5.0) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.01)
        self.published.put_nowait((subject, event))


async def test_stop_returns_even_when_the_loop_swallowed_its_cancel() -> None:
    bus = SwallowingBus()
    announcer = Announcer(bus, State().snapshot, replica_id="r1", interval_s=0.001)  # type: ignore[arg-type]
    announcer.start()
    await next_reason(bus)
    await asyncio.sleep(0.05)  # many heartbeats, each a publish that eats a cancel
    await asyncio.wait_for(announcer.stop(), 2)
    sent = bus.published.qsize()
    await asyncio.sleep(0.05)
    assert bus.published.qsize() == sent  # the loop is over, not just abandoned
