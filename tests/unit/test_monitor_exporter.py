"""Prometheus and OpenTelemetry views of the monitor's state."""

from __future__ import annotations

from typing import Any, cast

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import generate_latest

from ftops.events.v1 import events_pb2
from ftops_monitor.alerts import AlertRules
from ftops_monitor.exporter import prometheus_registry, register_otel
from ftops_monitor.monitor import Monitor
from ftops_runtime.bus import EventBus


class _Bus:
    service = "monitor"
    instance = "t"

    async def publish(self, subject: str, event: Any, **_: Any) -> None:
        pass


def _monitor() -> Monitor:
    monitor = Monitor(
        cast(EventBus, _Bus()),
        window_s=1e9,
        clock=lambda: 1002.0,
        alert_rules=AlertRules(error_rate_above=0.1, for_s=0, min_requests=1),
    )
    started = events_pb2.RouteChanged(
        alias="bot",
        revision=1,
        release=events_pb2.ReleaseSnapshot(
            release_id="rel_1",
            state="running",
            stable_version_id="ver_s",
            candidate_version_id="ver_c",
            steps=[5, 100],
            candidate_weight=5,
        ),
    )
    started.release.started_at.FromSeconds(1000)
    monitor.apply_route_changed(started)
    results = []
    for i, status in enumerate(["OK", "OK", "OK", "INTERNAL"]):
        r = events_pb2.RequestResult(
            request_id=f"r{i}",
            alias="bot",
            version_id="ver_c",
            arm="candidate",
            latency_ms=100.0 + i,
            status=status,
        )
        r.finished_at.FromSeconds(1001)
        results.append(r)
    monitor.ingest(results)
    return monitor


async def test_prometheus_exposition() -> None:
    monitor = _monitor()
    await monitor.analyze_once()  # fires the error-rate alert (25%)
    text = generate_latest(prometheus_registry(monitor)).decode()
    assert 'ftops_monitor_window_requests{alias="bot",version="ver_c"} 4.0' in text
    assert 'ftops_monitor_window_error_rate{alias="bot",version="ver_c"} 0.25' in text
    errors = 'ftops_monitor_results_total{alias="bot",arm="candidate",outcome="error",'
    assert f'{errors}version="ver_c"}} 1.0' in text
    assert 'ftops_monitor_release_weight{alias="bot",candidate="ver_c"' in text
    assert 'ftops_monitor_release_state{alias="bot",release="rel_1",state="running"} 1.0' in text
    assert 'ftops_monitor_alert_active{alias="bot",rule="error_rate",version="ver_c"} 1.0' in text


def test_opentelemetry_gauges() -> None:
    monitor = _monitor()
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    register_otel(monitor, provider.get_meter("test"))
    data = reader.get_metrics_data()
    assert data is not None
    points: dict[str, list[Any]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points[metric.name] = list(metric.data.data_points)
    [requests] = points["ftops.monitor.window.requests"]
    assert requests.value == 4
    assert dict(requests.attributes or {}) == {"alias": "bot", "version": "ver_c"}
    [weight] = points["ftops.monitor.release.weight"]
    assert weight.value == 5
    provider.shutdown()
