"""The live dashboard, served by the monitor's HTTP endpoint next to ``/metrics``.

``GET /dashboard`` is a server-rendered page (releases, alerts, recent events); its script
draws the charts and keeps everything current from ``GET /dashboard/stream``, a stream of
server-sent events: one ``snapshot`` on connect (everything, history included), then a
``tick`` per sample (new chart points, releases, alerts) and a ``feed`` per event as it
arrives. ``GET /dashboard/state`` is the snapshot as plain JSON (scripts, debugging).

A page that cannot keep up is dropped; its EventSource reconnects and gets a fresh
snapshot, so a slow browser never makes the monitor buffer without bound.

Each page sees only what its caller's key may (its teams' aliases and versions; all for a
platform admin): the snapshot, every tick and every event are filtered per page
(visibility.py), and an open stream ends once its key is revoked.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import uuid
from collections.abc import Callable, Iterable
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
    FeedItem,
    figures_json,
    finite,
    summarise,
)
from ftops_monitor.dashboard_history import History
from ftops_monitor.dashboard_names import VersionName, VersionNames
from ftops_monitor.dashboard_page import STATIC_DIR, render_page
from ftops_monitor.http_access import caller_of, still_valid
from ftops_monitor.monitor import Monitor, SeenEvents
from ftops_monitor.visibility import Sees, TeamView, everything, monitor_pairs
from ftops_runtime.bus import Delivery, EventBus
from ftops_runtime.events import METRICS_REQUESTS, MONITOR_ALERT
from ftops_runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# Messages a page may fall behind before it is dropped (it reconnects).
CLIENT_BACKLOG = 256
KEEPALIVE_S = 15.0
# Finished releases listed below the running ones, newest first.
FINISHED_SHOWN = 10


def _query_number(request: web.Request, name: str) -> float | None:
    """An optional number in the query; a clear 400 for anything else."""
    raw = request.query.get(name, "")
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise web.HTTPBadRequest(text=f"{name} must be a finite number, got {raw[:40]!r}")
    return value


def sse(kind: str, data: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


class Client:
    """One open page's queue of messages to send, and what its caller may see."""

    def __init__(self, sees: Sees = everything) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(CLIENT_BACKLOG)
        self.sees = sees

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
        view: TeamView | None = None,
        names: VersionNames | None = None,
    ) -> None:
        self.monitor = monitor
        # alias:vN labels (version ids until the registry has named them).
        self.names = names or VersionNames(None)
        # Tells the teams of aliases for callers that are no platform admins.
        self.view = view
        self.history = History(monitor, history_s=history_s, interval_s=interval_s)
        self.feed = EventFeed()
        self.interval_s = interval_s
        self._clock = clock or monitor.clock
        self.clients: set[Client] = set()
        # Redelivery comes within seconds; ~20 minutes of batches at 20 per second.
        self._seen_batches = SeenEvents(limit=20_000)
        self._sampler: asyncio.Task[None] | None = None
        # Part of the event list's revision: a restarted monitor's list is sent in full
        # however many events it has seen.
        self._started = uuid.uuid4().hex[:8]

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
        if isinstance(event, events_pb2.AdapterReady | events_pb2.AdapterRejected):
            self.names.remember(event.version_id, VersionName(event.adapter, event.version_number))
        item = summarise(delivery.subject, event)
        await self._learn([(item.alias, item.version_id)])
        self._add(item)

    def add_event(self, subject: str, event: Message) -> None:
        self._add(summarise(subject, event))

    def _add(self, item: FeedItem) -> None:
        if self.feed.add(item):
            message = sse("feed", item.as_json())
            self._broadcast(lambda sees: message if sees(item.alias, item.version_id) else None)

    async def _learn(self, pairs: Iterable[tuple[str, str]]) -> None:
        """The teams of what open pages of non-admins are about to be sent."""
        if self.view is not None and any(c.sees is not everything for c in self.clients):
            await self.view.learn(pairs)

    # -- state -----------------------------------------------------------------------

    def _shown_releases(self, sees: Sees) -> list[Release]:
        """Every running release, then the ten latest finished ones of any alias (a step
        restarts when a release ends, so ``step_started_at`` is when it finished)."""
        latest = {r.release_id for r in self.monitor.latest_releases()}
        visible = [
            r for r in list(self.monitor.releases.values()) if sees(r.alias, r.stable_version_id)
        ]
        # An older release still marked running was replaced: it is listed as finished.
        running = sorted(
            (r for r in visible if r.running and r.release_id in latest), key=lambda r: r.alias
        )
        shown = {r.release_id for r in running}
        finished = sorted(
            (r for r in visible if r.release_id not in shown),
            key=lambda r: (r.step_started_at, r.started_at),
            reverse=True,
        )
        return running + finished[:FINISHED_SHOWN]

    def releases(self, sees: Sees = everything) -> list[dict[str, Any]]:
        return [self._release_json(release) for release in self._shown_releases(sees)]

    def _release_json(self, release: Release) -> dict[str, Any]:
        latest = self.monitor.release_for(release.alias) is release
        if latest:
            a = self.monitor.analysis(release.alias)
            live = {
                "step_seconds": round(a.step_seconds, 1),
                "verdict": a.verdict,
                "checks": [
                    {"name": c.name, "status": c.status, "detail": c.detail} for c in a.checks
                ],
                "figures": figures_json(dict(a.figures)),
            }
        else:  # superseded by a newer release of its alias: how it ended
            live = {
                "step_seconds": 0.0,
                "verdict": "",
                "checks": [],
                "figures": figures_json(dict(release.evaluation_figures)),
            }
        return {
            "alias": release.alias,
            "release_id": release.release_id,
            "strategy": release.strategy.value,
            "state": release.state.value,
            "paused": release.paused,
            "step_index": release.step_index,
            "steps": list(release.steps),
            "weight": release.weight,
            "stable_version_id": release.stable_version_id,
            "candidate_version_id": release.candidate_version_id,
            "stable_label": self._label(release.alias, release.stable_version_id),
            "candidate_label": self._label(release.alias, release.candidate_version_id),
            "last_decision": release.last_decision,
            "last_reason": release.last_reason,
            **live,
            "decisions": [d.as_json() for d in self.feed.decisions(release.release_id)],
        }

    def _label(self, alias: str, version_id: str) -> str:
        return self.names.name(alias, version_id).label if version_id else "-"

    def alerts(self, sees: Sees = everything) -> list[dict[str, Any]]:
        now = self._clock()
        return [
            {
                "rule": s.rule,
                "alias": s.alias,
                "version_id": s.version_id,
                "value": finite(s.value),
                "threshold": finite(s.threshold),
                "label": self.names.name(s.alias, s.version_id).label,
                "message": s.message,
                "for_seconds": round(now - s.since, 1),
            }
            for s in self.monitor.active_alerts()
            if sees(s.alias, s.version_id)
        ]

    def snapshot(
        self,
        sees: Sees = everything,
        *,
        since: float | None = None,
        events_revision: str | None = None,
    ) -> dict[str, Any]:
        """Everything the page shows. With ``since``, only the chart points taken after
        it; with ``events_revision`` the event list only when it changed since then (a
        page that polls)."""
        revision = f"{self._started}.{self.feed.revision}"
        history = self.history.as_json(since)
        snapshot = {
            "now": self._clock(),
            "history_s": self.history.history_s,
            "window_s": self.monitor.stats.window_s,
            "latency_window_s": self.history.latency_window_s,
            "releases": self.releases(sees),
            "alerts": self.alerts(sees),
            "events_revision": revision,
            "versions": [
                {**v, **self._series(v["alias"], v["version_id"])}
                for v in history["versions"]
                if sees(v["alias"], v["version_id"])
            ],
            "splits": [s for s in history["splits"] if sees(s["alias"], "")],
        }
        if events_revision != revision:
            snapshot["events"] = [
                i.as_json() for i in self.feed.items() if sees(i.alias, i.version_id)
            ]
        return snapshot

    def _series(self, alias: str, version_id: str) -> dict[str, str]:
        name = self.names.name(alias, version_id)
        return {"group": name.group, "label": name.label}

    def _pairs(self) -> list[tuple[str, str]]:
        """Every (alias, version) the dashboard shows."""
        return [
            *monitor_pairs(self.monitor),
            *self.history.versions,
            *((alias, "") for alias in self.history.splits),
            *((i.alias, i.version_id) for i in self.feed.items()),
        ]

    async def scope(self, request: web.Request) -> Sees:
        """What the request's caller may see (everything without access control)."""
        caller = caller_of(request)
        if caller is None or self.view is None:
            return everything
        return await self.view.scope(caller, self._pairs())

    def sample(self) -> None:
        """One chart point per serving version and release, pushed to open pages."""
        now = self._clock()
        versions, splits = self.history.sample(now)
        if not self.clients:
            return

        def tick(sees: Sees) -> bytes:
            body = {
                "now": now,
                "releases": self.releases(sees),
                "alerts": self.alerts(sees),
                "versions": [
                    {"alias": a, "version_id": v, **self._series(a, v), "point": p.as_json()}
                    for (a, v), p in versions
                    if sees(a, v)
                ],
                "splits": [
                    {"alias": alias, "point": p.as_json()} for alias, p in splits if sees(alias, "")
                ],
            }
            return sse("tick", body)

        self._broadcast(tick)

    def connect(self, sees: Sees = everything) -> Client:
        client = Client(sees)
        self.clients.add(client)
        return client

    def _broadcast(self, message_for: Callable[[Sees], bytes | None]) -> None:
        """``message_for(page's filter)``: what that page is sent (None: nothing). Built
        once for all the pages that see everything."""
        built: dict[Sees, bytes | None] = {}
        for client in list(self.clients):
            if client.sees not in built:
                built[client.sees] = message_for(client.sees)
            message = built[client.sees]
            if message is not None and not client.send(message):
                log.info("dashboard page fell behind; dropped (it reconnects)")
                self.clients.discard(client)

    async def _sample_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                pairs = self._pairs()
                self.names.learn(v for _, v in pairs)
                await self._learn(pairs)
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
        await self.names.close()

    async def _redirect(self, request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/dashboard")

    async def _page(self, request: web.Request) -> web.Response:
        return web.Response(
            text=render_page(self.snapshot(await self.scope(request))),
            content_type="text/html",
            headers={"Cache-Control": "no-store"},
        )

    async def _state(self, request: web.Request) -> web.Response:
        since = _query_number(request, "since")
        snapshot = self.snapshot(
            await self.scope(request), since=since, events_revision=request.query.get("events")
        )
        return web.json_response(snapshot, headers={"Cache-Control": "no-store"})

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",  # proxies must not hold the events back
            }
        )
        sees = await self.scope(request)
        valid = still_valid(request)
        await response.prepare(request)
        client = self.connect(sees)
        try:
            await response.write(sse("snapshot", self.snapshot(sees)))
            while True:
                try:
                    message = await asyncio.wait_for(client.queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    message = b": keepalive\n\n"
                if message is None:
                    break
                if valid is not None and not await valid():
                    break  # its key was revoked (or expired): the page gets no more
                await response.write(message)
        except ConnectionError:
            pass  # the page went away
        finally:
            self.clients.discard(client)
        with contextlib.suppress(ConnectionError):
            await response.write_eof()
        return response
