"""The monitor's live dashboard in headless Chromium: a real monitor on real NATS and a
real registry (which names the versions), the gateway's route.changed, release events and
request results published on NATS, the page driven over the Chrome DevTools protocol at
1400x1000. The browser test keeps a screenshot at test-artifacts/dashboard.png, and one
taken as a person would (``chromium --headless --screenshot --virtual-time-budget``) at
test-artifacts/dashboard-cli.png."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import math
import os
import shutil
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

from ftops.common.v1 import common_pb2
from ftops.events.v1 import events_pb2
from ftops.registry.v1 import registry_pb2, registry_pb2_grpc
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
from ftops_registry.app import RegistryApp
from ftops_registry.settings import RegistrySettings
from ftops_runtime.bus import EventBus
from ftops_runtime.client import channel
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
CLI_SCREENSHOT = REPO / "test-artifacts" / "dashboard-cli.png"
# The size the reader used; the page must fit it without scrolling sideways.
VIEWPORT = (1400, 1000)
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
async def registry(tmp_path: Path, own_nats_url: str) -> AsyncIterator[RegistryApp]:
    """The registry the monitor asks for version names (alias:vN on the charts)."""
    app = RegistryApp(
        RegistrySettings(
            grpc_port=0,
            nats_url=own_nats_url,
            database_url=f"sqlite:///{tmp_path}/registry.db",
            artifact_dir=tmp_path / "artifacts",
            shutdown_grace_s=0.5,
            instance_id=f"reg-{uuid.uuid4().hex[:6]}",
            auth_mode="disabled",
        ),
        durable=f"registry-dash-{uuid.uuid4().hex[:8]}",
    )
    await app.start()
    await app.wait_ready()
    yield app
    await app.stop()


@pytest.fixture
async def monitor(own_nats_url: str, registry: RegistryApp) -> AsyncIterator[MonitorService]:
    settings = MonitorSettings(
        grpc_port=0,
        nats_url=own_nats_url,
        instance_id=f"mon-{uuid.uuid4().hex[:6]}",
        analysis_interval_s=0.1,
        shutdown_grace_s=0.5,
        metrics_port=0,
        # Access control off: the dashboard itself is tested here; its keys and per-team
        # views in tests/integration/test_monitor_http_access.py.
        dev_mode=True,
        registry_address=registry.address,
        registry_timeout_s=2.0,
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


def _started(
    alias: str, stable: str = "ver_stable", candidate: str = "ver_canary"
) -> events_pb2.ReleaseStarted:
    return events_pb2.ReleaseStarted(
        meta=new_meta("gateway", "test"),
        release_id=f"rel_{uuid.uuid4().hex[:8]}",
        alias=alias,
        stable_version_id=stable,
        candidate_version_id=candidate,
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


async def _register(registry: RegistryApp, versions: dict[str, int]) -> dict[str, list[str]]:
    """``count`` versions of each adapter, numbered 1..count; their ids per adapter."""
    blob = b"\x00" * 64
    files = [
        common_pb2.ArtifactFile(
            path="adapter_model.safetensors",
            sha256=hashlib.sha256(blob).hexdigest(),
            size_bytes=len(blob),
        )
    ]

    async def upload() -> AsyncIterator[registry_pb2.UploadArtifactRequest]:
        yield registry_pb2.UploadArtifactRequest(header=registry_pb2.UploadHeader(files=files))
        yield registry_pb2.UploadArtifactRequest(
            chunk=registry_pb2.FileChunk(file_index=0, data=blob)
        )

    ids: dict[str, list[str]] = {}
    async with channel(registry.address) as ch:
        stub = registry_pb2_grpc.RegistryServiceStub(ch)
        base = f"tiny-{uuid.uuid4().hex[:6]}"
        await stub.RegisterBaseModel(
            registry_pb2.RegisterBaseModelRequest(
                name=base, fingerprint=hashlib.sha256(base.encode()).hexdigest(), uri="/m"
            )
        )
        artifact = await stub.UploadArtifact(upload())
        for adapter, count in versions.items():
            for _ in range(count):
                version = await stub.RegisterVersion(
                    registry_pb2.RegisterVersionRequest(
                        adapter=adapter, base_model=base, artifact_id=artifact.artifact_id
                    )
                )
                ids.setdefault(adapter, []).append(version.version_id)
    return ids


async def _direct_traffic(bus: EventBus, version_ids: list[str], failing: str) -> None:
    """Requests sent straight to version ids (no alias; ``failing`` fails every one) and
    to the base model, a batch every 200 ms."""
    while True:
        batch = events_pb2.RequestResultBatch(meta=new_meta("gateway", "test"))
        for version_id in ["", *version_ids]:
            for i in range(2):
                result = batch.results.add(
                    request_id=uuid.uuid4().hex,
                    version_id=version_id,
                    arm="direct" if version_id else "base",
                    latency_ms=30.0 + i,
                    completion_tokens=8,
                    status="INTERNAL" if version_id == failing else "OK",
                )
                result.finished_at.GetCurrentTime()
        await bus.publish(METRICS_REQUESTS, batch)
        await asyncio.sleep(0.2)


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


# Figures a real promote decision carries (the analysis's): a long line in its card.
DECISION_FIGURES = {
    "requests": 40,
    "error_rate": 0.025,
    "p95_ms": 81.5,
    "stable_error_rate": 0.04,
    "stable_p95_ms": 62.25,
    "errors_log_lr": -3.2,
    "errors_threshold": 2.9,
    "latency_p_value": 0.41,
    "feedback_mean": 0.7,
    "stable_feedback_mean": 0.85,
    "feedback_p_value": 0.12,
    "divergence": 0.031,
    "samples": 40,
    "eval_retention": 0.97,
    "stable_eval_retention": 0.96,
}
# In the page: whether the document is wider than the window (it would scroll sideways).
OVERFLOW = "document.documentElement.scrollWidth - document.documentElement.clientWidth"
# In the page: how many pixels the events list's numbers lack (> 0: clipped). The marker
# of the last item, the widest, is measured in the list's own font.
MARKER_SHORTFALL = """(() => {
    const list = document.querySelector('#events ol');
    const items = list.querySelectorAll('li');
    const style = getComputedStyle(items[items.length - 1]);
    const ctx = document.createElement('canvas').getContext('2d');
    ctx.font = `${style.fontSize} ${style.fontFamily}`;
    const marker = ctx.measureText(`${items.length}. `).width;
    return marker - parseFloat(getComputedStyle(list).paddingLeft);
})()"""


def _group(name: str) -> str:
    return f'.alias-charts[data-alias="{name}"]'


def _legend(name: str) -> str:
    """In the page: the group's legend, [label, colour] per line."""
    return (
        f"[...document.querySelectorAll('{_group(name)} > .legend span')]"
        ".map(s => [s.textContent, s.querySelector('i').style.borderColor])"
    )


