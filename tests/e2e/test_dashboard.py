"""The monitor's live dashboard in headless Chromium: a real monitor on real NATS, the
gateway's route.changed, release events and request results published on NATS, the page
driven over the Chrome DevTools protocol. The browser test keeps a screenshot at
test-artifacts/dashboard.png."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from google.protobuf.message import Message

from ftops.events.v1 import events_pb2
from ftops_devstack.lifetime import die_with_parent
from ftops_devstack.servers import start_nats
from ftops_monitor.dashboard import CLIENT_BACKLOG, Dashboard
from ftops_monitor.dashboard_feed import EventFeed, summarise
from ftops_monitor.dashboard_history import History
from ftops_monitor.dashboard_page import render_page
from ftops_monitor.exporter import MetricsServer, prometheus_registry
from ftops_monitor.monitor import Monitor
from ftops_monitor.service import MonitorService
from ftops_monitor.settings import MonitorSettings
from ftops_runtime.bus import EventBus
from ftops_runtime.events import (
    ADAPTER_LOADED,
    ADAPTER_REJECTED,
    ADAPTER_RETIRED,
    METRICS_REQUESTS,
    MONITOR_ALERT,
    RELEASE_PAUSED,
    RELEASE_PROMOTE,
    RELEASE_ROLLBACK,
    RELEASE_STARTED,
    ROUTE_CHANGED,
    derived_event_id,
    new_meta,
)

REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "test-artifacts" / "dashboard.png"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def _chromium() -> str | None:
    explicit = os.environ.get("FTOPS_CHROMIUM")
    if explicit:
        return explicit
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- a small Chrome DevTools protocol client -------------------------------------------


class DevTools:
    """One page target over the DevTools websocket: ``call`` a method, ``evaluate`` an
    expression (promises awaited), ``until`` a condition holds in the page."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._next = 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        # Uncaught script exceptions (after Runtime.enable): a page must have none.
        self.script_errors: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if data.get("method") == "Runtime.exceptionThrown":
                details = data["params"]["exceptionDetails"]
                self.script_errors.append(details.get("exception", {}).get("description", ""))
            future = self._pending.pop(data.get("id", -1), None)
            if future is not None and not future.done():
                future.set_result(data)
        for future in self._pending.values():
            future.set_exception(ConnectionError("DevTools connection closed"))

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[self._next] = future
        await self._ws.send_json({"id": self._next, "method": method, "params": params})
        reply = await asyncio.wait_for(future, 30)
        if "error" in reply:
            raise AssertionError(f"{method} failed: {reply['error']}")
        result: dict[str, Any] = reply["result"]
        return result

    async def evaluate(self, expression: str) -> Any:
        reply = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in reply:
            raise AssertionError(f"page script failed: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    async def until(self, condition: str, timeout_s: float = 15.0) -> Any:
        """Resolves in the page as soon as a DOM change makes ``condition`` truthy (a
        MutationObserver, no polling); fails with what the page shows after the timeout."""
        script = f"""new Promise((resolve) => {{
            const check = () => {{ try {{ return ({condition}); }} catch (e) {{ return null; }} }};
            const first = check();
            if (first) {{ resolve(first); return; }}
            const observer = new MutationObserver(() => {{
                const value = check();
                if (value) {{ observer.disconnect(); resolve(value); }}
            }});
            observer.observe(document, {{subtree: true, childList: true, characterData: true}});
            setTimeout(() => {{ observer.disconnect(); resolve(null); }}, {int(timeout_s * 1000)});
        }})"""
        value = await self.evaluate(script)
        if not value:
            text = await self.evaluate("document.body ? document.body.innerText : ''")
            raise AssertionError(f"page never showed {condition!r}; it shows:\n{text[:3000]}")
        return value

    async def close(self) -> None:
        await self._ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.asynccontextmanager
async def headless_page(binary: str) -> AsyncIterator[DevTools]:
    profile = tempfile.mkdtemp(prefix="ftops-chromium-")
    process = await asyncio.create_subprocess_exec(
        binary,
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--remote-debugging-port=0",
        "--remote-allow-origins=*",
        f"--user-data-dir={profile}",
        "--window-size=1500,1300",
        "about:blank",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=die_with_parent(),
    )
    try:
        # Chromium writes its DevTools port once it listens; nothing to await but the file.
        active = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (active.exists() and active.read_text().count("\n") >= 1):
            if process.returncode is not None or time.monotonic() > deadline:
                raise AssertionError(f"{binary} did not start (exit code {process.returncode})")
            await asyncio.sleep(0.05)
        port = int(active.read_text().splitlines()[0])
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as response:
                targets = await response.json()
            page = next(t for t in targets if t["type"] == "page")
            ws = await http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
            devtools = DevTools(ws)
            try:
                yield devtools
            finally:
                await devtools.close()
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        shutil.rmtree(profile, ignore_errors=True)


# -- the monitor and its events ----------------------------------------------------------


@pytest.fixture(scope="module")
def own_nats_url() -> Iterator[str]:
    """A NATS server of this module's own: the session's holds the releases other tests
    left running, which a monitor replays and the page (and its screenshot) would list."""
    server = start_nats()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
async def bus(own_nats_url: str) -> AsyncIterator[EventBus]:
    async with EventBus(own_nats_url, service="test", instance=uuid.uuid4().hex[:6]) as b:
        await b.wait_ready(10)
        yield b


@pytest.fixture
async def monitor(own_nats_url: str) -> AsyncIterator[MonitorService]:
    settings = MonitorSettings(
        grpc_port=0,
        nats_url=own_nats_url,
        instance_id=f"mon-{uuid.uuid4().hex[:6]}",
        analysis_interval_s=0.1,
        shutdown_grace_s=0.5,
        metrics_port=0,
        # Access control off (no registry to check keys): the dashboard itself is tested
        # here; its keys and per-team views in tests/integration/test_monitor_http_access.py.
        dev_mode=True,
        registry_address=f"127.0.0.1:{_closed_port()}",
        registry_timeout_s=0.5,
        # The test traffic's stable version fails 5% of its requests: an alert at once.
        alert_error_rate=0.04,
        alert_for_s=0.0,
        alert_min_requests=10,
    )
    service = MonitorService(settings)
    await service.start()
    await service.bus.wait_ready(10)
    try:
        yield service
    finally:
        await service.stop()


def _started(alias: str) -> events_pb2.ReleaseStarted:
    return events_pb2.ReleaseStarted(
        meta=new_meta("gateway", "test"),
        release_id=f"rel_{uuid.uuid4().hex[:8]}",
        alias=alias,
        stable_version_id="ver_stable",
        candidate_version_id="ver_canary",
        strategy=events_pb2.RELEASE_STRATEGY_CANARY,
        steps=[10, 50, 100],
        current_weight=10,
        actor="team-a",
        # Manual: the test, not the analysis, decides when the step passes.
        analysis=events_pb2.AnalysisSettings(min_requests=10, auto=False),
    )


def _route(started: events_pb2.ReleaseStarted) -> events_pb2.RouteChanged:
    """The gateway's route.changed for the release ``started`` announces (the monitor's
    release state comes from it; the dashboard's feed lists the release.* events)."""
    release = events_pb2.ReleaseSnapshot(
        release_id=started.release_id,
        state="running",
        strategy=started.strategy,
        stable_version_id=started.stable_version_id,
        candidate_version_id=started.candidate_version_id,
        candidate_weight=started.current_weight,
        steps=started.steps,
        analysis=started.analysis,
        change=events_pb2.ReleaseChange(
            kind="started", event_id=started.meta.event_id, actor=started.actor
        ),
    )
    release.started_at.CopyFrom(started.meta.occurred_at)
    release.step_started_at.CopyFrom(started.meta.occurred_at)
    return _routed(started.alias, 1, release)


def _routed(
    alias: str, revision: int, release: events_pb2.ReleaseSnapshot
) -> events_pb2.RouteChanged:
    meta = new_meta("gateway", "test")
    meta.event_id = derived_event_id("route.changed", alias, revision)  # as the gateway's
    return events_pb2.RouteChanged(meta=meta, alias=alias, revision=revision, release=release)


def _applied(
    before: events_pb2.RouteChanged,
    decision: events_pb2.ReleasePromote | events_pb2.ReleaseRollback,
    at: float,
) -> events_pb2.RouteChanged:
    """What the gateway publishes once it applied the monitor's decision at ``at``."""
    release = events_pb2.ReleaseSnapshot()
    release.CopyFrom(before.release)
    release.change.Clear()
    release.change.event_id = decision.meta.event_id
    release.change.reason = decision.reason
    release.change.occurred_at.FromNanoseconds(int(at * 1e9))
    if isinstance(decision, events_pb2.ReleaseRollback):
        release.change.kind, release.state, release.candidate_weight = "rollback", "rolled_back", 0
        release.ClearField("step_started_at")
    else:
        release.change.kind = "promote"
        release.step_index, release.candidate_weight = decision.step_index, decision.weight
        release.step_started_at.CopyFrom(release.change.occurred_at)
    return _routed(before.alias, before.revision + 1, release)


def _batch(started: events_pb2.ReleaseStarted, n: int) -> events_pb2.RequestResultBatch:
    batch = events_pb2.RequestResultBatch(meta=new_meta("gateway", "test"))
    for i in range(n):
        canary = i % 10 == 0
        result = batch.results.add(
            request_id=uuid.uuid4().hex,
            alias=started.alias,
            version_id=started.candidate_version_id if canary else started.stable_version_id,
            arm="candidate" if canary else "stable",
            latency_ms=(55.0 if canary else 40.0) + (i * 7) % 30,
            ttft_ms=5.0,
            completion_tokens=8,
            status="UNAVAILABLE" if i % 25 == 3 else "OK",
            release_id=started.release_id,
        )
        result.finished_at.GetCurrentTime()
    return batch


async def _traffic(
    bus: EventBus, started: events_pb2.ReleaseStarted, served: list[events_pb2.RequestResult]
) -> None:
    """Live traffic for the charts: a batch of results every 200 ms."""
    while True:
        batch = _batch(started, 20)
        await bus.publish(METRICS_REQUESTS, batch)
        served.extend(batch.results)
        await asyncio.sleep(0.2)


async def _rate_answers(monitor: MonitorService, served: list[events_pb2.RequestResult]) -> int:
    """Users' feedback on answers the monitor has seen (the first batch, given that the
    charts show its latencies); the candidate's answers rated a little lower."""
    rated = 0
    for result in served[:20]:
        score = 0.7 if result.arm == "candidate" else 0.85
        await monitor.monitor.submit_feedback(result.request_id, score)
        rated += 1
    return rated


async def _state(monitor: MonitorService) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{monitor.metrics_port}/dashboard/state") as response,
    ):
        assert response.status == 200
        state: dict[str, Any] = await response.json()
        return state


