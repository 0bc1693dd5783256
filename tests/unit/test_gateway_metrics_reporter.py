"""The metrics reporter never blocks requests and drops the oldest results when full."""

from __future__ import annotations

from typing import Any, cast

import pytest
from google.protobuf.message import Message

from ftops.events.v1 import events_pb2
from ftops_gateway.metrics_reporter import MetricsReporter
from ftops_runtime.bus import EventBus


class FakeBus:
    service = "gateway"
    instance = "t"

    def __init__(self) -> None:
        self.ready = True
        self.fail = False
        self.published: list[tuple[str, Message]] = []

    async def publish(self, subject: str, event: Message, **_: Any) -> None:
        if self.fail:
            raise ConnectionError("nats down")
        self.published.append((subject, event))


def _result(i: int) -> events_pb2.RequestResult:
    return events_pb2.RequestResult(request_id=str(i), status="OK")


async def test_batches_and_drops_oldest_while_nats_is_down() -> None:
    bus = FakeBus()
    reporter = MetricsReporter(cast(EventBus, bus), batch_max=3, queue_max=5)
    bus.fail = True
    for i in range(7):
        reporter.record(_result(i))
    assert reporter.dropped == 2
    with pytest.raises(ConnectionError):
        await reporter.flush()
    # The failed batch went back in front; nothing else lost.
    assert reporter.pending == 5
    bus.fail = False
    await reporter.flush()
    ids = [r.request_id for _, batch in bus.published for r in batch.results]  # type: ignore[attr-defined]
    assert ids == ["2", "3", "4", "5", "6"]
    assert [len(b.results) for _, b in bus.published] == [3, 2]  # type: ignore[attr-defined]
    assert {s for s, _ in bus.published} == {"metrics.requests"}


async def test_not_ready_bus_keeps_results_queued() -> None:
    bus = FakeBus()
    bus.ready = False
    reporter = MetricsReporter(cast(EventBus, bus))
    reporter.record(_result(1))
    await reporter.flush()
    assert reporter.pending == 1
    assert bus.published == []