def _y_ticks(name: str, title: str) -> str:
    """In the page: the y axis labels of the group's chart ``title``, bottom to top."""
    return (
        f"[...[...document.querySelectorAll('{_group(name)} figure')]"
        f".find(f => f.querySelector('.title').textContent === '{title}')"
        ".querySelectorAll('.tick.y')].map(t => t.textContent)"
    )


@pytest.mark.integration
async def test_dashboard_shows_a_canary_and_updates_live(
    monitor: MonitorService, registry: RegistryApp, bus: EventBus
) -> None:
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium binary (apt-get install chromium, or set FTOPS_CHROMIUM)")
    alias = f"support-bot-{uuid.uuid4().hex[:4]}"
    direct = f"direct-bot-{uuid.uuid4().hex[:4]}"
    ids = await _register(registry, {alias: 2, direct: 12})
    started = _started(alias, *ids[alias])
    route = _route(started)
    await bus.publish(RELEASE_STARTED, started)
    await bus.publish(ROUTE_CHANGED, route)
    # Replicas loading the versions used directly: more than ten events to number.
    for version_id in ids[direct]:
        loaded = events_pb2.AdapterLoaded(
            meta=new_meta("inference", "r1"), version_id=version_id, replica_id="r1"
        )
        await bus.publish(ADAPTER_LOADED, loaded)
    served: list[events_pb2.RequestResult] = []
    traffic = [
        asyncio.create_task(_traffic(bus, started, served)),
        # Straight to twelve versions of another adapter (the last fails every request)
        # and to the base model.
        asyncio.create_task(_direct_traffic(bus, ids[direct], failing=ids[direct][-1])),
    ]
    url = f"http://127.0.0.1:{monitor.metrics_port}/dashboard"
    try:
        async with headless_page(binary) as page:
            await page.call("Page.enable")
            await page.call("Runtime.enable")
            width, height = VIEWPORT
            await page.call(
                "Emulation.setDeviceMetricsOverride",
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=False,
            )
            await page.call("Page.navigate", url=url)
            # The running canary at its first step (counted from 1, as the CLI does), its
            # versions by name, and the page current.
            assert await page.until(f"{_release_text(alias, '.state')} === 'running'")
            assert await page.until(f"{_release_text(alias, '.weight')} === '10%'")
            assert await page.evaluate(_release_text(alias, ".step")) == "1/3"
            assert await page.until(f"{_release_text(alias, '.versions')}.includes('{alias}:v2')")
            assert f"{alias}:v1" in await page.evaluate(_release_text(alias, ".versions"))
            assert await page.until("document.getElementById('connection').textContent === 'live'")
            # Charts drawn from the sampled history: a line per version in each chart.
            charts = _group(alias)
            lines = await page.until(
                f"document.querySelectorAll('{charts} path.line').length >= 8 && "
                f"document.querySelectorAll('{charts} path.line').length"
            )
            assert lines >= 8
            assert await _rate_answers(monitor, served) == 20
            # The stable's error rate above the alert threshold: listed while it fires,
            # the version by name.
            alert = await page.until(
                "[...document.querySelectorAll('#alerts .alert')].map(a => a.textContent)"
                f".find(t => t.includes('{alias}:v1'))"
            )
            assert "error_rate" in alert
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
                figures=DECISION_FIGURES,
            )
            # The decision (for the feed) and the gateway's state once it applied it.
            await bus.publish(RELEASE_PROMOTE, promote)
            await bus.publish(ROUTE_CHANGED, _applied(route, promote, time.time()))
            # The same page, no reload: the new step, its decision with the figures, the
            # event in the list and the split chart following the weight.
            assert await page.until(f"{_release_text(alias, '.weight')} === '50%'")
            assert await page.evaluate(_release_text(alias, ".step")) == "2/3"
            decision = await page.until(_release_text(alias, ".decisions li"))
            assert "step 1 at 50%" in decision
            assert "p95_ms" in decision
            assert await page.until(
                "[...document.querySelectorAll('#events li')].some(e => "
                "e.dataset.subject === 'release.promote' && e.textContent.includes("
                f"'{alias}'))"
            )
            assert await page.evaluate("window.notReloaded === true")
            # One more update draws the split chart at 50% before the picture is kept.
            updated = await page.evaluate("document.getElementById('updated').textContent")
            await page.until(f"document.getElementById('updated').textContent !== {updated!r}")
            assert await page.evaluate(f"document.querySelectorAll('{charts} figure').length") == 5
            feedback_lines = await page.evaluate(
                f"[...document.querySelectorAll('{charts} figure')]"
                ".find(f => f.textContent.includes('feedback mean'))"
                ".querySelectorAll('path.line').length"
            )
            assert feedback_lines == 2

            # Readable at 1400x1000. Series by alias, named alias:vN (the registry's
            # numbers), the released alias first, one legend line per version.
            await page.until(f"{_legend(direct)}.length === 12")
            groups = await page.evaluate(
                "[...document.querySelectorAll('.alias-charts')].map(g => g.dataset.alias)"
            )
            assert groups[0] == alias
            assert groups.index(direct) < groups.index("base model") == len(groups) - 1
            assert [label for label, _ in await page.evaluate(_legend(alias))] == [
                f"{alias}:v1",
                f"{alias}:v2",
            ]
            direct_legend = await page.evaluate(_legend(direct))
            assert [label for label, _ in direct_legend] == [
                f"{direct}:v{n} direct" for n in range(1, 13)
            ]
            # No two lines of a group share a colour.
            assert len({color for _, color in direct_legend}) == 12
            assert [label for label, _ in await page.evaluate(_legend("base model"))] == [
                "base model"
            ]
            # A version failing every request: its error rate's axis ends at 100%.
            assert (await page.evaluate(_y_ticks(direct, "error rate")))[-1] == "100%"
            # Nothing wider than the window, and every event's number whole.
            assert await page.evaluate(OVERFLOW) == 0
            assert await page.evaluate("document.querySelectorAll('#events li').length") >= 12
            assert await page.evaluate(MARKER_SHORTFALL) <= 0
            shot = await page.call(
                "Page.captureScreenshot", format="png", captureBeyondViewport=True
            )
            SCREENSHOT.parent.mkdir(exist_ok=True)
            SCREENSHOT.write_bytes(base64.b64decode(shot["data"]))
            assert page.script_errors == []
        # A person's screenshot tool: it ends once the page's virtual time has run.
        await _cli_screenshot(binary, url, alias)
    finally:
        for task in traffic:
            task.cancel()
        await asyncio.gather(*traffic, return_exceptions=True)
    assert SCREENSHOT.stat().st_size > 10_000