def _release_text(alias: str, selector: str) -> str:
    return f"document.querySelector('.release[data-alias=\"{alias}\"] {selector}')?.textContent"


@pytest.mark.integration
async def test_dashboard_shows_a_canary_and_updates_live(
    monitor: MonitorService, bus: EventBus
) -> None:
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium binary (apt-get install chromium, or set FTOPS_CHROMIUM)")
    alias = f"support-bot-{uuid.uuid4().hex[:4]}"
    started = _started(alias)
    route = _route(started)
    await bus.publish(RELEASE_STARTED, started)
    await bus.publish(ROUTE_CHANGED, route)
    served: list[events_pb2.RequestResult] = []
    traffic = asyncio.create_task(_traffic(bus, started, served))
    url = f"http://127.0.0.1:{monitor.metrics_port}/dashboard"
    try:
        async with headless_page(binary) as page:
            await page.call("Page.enable")
            await page.call("Runtime.enable")
            await page.call("Page.navigate", url=url)
            # The running canary at its first step, and the stream connected.
            assert await page.until(f"{_release_text(alias, '.state')} === 'running'")
            assert await page.until(f"{_release_text(alias, '.weight')} === '10%'")
            assert await page.evaluate(_release_text(alias, ".step")) == "0"
            assert await page.until("document.getElementById('connection').textContent === 'live'")
            # Charts drawn from the sampled history: a line per version in each chart.
            charts = f'.alias-charts[data-alias="{alias}"]'
            lines = await page.until(
                f"document.querySelectorAll('{charts} path.line').length >= 8 && "
                f"document.querySelectorAll('{charts} path.line').length"
            )
            assert lines >= 8
            assert await _rate_answers(monitor, served) == 20
            # The stable's error rate above the alert threshold: listed while it fires.
            alert = await page.until("document.querySelector('#alerts .alert')?.textContent")
            assert "error_rate" in alert
            assert "ver_stable" in alert
            assert await page.until(
                "[...document.querySelectorAll('#events li')].some(e => "
                "e.dataset.subject === 'monitor.alert' && e.textContent.includes('firing'))"
            )
            # A few seconds of history, so the picture kept shows lines rather than dots.
            await page.until(
                f"(document.querySelector('{charts} path.line')?.getAttribute('d') || '')"
                ".split('L').length > 4",
            )
            await page.evaluate("window.notReloaded = true")

            promote = events_pb2.ReleasePromote(
                meta=new_meta("monitor", "test"),
                release_id=started.release_id,
                alias=alias,
                candidate_version_id=started.candidate_version_id,
                stable_version_id=started.stable_version_id,
                step_index=1,
                weight=50,
                reason="candidate healthy over 40 requests: step 1 at 50%",
                figures={"requests": 40, "error_rate": 0.025, "p95_ms": 81.5},
            )
            # The decision (for the feed) and the gateway's state once it applied it.
            await bus.publish(RELEASE_PROMOTE, promote)
            await bus.publish(ROUTE_CHANGED, _applied(route, promote, time.time()))
            # The same page, no reload: the new step, its decision with the figures, the
            # event in the list and the split chart following the weight.
            assert await page.until(f"{_release_text(alias, '.weight')} === '50%'")
            assert await page.evaluate(_release_text(alias, ".step")) == "1"
            decision = await page.until(_release_text(alias, ".decisions li"))
            assert "step 1 at 50%" in decision
            assert "p95_ms" in decision
            assert await page.until(
                "[...document.querySelectorAll('#events li')].some(e => "
                "e.dataset.subject === 'release.promote' && e.textContent.includes("
                f"'{alias}'))"
            )
            assert await page.evaluate("window.notReloaded === true")
            # One more tick draws the split chart at 50% before the picture is kept.
            updated = await page.evaluate("document.getElementById('updated').textContent")
            await page.until(f"document.getElementById('updated').textContent !== {updated!r}")
            assert await page.evaluate(f"document.querySelectorAll('{charts} figure').length") == 5
            feedback_lines = await page.evaluate(
                f"[...document.querySelectorAll('{charts} figure')]"
                ".find(f => f.textContent.includes('feedback mean'))"
                ".querySelectorAll('path.line').length"
            )
            assert feedback_lines == 2
            shot = await page.call(
                "Page.captureScreenshot", format="png", captureBeyondViewport=True
            )
            SCREENSHOT.parent.mkdir(exist_ok=True)
            SCREENSHOT.write_bytes(base64.b64decode(shot["data"]))
            assert page.script_errors == []
    finally:
        traffic.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await traffic
    assert SCREENSHOT.stat().st_size > 10_000


