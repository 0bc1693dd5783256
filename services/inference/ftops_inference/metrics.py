"""Per-version serving metrics through OpenTelemetry (exported when FTOPS_OTLP_ENDPOINT is
set), plus the same counts kept in process for ListAdapters and announcements."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from opentelemetry import metrics

_meter = metrics.get_meter("ftops.inference")
_requests = _meter.create_counter(
    "ftops.inference.requests", unit="{request}", description="Generations by version and outcome"
)
_tokens = _meter.create_counter(
    "ftops.inference.tokens", unit="{token}", description="Prompt and completion tokens"
)
_ttft = _meter.create_histogram(
    "ftops.inference.ttft", unit="s", description="Time to the first token"
)
_latency = _meter.create_histogram(
    "ftops.inference.latency", unit="s", description="Whole generation time"
)
_adapter_events = _meter.create_counter(
    "ftops.inference.adapter_events",
    unit="{event}",
    description="Adapter loads, on-demand reloads, evictions and unloads",
)


@dataclass
class VersionCounts:
    requests: int = 0
    errors: int = 0
    completion_tokens: int = 0


@dataclass
class ServingMetrics:
    by_version: dict[str, VersionCounts] = field(default_factory=dict)
    adapter_events: Counter[tuple[str, str]] = field(default_factory=Counter)

    def _counts(self, version: str) -> VersionCounts:
        return self.by_version.setdefault(version, VersionCounts())

    def request_done(
        self,
        version: str,
        *,
        outcome: str,
        prompt_tokens: int,
        completion_tokens: int,
        ttft_s: float | None,
        latency_s: float,
    ) -> None:
        attrs = {"version": version or "base", "outcome": outcome}
        _requests.add(1, attrs)
        counts = self._counts(version)
        counts.requests += 1
        if outcome != "ok":
            counts.errors += 1
        counts.completion_tokens += completion_tokens
        version_attr = {"version": version or "base"}
        _tokens.add(prompt_tokens, {**version_attr, "kind": "prompt"})
        _tokens.add(completion_tokens, {**version_attr, "kind": "completion"})
        if ttft_s is not None:
            _ttft.record(ttft_s, version_attr)
        _latency.record(latency_s, attrs)

    def adapter_event(self, version: str, event: str) -> None:
        """``event``: load, reload, evict, unload."""
        _adapter_events.add(1, {"version": version, "event": event})
        self.adapter_events[(version, event)] += 1
