"""The live dashboard, served by the monitor's HTTP endpoint next to ``/metrics``.

``GET /dashboard`` is a server-rendered page (releases, alerts, recent events); its script
draws the charts and keeps everything current from ``GET /dashboard/stream``, a stream of
server-sent events: one ``snapshot`` on connect (everything, history included), then a
``tick`` per sample (new chart points, releases, alerts) and a ``feed`` per event as it
arrives. ``GET /dashboard/state`` is the snapshot as plain JSON (scripts, debugging).

A page that cannot keep up is dropped; its EventSource reconnects and gets a fresh
snapshot, so a slow browser never makes the monitor buffer without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web
from google.protobuf.message import Message
from nats.js.api import DeliverPolicy

from ftops.events.v1 import events_pb2
from ftops_monitor.analysis import Release
from ftops_monitor.dashboard_feed import (
    ADAPTER_SUBJECTS,
    RELEASE_SUBJECTS,
    EventFeed,
    figures_json,
    finite,
    summarise,
)
from ftops_monitor.dashboard_history import History
from ftops_monitor.dashboard_page import STATIC_DIR, render_page
from ftops_monitor.monitor import Monitor, SeenEvents
from ftops_runtime.bus import Delivery, EventBus
from ftops_runtime.events import METRICS_REQUESTS, MONITOR_ALERT
from ftops_runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# Messages a page may fall behind before it is dropped (it reconnects).
CLIENT_BACKLOG = 256
KEEPALIVE_S = 15.0
# Finished releases listed below the running ones, newest first.
FINISHED_SHOWN = 10


def sse(kind: str, data: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class Client:
    """One open page's queue of messages to send."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(CLIENT_BACKLOG)

    def send(self, message: bytes | None) -> bool:
        """False when the page has fallen too far behind (it is then told to go)."""
        try:
            self.queue.put_nowait(message)
            return True
        except asyncio.QueueFull:
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(None)
            return False