@pytest.mark.integration
async def test_dashboard_state_and_stream_over_http(monitor: MonitorService, bus: EventBus) -> None:
    alias = f"faq-{uuid.uuid4().hex[:4]}"
    started = _started(alias)
    await bus.publish(RELEASE_STARTED, started)
    await bus.publish(ROUTE_CHANGED, _route(started))
    base = f"http://127.0.0.1:{monitor.metrics_port}"
    # Live traffic: the dashboard's result consumer takes results from when it is bound.
    traffic = asyncio.create_task(_traffic(bus, started, []))
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/dashboard/stream") as stream:
                assert stream.headers["Content-Type"] == "text/event-stream"
                kinds: list[str] = []
                snapshot: dict[str, Any] | None = None
                got_release_tick = got_feed = False
                async with asyncio.timeout(20):
                    async for raw in stream.content:
                        line = raw.decode().strip()
                        if line.startswith("event: "):
                            kinds.append(line.removeprefix("event: "))
                            continue
                        if not line.startswith("data: "):
                            continue
                        data = json.loads(line.removeprefix("data: "))
                        if kinds[-1] == "snapshot":
                            snapshot = data
                            got_feed = any(e["alias"] == alias for e in data["events"])
                        elif kinds[-1] == "feed":
                            got_feed = got_feed or data["alias"] == alias
                        elif kinds[-1] == "tick":
                            got_release_tick = got_release_tick or (
                                any(v["alias"] == alias for v in data["versions"])
                                and any(r["alias"] == alias for r in data["releases"])
                            )
                        if got_release_tick and got_feed:
                            break
                assert kinds[0] == "snapshot"
                assert snapshot is not None
                assert {"releases", "alerts", "events", "versions", "splits"} <= snapshot.keys()
            state = await _state(monitor)
            release = next(r for r in state["releases"] if r["alias"] == alias)
            assert release["state"] == "running"
            assert (release["step_index"], release["weight"]) == (0, 10)
            assert release["steps"] == [10, 50, 100]
            assert any(
                e["subject"] == "release.started" and e["alias"] == alias for e in state["events"]
            )
            version = next(
                v
                for v in state["versions"]
                if (v["alias"], v["version_id"]) == (alias, "ver_stable")
            )
            assert version["points"][-1]["p95_ms"] > 0
            async with http.get(f"{base}/dashboard") as page:
                html = await page.text()
                assert page.status == 200
                # Server-rendered: the release is in the HTML before any script runs.
                assert f'data-alias="{alias}"' in html
                assert "/dashboard/static/dashboard.js?v=" in html
            async with http.get(f"{base}/dashboard/static/dashboard.js") as script:
                assert script.status == 200
            async with http.get(f"{base}/", allow_redirects=False) as root:
                assert (root.status, root.headers["Location"]) == (302, "/dashboard")
            async with http.get(f"{base}/metrics") as metrics:
                assert "ftops_monitor_release_weight" in await metrics.text()
    finally:
        traffic.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await traffic


