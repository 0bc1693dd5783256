"""A StartRelease request checked and completed with defaults (no I/O: version lookups
happen in the release manager)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2
from ftops_runtime.errors import InvalidArgument

DEFAULT_STEPS: tuple[int, ...] = (5, 25, 50, 100)
DEFAULT_MIN_REQUESTS = 20
DEFAULT_MAX_ERROR_RATE = 0.05
DEFAULT_MAX_LATENCY_RATIO = 3.0
DEFAULT_HOLD_SECONDS = 300.0
# Blue-green and shadow check the candidate on mirrored traffic: all of it by default.
DEFAULT_MIRROR_PERCENT = 100
# Canary judges the candidate on at least this share of the traffic while a step's weight is
# below it, the rest mirrored from stable requests: a 30%-failing candidate at a 5% first
# step is then out within 5 s at 50 req/s (docs/analysis.md).
DEFAULT_EVIDENCE_MIRROR_PERCENT = 20

CANARY = events_pb2.RELEASE_STRATEGY_CANARY
BLUE_GREEN = events_pb2.RELEASE_STRATEGY_BLUE_GREEN
SHADOW = events_pb2.RELEASE_STRATEGY_SHADOW
STRATEGY_NAMES = {CANARY: "canary", BLUE_GREEN: "blue-green", SHADOW: "shadow"}
FLAG_ARMS = ("", "candidate", "stable")


@dataclass(frozen=True)
class ReleaseSpec:
    alias: str
    candidate_version_id: str
    strategy: events_pb2.ReleaseStrategy.ValueType
    steps: list[int]
    analysis: events_pb2.AnalysisSettings
    flags: list[events_pb2.FlagRule] = field(default_factory=list)
    shadow_percent: int = 0
    sticky: bool = False
    hold_seconds: float = DEFAULT_HOLD_SECONDS
    evidence_mirror_percent: int = 0

    @property
    def initial_weight(self) -> int:
        """Canary starts at its first step; blue-green and shadow give the candidate no
        client traffic until the final switch."""
        return self.steps[0] if self.strategy == CANARY else 0


def validate_steps(steps: Sequence[int]) -> list[int]:
    """Candidate weights: strictly increasing percentages within 1..100."""
    if not steps:
        return list(DEFAULT_STEPS)
    values = list(steps)
    for weight in values:
        if not 1 <= weight <= 100:
            raise InvalidArgument(f"release step {weight} is outside 1..100 (steps {values})")
    for before, after in itertools.pairwise(values):
        if after <= before:
            raise InvalidArgument(f"release steps must be strictly increasing, got {values}")
    return values


def analysis_with_defaults(
    analysis: events_pb2.AnalysisSettings | None,
) -> events_pb2.AnalysisSettings:
    """No settings given: all defaults (auto on). Given: zero min_requests/max_error_rate
    take the default (neither makes sense as zero); max_latency_ratio 0 disables the
    latency check, ``auto`` is taken as given, and the monitor fills the other zeros."""
    if analysis is None:
        return events_pb2.AnalysisSettings(
            min_requests=DEFAULT_MIN_REQUESTS,
            max_error_rate=DEFAULT_MAX_ERROR_RATE,
            max_latency_ratio=DEFAULT_MAX_LATENCY_RATIO,
            auto=True,
        )
    if analysis.max_error_rate < 0 or analysis.max_latency_ratio < 0:
        raise InvalidArgument("max_error_rate and max_latency_ratio must not be negative")
    for name in ("max_error_rate", "alpha", "latency_confidence", "max_feedback_drop"):
        value = getattr(analysis, name)
        if not 0 <= value < 1 and not (name == "max_error_rate" and value == 1):
            raise InvalidArgument(f"analysis.{name} must be within 0..1, got {value}")
    if not 0 <= analysis.max_divergence <= 1:
        raise InvalidArgument(
            f"analysis.max_divergence must be within 0..1, got {analysis.max_divergence}"
        )
    if analysis.latency_effect < 0 or analysis.step_timeout_s < 0:
        raise InvalidArgument("analysis.latency_effect and step_timeout_s must not be negative")
    out = events_pb2.AnalysisSettings()
    out.CopyFrom(analysis)
    out.min_requests = analysis.min_requests or DEFAULT_MIN_REQUESTS
    out.max_error_rate = analysis.max_error_rate or DEFAULT_MAX_ERROR_RATE
    return out


def _validate_flags(flags: Sequence[events_pb2.FlagRule]) -> list[events_pb2.FlagRule]:
    out = []
    for i, rule in enumerate(flags):
        label = rule.name or f"#{i + 1}"
        if rule.arm not in FLAG_ARMS:
            raise InvalidArgument(
                f"flag rule {label}: arm must be 'candidate' or 'stable', got {rule.arm!r}"
            )
        if not (rule.tenants or rule.users or rule.metadata):
            raise InvalidArgument(
                f"flag rule {label} has no condition (tenants, users or metadata) and would "
                "match nothing"
            )
        copy = events_pb2.FlagRule()
        copy.CopyFrom(rule)
        copy.name = rule.name or label
        copy.arm = rule.arm or "candidate"
        out.append(copy)
    return out


def from_request(request: gateway_pb2.StartReleaseRequest, candidate_id: str) -> ReleaseSpec:
    strategy = request.strategy or CANARY
    if strategy not in STRATEGY_NAMES:
        raise InvalidArgument(f"unknown release strategy {request.strategy}")
    if strategy == CANARY:
        steps = validate_steps(request.steps)
    else:
        if list(request.steps) not in ([], [100]):
            raise InvalidArgument(
                f"{STRATEGY_NAMES[strategy]} switches all traffic at once after its check; "
                f"steps {list(request.steps)} do not apply (leave them empty)"
            )
        steps = [100]
    if request.HasField("shadow_percent"):
        shadow = request.shadow_percent
        if shadow > 100:
            raise InvalidArgument(f"shadow_percent {shadow} is outside 0..100")
    else:
        shadow = 0 if strategy == CANARY else DEFAULT_MIRROR_PERCENT
    if strategy == SHADOW and shadow == 0:
        raise InvalidArgument("a shadow release needs shadow_percent > 0")
    evidence = _evidence_mirror_percent(request, strategy)
    hold = request.hold_seconds if request.HasField("hold_seconds") else DEFAULT_HOLD_SECONDS
    if hold < 0:
        raise InvalidArgument(f"hold_seconds must not be negative, got {hold}")
    return ReleaseSpec(
        alias=request.alias,
        candidate_version_id=candidate_id,
        strategy=strategy,
        steps=steps,
        analysis=analysis_with_defaults(request.analysis if request.HasField("analysis") else None),
        flags=_validate_flags(request.flags),
        shadow_percent=shadow,
        sticky=request.sticky,
        hold_seconds=hold,
        evidence_mirror_percent=evidence,
    )


def _evidence_mirror_percent(
    request: gateway_pb2.StartReleaseRequest, strategy: events_pb2.ReleaseStrategy.ValueType
) -> int:
    """Canary: the given share (0 = off) or the default; the others judge mirrored traffic
    already (``shadow_percent``), so a share there is a mistake worth reporting."""
    if not request.HasField("evidence_mirror_percent"):
        return DEFAULT_EVIDENCE_MIRROR_PERCENT if strategy == CANARY else 0
    share = request.evidence_mirror_percent
    if share > 100:
        raise InvalidArgument(f"evidence_mirror_percent {share} is outside 0..100")
    if share and strategy != CANARY:
        raise InvalidArgument(
            f"evidence_mirror_percent applies to canary releases only; "
            f"{STRATEGY_NAMES[strategy]} judges the candidate on shadow_percent of the "
            "stable requests"
        )
    return share