class Dashboard:
    def __init__(
        self,
        monitor: Monitor,
        *,
        history_s: float = 900.0,
        interval_s: float = 1.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.monitor = monitor
        self.history = History(monitor, history_s=history_s, interval_s=interval_s)
        self.feed = EventFeed()
        self.interval_s = interval_s
        self._clock = clock or monitor.clock
        self.clients: set[Client] = set()
        # Redelivery comes within seconds; ~20 minutes of batches at 20 per second.
        self._seen_batches = SeenEvents(limit=20_000)
        self._sampler: asyncio.Task[None] | None = None

    # -- events ----------------------------------------------------------------------

    def subscribe(self, bus: EventBus, durable_prefix: str, inactive_s: float) -> None:
        """Per-instance consumers: request results from now on, for the charts (all of
        them on every replica); for the event list every release event since the stream
        began (a restarted monitor lists the recent ones again), alerts and adapter
        events from now on."""
        bus.subscribe(
            METRICS_REQUESTS,
            f"{durable_prefix}-results",
            self.on_results,
            deliver_policy=DeliverPolicy.NEW,
            inactive_threshold_s=inactive_s,
        )
        for subject in (*RELEASE_SUBJECTS, MONITOR_ALERT, *ADAPTER_SUBJECTS):
            policy = DeliverPolicy.ALL if subject in RELEASE_SUBJECTS else DeliverPolicy.NEW
            bus.subscribe(
                subject,
                f"{durable_prefix}-{subject}",
                self.on_event,
                deliver_policy=policy,
                inactive_threshold_s=inactive_s,
            )

    async def on_results(self, batch: events_pb2.RequestResultBatch, delivery: Delivery) -> None:
        if self._seen_batches.add(batch.meta.event_id):
            self.history.ingest(batch.results, self._clock())

    async def on_event(self, event: Message, delivery: Delivery) -> None:
        self.add_event(delivery.subject, event)

    def add_event(self, subject: str, event: Message) -> None:
        item = summarise(subject, event)
        if self.feed.add(item):
            self._broadcast(sse("feed", item.as_json()))

    # -- state -----------------------------------------------------------------------

    def _shown_releases(self) -> list[Release]:
        """Every running release, and the latest finished ones (a step restarts when a
        release ends, so ``step_started_at`` is when it finished)."""
        latest = self.monitor.latest_releases()
        running = sorted((r for r in latest if r.running), key=lambda r: r.alias)
        finished = sorted(
            (r for r in latest if not r.running), key=lambda r: r.step_started_at, reverse=True
        )
        return running + finished[:FINISHED_SHOWN]

    def releases(self) -> list[dict[str, Any]]:
        out = []
        for release in self._shown_releases():
            a = self.monitor.analysis(release.alias)
            out.append(
                {
                    "alias": a.alias,
                    "release_id": a.release_id,
                    "strategy": a.strategy,
                    "state": a.state,
                    "paused": a.paused,
                    "step_index": a.step_index,
                    "steps": list(release.steps),
                    "weight": a.weight,
                    "stable_version_id": a.stable_version_id,
                    "candidate_version_id": a.candidate_version_id,
                    "step_seconds": round(a.step_seconds, 1),
                    "verdict": a.verdict,
                    "last_decision": a.last_decision,
                    "last_reason": a.last_reason,
                    "checks": [
                        {"name": c.name, "status": c.status, "detail": c.detail} for c in a.checks
                    ],
                    "figures": figures_json(dict(a.figures)),
                    "decisions": [d.as_json() for d in self.feed.decisions(a.release_id)],
                }
            )
        return out

    def alerts(self) -> list[dict[str, Any]]:
        now = self._clock()
        return [
            {
                "rule": s.rule,
                "alias": s.alias,
                "version_id": s.version_id,
                "value": finite(s.value),
                "threshold": finite(s.threshold),
                "message": s.message,
                "for_seconds": round(now - s.since, 1),
            }
            for s in self.monitor.active_alerts()
        ]

    def snapshot(self) -> dict[str, Any]:
        return {
            "now": self._clock(),
            "history_s": self.history.history_s,
            "window_s": self.monitor.stats.window_s,
            "latency_window_s": self.history.latency_window_s,
            "releases": self.releases(),
            "alerts": self.alerts(),
            "events": [i.as_json() for i in self.feed.items()],
            **self.history.as_json(),
        }

    def sample(self) -> None:
        """One chart point per serving version and release, pushed to open pages."""
        now = self._clock()
        versions, splits = self.history.sample(now)
        if not self.clients:
            return
        tick = {
            "now": now,
            "releases": self.releases(),
            "alerts": self.alerts(),
            "versions": [
                {"alias": a, "version_id": v, "point": p.as_json()} for (a, v), p in versions
            ],
            "splits": [{"alias": alias, "point": p.as_json()} for alias, p in splits],
        }
        self._broadcast(sse("tick", tick))

    def connect(self) -> Client:
        client = Client()
        self.clients.add(client)
        return client

    def _broadcast(self, message: bytes) -> None:
        for client in list(self.clients):
            if not client.send(message):
                log.info("dashboard page fell behind; dropped (it reconnects)")
                self.clients.discard(client)

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.sample()
            except Exception:
                # A chart missing a point is no reason to stop the dashboard.
                log.exception("dashboard sample failed")

    # -- HTTP ------------------------------------------------------------------------

    def mount(self, app: web.Application) -> None:
        app.router.add_get("/", self._redirect)
        app.router.add_get("/dashboard", self._page)
        app.router.add_get("/dashboard/state", self._state)
        app.router.add_get("/dashboard/stream", self._stream)
        app.router.add_static("/dashboard/static", STATIC_DIR)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        app.on_cleanup.append(self._on_cleanup)

    async def _on_startup(self, app: web.Application) -> None:
        self.history.sample(self._clock())  # where the first interval begins
        self._sampler = asyncio.create_task(self._sample_forever(), name="dashboard-sampler")

    async def _on_shutdown(self, app: web.Application) -> None:
        # Open streams end now rather than at the runner's shutdown timeout.
        for client in list(self.clients):
            client.send(None)
        self.clients.clear()

    async def _on_cleanup(self, app: web.Application) -> None:
        await cancel_and_wait([self._sampler])
        self._sampler = None

    async def _redirect(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/dashboard")

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(
            text=render_page(self.snapshot()),
            content_type="text/html",
            headers={"Cache-Control": "no-store"},
        )

    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response(self.snapshot(), headers={"Cache-Control": "no-store"})

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",  # proxies must not hold the events back
            }
        )
        await response.prepare(request)
        client = self.connect()
        try:
            await response.write(sse("snapshot", self.snapshot()))
            while True:
                try:
                    message = await asyncio.wait_for(client.queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    message = b": keepalive\n\n"
                if message is None:
                    break
                await response.write(message)
        except ConnectionError:
            pass  # the page went away
        finally:
            self.clients.discard(client)
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response