# -- the state behind the page, without servers -----------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _offline_monitor(clock: FakeClock) -> Monitor:
    # Never started: these tests publish nothing.
    bus = EventBus("nats://127.0.0.1:1", service="test", instance="t")
    return Monitor(bus, window_s=3.0, clock=clock)


def _result(
    started: events_pb2.ReleaseStarted, arm: str, at: float, ok: bool = True
) -> events_pb2.RequestResult:
    candidate = arm == "candidate"
    result = events_pb2.RequestResult(
        request_id=uuid.uuid4().hex,
        alias=started.alias,
        version_id=started.candidate_version_id if candidate else started.stable_version_id,
        arm=arm,
        latency_ms=40.0,
        status="OK" if ok else "UNAVAILABLE",
        release_id=started.release_id,
    )
    result.finished_at.FromNanoseconds(int(at * 1e9))
    return result


def test_history_takes_per_second_rates_and_stays_bounded() -> None:
    clock = FakeClock()
    monitor = _offline_monitor(clock)
    started = _started("bounded")
    started.meta.occurred_at.FromNanoseconds(int(clock.now * 1e9))
    monitor.apply_route_changed(_route(started))
    history = History(monitor, history_s=5.0, interval_s=1.0, latency_window_s=3.0)
    history.sample(clock.now)  # where the first interval begins

    clock.now += 1
    results = [_result(started, "stable", clock.now, ok=i >= 2) for i in range(8)]
    results += [_result(started, "candidate", clock.now) for _ in range(2)]
    stale = _result(started, "stable", clock.now - 120)  # from a consumer's backlog
    client_fault = _result(started, "stable", clock.now)
    client_fault.status = "INVALID_ARGUMENT"
    history.ingest([*results, stale, client_fault], clock.now)
    versions, splits = history.sample(clock.now)
    points = {key[1]: p for key, p in versions}
    assert points["ver_stable"].rps == 8
    assert points["ver_stable"].error_rate == 0.25
    assert points["ver_canary"].error_rate == 0
    assert points["ver_stable"].p95_ms == 40.0
    assert [(s.weight, s.observed) for _, s in splits] == [(10.0, 20.0)]

    # No traffic: a zero rate and no error rate while latencies are in their window...
    clock.now += 1
    versions, _ = history.sample(clock.now)
    assert {key[1]: (p.rps, p.error_rate) for key, p in versions} == {
        "ver_stable": (0.0, None),
        "ver_canary": (0.0, None),
    }
    # ...then nothing once it is empty, and the series goes after history_s.
    for _ in range(12):
        clock.now += 1
        history.sample(clock.now)
        assert all(len(ring) <= 5 for ring in history.versions.values())
        assert all(len(ring) <= 5 for ring in history.splits.values())
    assert history.versions == {}
    assert len(history.splits["bounded"]) == 5  # the running release keeps its line


