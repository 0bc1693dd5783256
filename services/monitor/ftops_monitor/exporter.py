"""Per-version figures, release state and active alerts for Prometheus and OpenTelemetry.

Both read the monitor's state when they are collected (a scrape, an OTel export), so the
request path pays nothing for them: a result costs one counter increment in the monitor.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from aiohttp import web
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ftops_monitor.http_access import HttpAccess, caller_of
from ftops_monitor.monitor import Monitor
from ftops_monitor.visibility import Sees, TeamView, everything, monitor_pairs
from ftops_monitor.windows import Figures

if TYPE_CHECKING:
    from ftops_monitor.dashboard import Dashboard

log = logging.getLogger(__name__)

# (metric suffix, help, value of the window's figures)
WINDOW_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("requests", "Results in the sliding window.", "requests"),
    ("error_rate", "Error rate (0..1) in the sliding window.", "error_rate"),
    ("latency_p50_ms", "Median latency of successful requests, ms.", "latency_p50_ms"),
    ("latency_p95_ms", "p95 latency of successful requests, ms.", "latency_p95_ms"),
    ("latency_p99_ms", "p99 latency of successful requests, ms.", "latency_p99_ms"),
    ("ttft_p50_ms", "Median time to first token, ms.", "ttft_p50_ms"),
    ("tokens_per_second", "Completion tokens per second of generation.", "tokens_per_second"),
    ("feedback_mean", "Mean user feedback score (0..1) in the window.", "feedback_mean"),
    ("feedback_count", "Feedback scores in the window.", "feedback_count"),
    ("divergence_mean", "Mean shadow output divergence (0..1).", "divergence_mean"),
)
RELEASE_STATES = ("running", "paused", "promoted", "rolled_back")


def _window_values(monitor: Monitor) -> Iterator[tuple[str, str, Figures]]:
    for alias, version_id in monitor.stats.keys(None):
        yield alias, version_id, monitor.window_figures(alias, version_id)


class MonitorCollector(Collector):
    """A Prometheus collector over the monitor's live state: the series ``sees`` lets
    through (one scraper's teams), all of them by default."""

    def __init__(self, monitor: Monitor, sees: Sees = everything) -> None:
        self.monitor = monitor
        self.sees = sees

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        m, sees = self.monitor, self.sees
        version = ["alias", "version"]
        gauges = {
            name: GaugeMetricFamily(f"ftops_monitor_window_{name}", text, labels=version)
            for name, text, _ in WINDOW_GAUGES
        }
        for alias, version_id, f in _window_values(m):
            if not sees(alias, version_id):
                continue
            for name, _, attr in WINDOW_GAUGES:
                gauges[name].add_metric([alias, version_id], float(getattr(f, attr)))
        yield from gauges.values()

        results = CounterMetricFamily(
            "ftops_monitor_results",
            "Request results received, by arm and outcome (ok or error).",
            labels=["alias", "version", "arm", "outcome"],
        )
        for (alias, version_id, arm, outcome), n in sorted(m.results_total.items()):
            if not sees(alias, version_id):
                continue
            results.add_metric([alias, version_id, arm, outcome], n)
        yield results

        decisions = CounterMetricFamily(
            "ftops_monitor_decisions",
            "Release decisions published by this monitor.",
            labels=["alias", "kind"],
        )
        for (alias, kind), n in sorted(m.decisions_total.items()):
            if not sees(alias, ""):
                continue
            decisions.add_metric([alias, kind], n)
        yield decisions

        weight = GaugeMetricFamily(
            "ftops_monitor_release_weight",
            "Candidate traffic percentage of the alias's latest release.",
            labels=["alias", "release", "stable", "candidate", "strategy"],
        )
        state = GaugeMetricFamily(
            "ftops_monitor_release_state",
            "1 for the state the alias's latest release is in.",
            labels=["alias", "release", "state"],
        )
        for r in m.latest_releases():
            if not sees(r.alias, r.stable_version_id):
                continue
            weight.add_metric(
                [r.alias, r.release_id, r.stable_version_id, r.candidate_version_id, r.strategy],
                r.weight,
            )
            current = "paused" if r.running and r.paused else r.state.value
            for s in RELEASE_STATES:
                state.add_metric([r.alias, r.release_id, s], 1.0 if s == current else 0.0)
        yield weight
        yield state

        alerts = GaugeMetricFamily(
            "ftops_monitor_alert_active",
            "1 while an alert rule is firing for a version.",
            labels=["alias", "version", "rule"],
        )
        for a in m.active_alerts():
            if not sees(a.alias, a.version_id):
                continue
            alerts.add_metric([a.alias, a.version_id, a.rule], 1.0)
        yield alerts


def prometheus_registry(monitor: Monitor, sees: Sees = everything) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MonitorCollector(monitor, sees))
    return registry


def register_otel(monitor: Monitor, meter: Meter) -> None:
    """Observable gauges over the same figures, exported wherever telemetry is set up."""

    def window_callback(attr: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            return [
                Observation(float(getattr(f, attr)), {"alias": alias, "version": version_id})
                for alias, version_id, f in _window_values(monitor)
            ]

        return callback

    for name, text, attr in WINDOW_GAUGES:
        meter.create_observable_gauge(
            f"ftops.monitor.window.{name}",
            callbacks=[window_callback(attr)],
            description=text,
        )

    def release_weight(options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(float(r.weight), {"alias": r.alias, "release": r.release_id})
            for r in monitor.latest_releases()
        ]

    def active_alerts(options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(1.0, {"alias": a.alias, "version": a.version_id, "rule": a.rule})
            for a in monitor.active_alerts()
        ]

    meter.create_observable_gauge(
        "ftops.monitor.release.weight",
        callbacks=[release_weight],
        description="Candidate traffic percentage of each alias's latest release.",
    )
    meter.create_observable_gauge(
        "ftops.monitor.alert.active",
        callbacks=[active_alerts],
        description="1 while an alert rule is firing for a version.",
    )


class MetricsServer:
    """``GET /metrics`` (Prometheus text format) on ``host:port``, and the live dashboard
    (``/dashboard``) when one is given; port 0 takes a free one. With ``access`` every
    request needs a key, and a caller that is no platform admin gets only its teams'
    series (``view`` tells the teams of ``monitor``'s aliases). HTTPS with ``ssl_context``."""

    def __init__(
        self,
        registry: CollectorRegistry,
        host: str,
        port: int,
        *,
        dashboard: Dashboard | None = None,
        access: HttpAccess | None = None,
        view: TeamView | None = None,
        monitor: Monitor | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._registry = registry
        self._dashboard = dashboard
        self._access = access
        self._view = view
        self._monitor = monitor
        self._host = host
        self._port = port
        self._ssl_context = ssl_context
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _metrics(self, request: web.Request) -> web.Response:
        registry = self._registry
        caller = caller_of(request)
        if caller is not None and self._view is not None and self._monitor is not None:
            sees = await self._view.scope(caller, monitor_pairs(self._monitor))
            if sees is not everything:
                registry = prometheus_registry(self._monitor, sees)
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> int:
        app = web.Application()
        if self._access is not None:
            self._access.mount(app)
        app.router.add_get("/metrics", self._metrics)
        if self._dashboard is not None:
            self._dashboard.mount(app)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, ssl_context=self._ssl_context)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        scheme = "https" if self._ssl_context is not None else "http"
        log.info("metrics on %s://%s:%d/metrics", scheme, self._host, self.port)
        if self._dashboard is not None:
            log.info("dashboard on %s://%s:%d/dashboard", scheme, self._host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
