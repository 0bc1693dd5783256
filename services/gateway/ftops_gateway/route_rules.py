"""Pure state transitions of an alias's routing table (the ``Route`` message).

Kept free of Redis and gRPC so every rule is unit-tested directly. Each function returns a
new Route (the input is never mutated) or ``None`` when the event must be ignored; the
caller bumps ``revision`` when it stores the result.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2
from ftops_runtime.errors import FailedPrecondition, InvalidArgument

DEFAULT_STEPS: tuple[int, ...] = (5, 25, 50, 100)
DEFAULT_MIN_REQUESTS = 20
DEFAULT_MAX_ERROR_RATE = 0.05
DEFAULT_MAX_LATENCY_RATIO = 3.0


def is_running(route: gateway_pb2.Route) -> bool:
    """A release is running while the route has a candidate."""
    return bool(route.candidate_version_id)


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
    latency check and ``auto`` is taken as given."""
    if analysis is None:
        return events_pb2.AnalysisSettings(
            min_requests=DEFAULT_MIN_REQUESTS,
            max_error_rate=DEFAULT_MAX_ERROR_RATE,
            max_latency_ratio=DEFAULT_MAX_LATENCY_RATIO,
            auto=True,
        )
    if analysis.max_error_rate < 0 or analysis.max_latency_ratio < 0:
        raise InvalidArgument("max_error_rate and max_latency_ratio must not be negative")
    return events_pb2.AnalysisSettings(
        min_requests=analysis.min_requests or DEFAULT_MIN_REQUESTS,
        max_error_rate=analysis.max_error_rate or DEFAULT_MAX_ERROR_RATE,
        max_latency_ratio=analysis.max_latency_ratio,
        auto=analysis.auto,
    )


def set_route(current: gateway_pb2.Route | None, alias: str, version_id: str) -> gateway_pb2.Route:
    """All traffic to one version; any running release is dropped."""
    previous = ""
    revision = 0
    if current is not None:
        revision = current.revision
        previous = (
            current.stable_version_id
            if current.stable_version_id != version_id
            else current.previous_version_id
        )
    return gateway_pb2.Route(
        alias=alias, stable_version_id=version_id, previous_version_id=previous, revision=revision
    )


def start_release(
    current: gateway_pb2.Route | None,
    alias: str,
    candidate_version_id: str,
    steps: Sequence[int],
    release_id: str,
) -> gateway_pb2.Route:
    if current is None or not current.stable_version_id:
        raise FailedPrecondition(
            f"alias {alias!r} has no route with a stable version; call SetRoute first"
        )
    if is_running(current):
        raise FailedPrecondition(
            f"alias {alias!r} already has release {current.release_id} running "
            f"(candidate {current.candidate_version_id}); wait for it to finish or roll it back"
        )
    if candidate_version_id == current.stable_version_id:
        raise InvalidArgument(
            f"version {candidate_version_id} is already the stable version of {alias!r}"
        )
    checked = validate_steps(steps)
    route = gateway_pb2.Route()
    route.CopyFrom(current)
    route.candidate_version_id = candidate_version_id
    route.candidate_weight = checked[0]
    route.release_id = release_id
    del route.steps[:]
    route.steps.extend(checked)
    route.step_index = 0
    return route


def apply_promote(
    route: gateway_pb2.Route, event: events_pb2.ReleasePromote
) -> gateway_pb2.Route | None:
    """One step forward, or the final promotion. Ignored unless it belongs to the running
    release and does not go backwards (events may arrive late or twice)."""
    if (
        not is_running(route)
        or event.release_id != route.release_id
        or event.candidate_version_id != route.candidate_version_id
        or event.step_index < route.step_index
    ):
        return None
    new = gateway_pb2.Route()
    new.CopyFrom(route)
    new.step_index = event.step_index
    if event.final:
        new.previous_version_id = route.stable_version_id
        new.stable_version_id = route.candidate_version_id
        new.candidate_version_id = ""
        new.candidate_weight = 0
    else:
        if event.step_index == route.step_index and event.weight == route.candidate_weight:
            return None
        new.candidate_weight = min(event.weight, 100)
    return new


def apply_rollback(
    route: gateway_pb2.Route, event: events_pb2.ReleaseRollback
) -> gateway_pb2.Route | None:
    """All traffic back to ``event.stable_version_id``.

    Applies to the running release, or, after a completed promotion, restores the previous
    stable version when the event names it (a rollback of the promotion itself)."""
    if is_running(route):
        if event.release_id != route.release_id:
            return None
        target = event.stable_version_id or route.stable_version_id
        new = gateway_pb2.Route()
        new.CopyFrom(route)
        if target != route.stable_version_id:
            new.previous_version_id = route.stable_version_id
        new.stable_version_id = target
        new.candidate_version_id = ""
        new.candidate_weight = 0
        return new
    promoted_back = (
        route.previous_version_id
        and event.stable_version_id == route.previous_version_id
        and event.candidate_version_id in ("", route.stable_version_id)
    )
    if not promoted_back:
        return None
    new = gateway_pb2.Route()
    new.CopyFrom(route)
    new.stable_version_id = route.previous_version_id
    # Cleared so that a second copy of the same rollback cannot flip the route again.
    new.previous_version_id = ""
    new.candidate_version_id = ""
    new.candidate_weight = 0
    return new


def weights(route: gateway_pb2.Route) -> dict[str, int]:
    """Traffic share per version in percent (for route.changed)."""
    if not route.stable_version_id:
        return {}
    if not is_running(route) or route.candidate_weight == 0:
        return {route.stable_version_id: 100}
    weight = min(route.candidate_weight, 100)
    out = {route.candidate_version_id: weight}
    if weight < 100:
        out[route.stable_version_id] = 100 - weight
    return out