def test_split_follows_the_steps_and_ends_with_the_release() -> None:
    clock = FakeClock()
    monitor = _offline_monitor(clock)
    started = _started("steps")
    started.meta.occurred_at.FromNanoseconds(int(clock.now * 1e9))
    route = _route(started)
    monitor.apply_route_changed(route)
    history = History(monitor, history_s=60.0)
    history.sample(clock.now)
    clock.now += 1
    history.sample(clock.now)
    promote = events_pb2.ReleasePromote(
        meta=new_meta("monitor", "t"), release_id=started.release_id, step_index=1, weight=50
    )
    route = _applied(route, promote, clock.now)
    monitor.apply_route_changed(route)
    clock.now += 1
    history.sample(clock.now)
    rollback = events_pb2.ReleaseRollback(
        meta=new_meta("monitor", "t"), release_id=started.release_id
    )
    monitor.apply_route_changed(_applied(route, rollback, clock.now))
    for _ in range(3):
        clock.now += 1
        history.sample(clock.now)
    assert [(p.weight, p.state) for p in history.splits["steps"]] == [
        (10.0, "running"),
        (50.0, "running"),
        (0.0, "rolled_back"),  # one point shows how it ended; then the line stops
    ]


def test_feed_is_idempotent_ordered_and_bounded() -> None:
    feed = EventFeed(limit=3)
    release_id = "rel_feed"
    older = events_pb2.ReleasePromote(
        meta=new_meta("monitor", "t"),
        release_id=release_id,
        alias="feed",
        step_index=1,
        weight=50,
        reason="healthy",
        figures={"requests": 20, "errors_log_lr": math.inf},
    )
    older.meta.occurred_at.FromSeconds(100)
    newer = events_pb2.ReleaseRollback(
        meta=new_meta("monitor", "t"), release_id=release_id, alias="feed", reason="errors"
    )
    newer.meta.occurred_at.FromSeconds(200)
    assert feed.add(summarise(RELEASE_ROLLBACK, newer))
    assert feed.add(summarise(RELEASE_PROMOTE, older))
    assert not feed.add(summarise(RELEASE_PROMOTE, older))  # redelivered
    assert [i.subject for i in feed.items()] == [RELEASE_PROMOTE, RELEASE_ROLLBACK]
    assert feed.items()[0].text == "promote, step 1 at 50%: healthy"
    # JSON has no infinity: a diverged statistic is sent as missing.
    assert feed.items()[0].as_json()["figures"] == {"errors_log_lr": None, "requests": 20.0}
    assert [d.level for d in feed.decisions(release_id)] == ["good", "bad"]
    for second in range(300, 305):
        alert = events_pb2.Alert(
            meta=new_meta("monitor", "t"),
            rule="error_rate",
            alias="feed",
            version_id="v",
            state="firing",
            message="error rate 30% above 10%",
        )
        alert.meta.occurred_at.FromSeconds(second)
        feed.add(summarise(MONITOR_ALERT, alert))
    assert [i.at for i in feed.items()] == [302, 303, 304]
    # A release's decisions outlive the general list.
    assert len(feed.decisions(release_id)) == 2