async def _chromium_cli(binary: str, url: str, *flags: str) -> bytes:
    """Runs ``chromium --headless ... url`` as a person would; its output. Fails when it
    does not finish (a page whose requests never end stops virtual time)."""
    profile = tempfile.mkdtemp(prefix="ftops-chromium-")
    width, height = VIEWPORT
    try:
        process = await asyncio.create_subprocess_exec(
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            "--virtual-time-budget=5000",
            *flags,
            url,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            preexec_fn=die_with_parent(),
        )
        try:
            out, _ = await asyncio.wait_for(process.communicate(), 60)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise AssertionError(f"chromium {' '.join(flags)} never finished") from None
        assert process.returncode == 0
        return out
    finally:
        shutil.rmtree(profile, ignore_errors=True)


async def _cli_screenshot(binary: str, url: str, alias: str) -> None:
    """A screenshot tool's picture, and the page it took: the charts drawn in the virtual
    time given (the page's updates let it run)."""
    dom = (await _chromium_cli(binary, url, "--dump-dom")).decode()
    assert f'class="alias-charts" data-alias="{alias}"' in dom
    assert "<svg" in dom
    CLI_SCREENSHOT.unlink(missing_ok=True)
    await _chromium_cli(binary, url, f"--screenshot={CLI_SCREENSHOT}")
    assert CLI_SCREENSHOT.stat().st_size > 10_000


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
            # A polling page's next answer: only the points taken since, no event list
            # when it did not change; a since that is no number is refused.
            async with http.get(
                f"{base}/dashboard/state",
                params={"since": str(state["now"]), "events": state["events_revision"]},
            ) as response:
                later = await response.json()
            assert all(p["t"] > state["now"] for v in later["versions"] for p in v["points"])
            assert "events" not in later or later["events_revision"] != state["events_revision"]
            async with http.get(f"{base}/dashboard/state?since=soon") as response:
                assert response.status == 400
                assert "since must be a finite number" in await response.text()
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
