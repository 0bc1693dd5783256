"""Per-version serving metrics through OpenTelemetry (exported when FTOPS_OTLP_ENDPOINT is
set), plus the same counts kept in process for ListAdapters and announcements."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from opentelemetry import metrics


@dataclass
class VersionCounts:
    requests: int = 0
    errors: int = 0
    completion_tokens: int = 0


class _Instruments:
    def __init__(self, meter: metrics.Meter) -> None:
        self.requests = meter.create_counter(
            "ftops.inference.requests",
            unit="{request}",
            description="Generations by version and outcome",
        )
        self.tokens = meter.create_counter(
            "ftops.inference.tokens", unit="{token}", description="Prompt and completion tokens"
        )
        self.ttft = meter.create_histogram(
            "ftops.inference.ttft", unit="s", description="Time to the first token"
        )
        self.latency = meter.create_histogram(
            "ftops.inference.latency", unit="s", description="Whole generation time"
        )
        self.adapter_events = meter.create_counter(
            "ftops.inference.adapter_events",
            unit="{event}",
            description="Adapter loads, on-demand reloads, evictions and unloads",
        )


@dataclass
class ServingMetrics:
    """``meter``: the process's meter provider's unless a test hands in its own."""

    meter: metrics.Meter | None = None
    by_version: dict[str, VersionCounts] = field(default_factory=dict)
    adapter_events: Counter[tuple[str, str]] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._otel = _Instruments(self.meter or metrics.get_meter("ftops.inference"))

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
        otel = self._otel
        otel.requests.add(1, attrs)
        counts = self._counts(version)
        counts.requests += 1
        # A best-effort request dropped for a user's is the replica's choice, not an error.
        if outcome not in ("ok", "dropped"):
            counts.errors += 1
        counts.completion_tokens += completion_tokens
        version_attr = {"version": version or "base"}
        otel.tokens.add(prompt_tokens, {**version_attr, "kind": "prompt"})
        otel.tokens.add(completion_tokens, {**version_attr, "kind": "completion"})
        if ttft_s is not None:
            otel.ttft.record(ttft_s, version_attr)
        otel.latency.record(latency_s, attrs)

    def adapter_event(self, version: str, event: str) -> None:
        """``event``: load, reload, evict, unload."""
        self._otel.adapter_events.add(1, {"version": version, "event": event})
        self.adapter_events[(version, event)] += 1