async def test_a_page_that_falls_behind_is_dropped() -> None:
    dashboard = Dashboard(_offline_monitor(FakeClock()))
    slow = dashboard.connect()
    for _ in range(CLIENT_BACKLOG + 1):
        dashboard.sample()
    assert slow not in dashboard.clients
    # Its stream ends; the browser's EventSource reconnects and gets a fresh snapshot.
    assert slow.queue.get_nowait() is None


async def test_stopping_the_server_ends_open_streams() -> None:
    clock = FakeClock()
    monitor = _offline_monitor(clock)
    monitor.apply_route_changed(_route(_started("stop")))
    server = MetricsServer(
        prometheus_registry(monitor), "127.0.0.1", 0, dashboard=Dashboard(monitor)
    )
    port = await server.start()
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/dashboard/stream") as stream,
    ):
        assert await stream.content.readline() == b"event: snapshot\n"
        snapshot = json.loads((await stream.content.readline()).removeprefix(b"data: "))
        assert [r["alias"] for r in snapshot["releases"]] == ["stop"]
        # A shutdown does not wait for the page to go away.
        await asyncio.wait_for(server.stop(), 5)
        rest = await asyncio.wait_for(stream.content.read(), 5)
        assert b"event: snapshot" not in rest


def test_page_escapes_what_events_carry() -> None:
    decision = {"at": 1.0, "level": "bad", "text": "<script>x</script>", "figures": {"z": None}}
    release = {
        "alias": "a<b",
        "release_id": "rel",
        "strategy": "canary",
        "state": "running",
        "paused": True,
        "step_index": 0,
        "steps": [10, 100],
        "weight": 10,
        "stable_version_id": "s",
        "candidate_version_id": "c",
        "step_seconds": 1.0,
        "verdict": "",
        "last_decision": "rollback",
        "last_reason": "<b>",
        "checks": [],
        "figures": {},
        "decisions": [decision],
    }
    html = render_page(
        {
            "releases": [release],
            "alerts": [],
            "events": [],
            "history_s": 900,
            "window_s": 60,
            "latency_window_s": 10,
        }
    )
    assert "<script>x" not in html
    assert "&lt;script&gt;x" in html
    assert 'data-alias="a&lt;b"' in html
    assert '<span class="badge state">paused</span>' in html
    assert "<b>z</b> -" in html  # a figure JSON could not carry


@pytest.mark.parametrize(
    ("subject", "event", "text", "level"),
    [
        (
            ADAPTER_LOADED,
            events_pb2.AdapterLoaded(version_id="ver_2", replica_id="r1", load_seconds=0.25),
            "ver_2 loaded on r1 in 0.25 s",
            "info",
        ),
        (
            ADAPTER_REJECTED,
            events_pb2.AdapterRejected(
                adapter="bot", version_number=3, reasons=["retention 0.2 below 0.95"]
            ),
            "bot v3 rejected: retention 0.2 below 0.95",
            "bad",
        ),
        (
            ADAPTER_RETIRED,
            events_pb2.AdapterRetired(version_id="ver_1", reason="rolled back"),
            "ver_1 retired: rolled back",
            "info",
        ),
        (
            RELEASE_PAUSED,
            events_pb2.ReleasePaused(alias="bot", actor="alice", reason="investigating"),
            "paused by alice: investigating",
            "warn",
        ),
    ],
)
def test_events_are_summarised_in_a_line(
    subject: str, event: Message, text: str, level: str
) -> None:
    item = summarise(subject, event)
    assert (item.text, item.level, item.subject) == (text, level, subject)
