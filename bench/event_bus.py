"""Event bus overhead: publish → handler latency through ftops' EventBus (envelope,
trace propagation, durable pull consumer, explicit ack) against raw nats-py JetStream
publish + pull fetch on the same server. Baseline: raw nats-py."""

from __future__ import annotations

import asyncio
import time
import uuid

import nats
from nats.js.api import DeliverPolicy

from bench.report import Report
from ftops.events.v1 import events_pb2
from ftops_devstack.servers import start_nats
from ftops_runtime.bus import Delivery, EventBus, ensure_streams
from ftops_runtime.events import METRICS_REQUESTS, new_meta

N = 300


async def _raw(url: str) -> list[float]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await ensure_streams(js)
    sub = await js.pull_subscribe(METRICS_REQUESTS, durable=f"raw-{uuid.uuid4().hex[:6]}")
    samples = []
    payload = events_pb2.RequestResultBatch(meta=new_meta("bench", "b")).SerializeToString()
    for _ in range(N):
        t0 = time.perf_counter()
        await js.publish(METRICS_REQUESTS, payload)
        (msg,) = await sub.fetch(1, timeout=5)
        await msg.ack()
        samples.append(time.perf_counter() - t0)
    await nc.close()
    return samples


async def _ftops(url: str) -> list[float]:
    received: asyncio.Queue[float] = asyncio.Queue()

    async def handler(event: events_pb2.RequestResultBatch, delivery: Delivery) -> None:
        received.put_nowait(time.perf_counter())

    samples = []
    async with EventBus(url, service="bench", instance="b") as bus:
        bus.subscribe(
            METRICS_REQUESTS,
            f"bus-{uuid.uuid4().hex[:6]}",
            handler,
            deliver_policy=DeliverPolicy.NEW,
        )
        await bus.wait_ready(10)
        await asyncio.sleep(0.5)
        for _ in range(N):
            t0 = time.perf_counter()
            await bus.publish(
                METRICS_REQUESTS, events_pb2.RequestResultBatch(meta=new_meta("b", "b"))
            )
            t1 = await asyncio.wait_for(received.get(), 5)
            samples.append(t1 - t0)
    return samples


async def main() -> None:
    server = start_nats()
    try:
        report = Report(
            "event_bus",
            f"publish → consumer round trip, {N} events, one at a time",
            "raw nats-py JetStream publish + pull fetch + ack",
        )
        raw = await _raw(server.url)
        ours = await _ftops(server.url)
        base = report.add("raw nats-py", raw)
        row = report.add("ftops EventBus", ours)
        report.notes["p50 overhead vs baseline"] = f"{row.p50_ms / base.p50_ms:.2f}x"
        report.write()
    finally:
        server.stop()


if __name__ == "__main__":
    asyncio.run(main())
