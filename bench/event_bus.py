"""Event bus overhead: publish → handler latency through ftops' EventBus (envelope,
trace propagation, durable pull consumer, explicit ack) against raw nats-py JetStream
publish + pull fetch on the same server. Baseline: raw nats-py.

Second case, events arriving now and then (as adapter.ready and release commands do): a
consumer loop that always fetches a batch of 16 against the EventBus, which asks for what
is queued (see ``next_fetch_size``)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Awaitable, Callable

import nats
from nats.js.api import ConsumerConfig, DeliverPolicy

from bench.report import Report
from ftops.events.v1 import events_pb2
from ftops_devstack.servers import start_nats
from ftops_runtime.bus import Delivery, EventBus, ensure_streams
from ftops_runtime.events import METRICS_REQUESTS, new_meta

N = 300
SPACED = 40
BATCH = 16


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


Publish = Callable[[], Awaitable[object]]


async def _one_at_a_time(publish: Publish, received: asyncio.Queue[float]) -> list[float]:
    samples = []
    for _ in range(N):
        t0 = time.perf_counter()
        await publish()
        samples.append(await asyncio.wait_for(received.get(), 5) - t0)
    return samples


async def _spaced(publish: Publish, received: asyncio.Queue[float]) -> list[float]:
    """Events with idle gaps between them: the case where a batch fetch waits."""
    rng = random.Random(7)
    samples = []
    for _ in range(SPACED):
        await asyncio.sleep(rng.uniform(0.05, 1.5))
        t0 = time.perf_counter()
        await publish()
        samples.append(await asyncio.wait_for(received.get(), 5) - t0)
    return samples


async def _ftops(
    url: str, measure: Callable[[Publish, asyncio.Queue[float]], Awaitable[list[float]]]
) -> list[float]:
    """``measure`` through an EventBus consumer fetching up to BATCH at a time."""
    received: asyncio.Queue[float] = asyncio.Queue()

    async def handler(event: events_pb2.RequestResultBatch, delivery: Delivery) -> None:
        received.put_nowait(time.perf_counter())

    async with EventBus(url, service="bench", instance="b") as bus:
        bus.subscribe(
            METRICS_REQUESTS,
            f"bus-{uuid.uuid4().hex[:6]}",
            handler,
            deliver_policy=DeliverPolicy.NEW,
            batch=BATCH,
        )
        await bus.wait_ready(10)
        await asyncio.sleep(0.5)
        return await measure(
            lambda: bus.publish(
                METRICS_REQUESTS, events_pb2.RequestResultBatch(meta=new_meta("b", "b"))
            ),
            received,
        )


async def _raw_batch_loop(url: str) -> list[float]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await ensure_streams(js)
    sub = await js.pull_subscribe(
        METRICS_REQUESTS,
        durable=f"rawb-{uuid.uuid4().hex[:6]}",
        config=ConsumerConfig(deliver_policy=DeliverPolicy.NEW),
    )
    received: asyncio.Queue[float] = asyncio.Queue()

    async def consume() -> None:
        while True:
            try:
                msgs = await sub.fetch(BATCH, timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                received.put_nowait(time.perf_counter())
                await msg.ack()

    payload = events_pb2.RequestResultBatch(meta=new_meta("bench", "b")).SerializeToString()
    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0.5)
    try:
        return await _spaced(lambda: js.publish(METRICS_REQUESTS, payload), received)
    finally:
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
        await nc.close()


async def main() -> None:
    server = start_nats()
    try:
        report = Report(
            "event_bus",
            f"publish → consumer round trip, {N} events, one at a time",
            "raw nats-py JetStream publish + pull fetch + ack",
        )
        raw = await _raw(server.url)
        ours = await _ftops(server.url, _one_at_a_time)
        base = report.add("raw nats-py", raw)
        row = report.add("ftops EventBus", ours)
        report.notes["p50 overhead vs baseline"] = f"{row.p50_ms / base.p50_ms:.2f}x"
        raw_spaced = report.add(
            f"spaced: raw loop fetching {BATCH}", await _raw_batch_loop(server.url)
        )
        ours_spaced = report.add(
            f"spaced: EventBus, batch {BATCH}", await _ftops(server.url, _spaced)
        )
        report.notes["spaced events"] = f"{SPACED}, 0.05-1.5 s apart (the fetch timeout is 1 s)"
        # p99 of 40 samples is their maximum.
        report.notes["spaced worst ms, raw loop vs EventBus"] = (
            f"{raw_spaced.p99_ms:.1f} / {ours_spaced.p99_ms:.1f}"
        )
        report.write()
    finally:
        server.stop()


if __name__ == "__main__":
    asyncio.run(main())
