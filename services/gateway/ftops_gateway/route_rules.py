"""Pure state transitions of an alias's routing table (the ``Route`` message).

Kept free of Redis and gRPC so every rule is unit-tested directly. Each function returns a
new Route (the input is never mutated) or ``None`` when the event must be ignored; the
caller bumps ``revision`` when it stores the result. Functions behind the manual commands
raise ``FailedPrecondition`` instead of returning ``None``: they run inside the store's
compare-and-set, so of two conflicting commands exactly one sees the state it needs.
"""

from __future__ import annotations

from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2
from ftops.registry.v1 import registry_pb2
from ftops_gateway.release_spec import ReleaseSpec
from ftops_runtime.errors import FailedPrecondition, InvalidArgument, NotFound

RUNNING = "running"
PAUSED = "paused"
PROMOTED = "promoted"
ROLLED_BACK = "rolled_back"
REPLACED = "replaced"
_ENDED = {
    PROMOTED: "was promoted",
    ROLLED_BACK: "was rolled back",
    REPLACED: "was replaced by SetRoute",
}


def is_running(route: gateway_pb2.Route) -> bool:
    """A release is running while the route has a candidate."""
    return bool(route.candidate_version_id)


def state_of(route: gateway_pb2.Route) -> str:
    """The release's lifecycle state as clients see it ("" when the alias never had one)."""
    if is_running(route):
        return PAUSED if route.paused else RUNNING
    return route.release_state


def _copy(route: gateway_pb2.Route, now: float) -> gateway_pb2.Route:
    new = gateway_pb2.Route()
    new.CopyFrom(route)
    new.updated_at.FromNanoseconds(int(now * 1e9))
    return new


def _decision(
    kind: str,
    *,
    event_id: str,
    now: float,
    weight: int = 0,
    final: bool = False,
    reason: str = "",
    figures: dict[str, float] | None = None,
    manual: bool = False,
) -> registry_pb2.ReleaseDecision:
    decision = registry_pb2.ReleaseDecision(
        event_id=event_id,
        kind=kind,
        weight=weight,
        final=final,
        reason=reason,
        figures=figures or {},
        manual=manual,
    )
    decision.occurred_at.FromNanoseconds(int(now * 1e9))
    return decision


def _pend_retirement(route: gateway_pb2.Route, version_id: str) -> None:
    """Queue ``version_id`` for adapter.retired (the retirer checks other aliases first)."""
    if version_id and version_id not in route.retire_pending:
        route.retire_pending.append(version_id)


def _drop_held(route: gateway_pb2.Route) -> None:
    """The held previous version stops being the rollback target before its hold ran out."""
    if route.previous_version_id and not route.previous_retired and route.HasField("hold_until"):
        _pend_retirement(route, route.previous_version_id)
    route.ClearField("hold_until")


def _end_candidate(route: gateway_pb2.Route, state: str) -> None:
    route.candidate_version_id = ""
    route.candidate_weight = 0
    route.paused = False
    route.release_state = state
    route.ClearField("step_started_at")


def set_route(
    current: gateway_pb2.Route | None,
    alias: str,
    version_id: str,
    now: float = 0.0,
    *,
    event_id: str = "",
) -> gateway_pb2.Route:
    """All traffic to one version; a running release ends as "replaced"."""
    if current is None:
        route = gateway_pb2.Route(alias=alias, stable_version_id=version_id)
        route.updated_at.FromNanoseconds(int(now * 1e9))
        return route
    route = _copy(current, now)
    if current.stable_version_id != version_id:
        _drop_held(route)
        route.previous_version_id = current.stable_version_id
        route.previous_retired = False
    route.stable_version_id = version_id
    if is_running(current):
        if current.candidate_version_id != version_id:
            _pend_retirement(route, current.candidate_version_id)
        _end_candidate(route, REPLACED)
        route.last_decision.CopyFrom(
            _decision(
                REPLACED,
                event_id=event_id,
                now=now,
                final=True,
                reason=f"replaced: SetRoute sent all traffic to {version_id}",
                manual=True,
            )
        )
    _unpend(route)
    return route


def start_release(
    current: gateway_pb2.Route | None,
    spec: ReleaseSpec,
    release_id: str,
    *,
    event_id: str = "",
    now: float = 0.0,
    actor: str = "",
) -> gateway_pb2.Route:
    alias = spec.alias
    if current is None or not current.stable_version_id:
        raise FailedPrecondition(
            f"alias {alias!r} has no route with a stable version; call SetRoute first"
        )
    if is_running(current):
        raise FailedPrecondition(
            f"alias {alias!r} already has release {current.release_id} running "
            f"(candidate {current.candidate_version_id}); wait for it to finish or roll it back"
        )
    if spec.candidate_version_id == current.stable_version_id:
        raise InvalidArgument(
            f"version {spec.candidate_version_id} is already the stable version of {alias!r}"
        )
    route = _copy(current, now)
    route.candidate_version_id = spec.candidate_version_id
    route.candidate_weight = spec.initial_weight
    route.release_id = release_id
    del route.steps[:]
    route.steps.extend(spec.steps)
    route.step_index = 0
    route.strategy = spec.strategy
    del route.flags[:]
    route.flags.extend(spec.flags)
    route.shadow_percent = spec.shadow_percent
    route.evidence_mirror_percent = spec.evidence_mirror_percent
    route.sticky = spec.sticky
    route.paused = False
    route.hold_seconds = spec.hold_seconds
    route.analysis.CopyFrom(spec.analysis)
    route.release_state = RUNNING
    route.release_stable_version_id = current.stable_version_id
    route.release_candidate_version_id = spec.candidate_version_id
    route.started_at.FromNanoseconds(int(now * 1e9))
    route.step_started_at.FromNanoseconds(int(now * 1e9))
    route.actor = actor
    route.last_decision.CopyFrom(
        _decision(
            "started", event_id=event_id, now=now, weight=spec.initial_weight, reason="started"
        )
    )
    _unpend(route)
    return route


def apply_promote(
    route: gateway_pb2.Route, event: events_pb2.ReleasePromote, now: float = 0.0
) -> gateway_pb2.Route | None:
    """One step forward, or the final promotion. Ignored unless it belongs to the running
    release and does not go backwards (events may arrive late or twice); an automatic
    step of a paused release is ignored too (the monitor should not send one)."""
    if (
        not is_running(route)
        or event.release_id != route.release_id
        or event.candidate_version_id != route.candidate_version_id
        or event.step_index < route.step_index
        or (route.paused and not event.manual)
    ):
        return None
    if (
        not event.final
        and event.step_index == route.step_index
        and event.weight == route.candidate_weight
    ):
        return None
    new = _copy(route, now)
    new.step_index = event.step_index
    weight = 100 if event.final else min(event.weight, 100)
    new.last_decision.CopyFrom(
        _decision(
            "promote",
            event_id=event.meta.event_id,
            now=now,
            weight=weight,
            final=event.final,
            reason=event.reason,
            figures=dict(event.figures),
            manual=event.manual,
        )
    )
    if event.final:
        if route.previous_version_id != route.stable_version_id:
            _drop_held(new)
        new.previous_version_id = route.stable_version_id
        new.previous_retired = False
        new.stable_version_id = route.candidate_version_id
        _end_candidate(new, PROMOTED)
        new.hold_until.FromNanoseconds(int((now + route.hold_seconds) * 1e9))
        _unpend(new)
    else:
        new.candidate_weight = weight
        new.step_started_at.FromNanoseconds(int(now * 1e9))
    return new


def next_step(route: gateway_pb2.Route, *, one: bool) -> tuple[int, int, bool]:
    """(step_index, weight, final) of a manual promotion: the final one, or with ``one``
    the next step (final when it is the last or reaches 100%)."""
    last = max(len(route.steps) - 1, route.step_index)
    following = route.step_index + 1
    if not one or following >= len(route.steps):
        return last, 100, True
    weight = route.steps[following]
    return following, weight, weight >= 100 or following == last


def apply_rollback(
    route: gateway_pb2.Route, event: events_pb2.ReleaseRollback, now: float = 0.0
) -> gateway_pb2.Route | None:
    """All traffic back to ``event.stable_version_id`` (straight to 0%, never stepping
    the weight back down).

    Applies to the running release, or, after a completed promotion, restores the previous
    stable version when the event names it (a rollback of the promotion itself)."""
    decision = _decision(
        "rollback",
        event_id=event.meta.event_id,
        now=now,
        reason=event.reason,
        figures=dict(event.figures),
        manual=event.manual,
    )
    if is_running(route):
        if event.release_id != route.release_id:
            return None
        target = event.stable_version_id or route.stable_version_id
        new = _copy(route, now)
        if target != route.stable_version_id:
            new.previous_version_id = route.stable_version_id
        new.stable_version_id = target
        if route.candidate_version_id != target:
            _pend_retirement(new, route.candidate_version_id)
        _end_candidate(new, ROLLED_BACK)
        new.last_decision.CopyFrom(decision)
        _unpend(new)
        return new
    promoted_back = (
        route.previous_version_id
        and event.stable_version_id == route.previous_version_id
        and event.candidate_version_id in ("", route.stable_version_id)
    )
    if not promoted_back:
        return None
    new = _copy(route, now)
    new.stable_version_id = route.previous_version_id
    _pend_retirement(new, route.stable_version_id)  # the reverted promotion's version
    # Cleared so that a second copy of the same rollback cannot flip the route again.
    new.previous_version_id = ""
    new.previous_retired = False
    new.ClearField("hold_until")
    _end_candidate(new, ROLLED_BACK)
    new.last_decision.CopyFrom(decision)
    _unpend(new)
    return new


def require_release(route: gateway_pb2.Route | None, alias: str, release_id: str) -> None:
    """The guard of the manual commands: the alias has a release, the one named if any."""
    if route is None:
        raise NotFound(f"no route for alias {alias!r}")
    if not route.release_id:
        raise FailedPrecondition(f"alias {alias!r} has no release")
    if release_id and release_id != route.release_id:
        raise FailedPrecondition(
            f"release {release_id} is not the latest release of {alias!r} "
            f"({route.release_id} is); the command was not applied"
        )


def require_running(route: gateway_pb2.Route | None, alias: str, release_id: str) -> None:
    require_release(route, alias, release_id)
    assert route is not None
    if not is_running(route):
        ended = _ENDED.get(route.release_state, route.release_state)
        raise FailedPrecondition(
            f"release {route.release_id} of {alias!r} is not running (it {ended})"
        )


def set_paused(
    route: gateway_pb2.Route | None,
    alias: str,
    release_id: str,
    paused: bool,
    *,
    event_id: str,
    reason: str,
    now: float = 0.0,
) -> gateway_pb2.Route:
    require_running(route, alias, release_id)
    assert route is not None
    if route.paused == paused:
        what = "paused" if paused else "not paused"
        raise FailedPrecondition(f"release {route.release_id} of {alias!r} is already {what}")
    new = _copy(route, now)
    new.paused = paused
    # The route's state is the release's state: clients see "paused" in both.
    new.release_state = PAUSED if paused else RUNNING
    if not paused:
        # Evidence from before the pause is stale: the step starts over.
        new.step_started_at.FromNanoseconds(int(now * 1e9))
    new.last_decision.CopyFrom(
        _decision(
            "paused" if paused else "resumed",
            event_id=event_id,
            now=now,
            weight=route.candidate_weight,
            reason=reason,
            manual=True,
        )
    )
    return new


def _unpend(route: gateway_pb2.Route) -> None:
    """A version the route serves again (re-released, restored) is not to be retired."""
    keep = [v for v in route.retire_pending if v not in versions_in_use(route)]
    if len(keep) != len(route.retire_pending):
        del route.retire_pending[:]
        route.retire_pending.extend(keep)


def retired_pending(route: gateway_pb2.Route | None, version_id: str) -> gateway_pb2.Route | None:
    """The route without ``version_id`` in ``retire_pending`` (None: nothing to change)."""
    if route is None or version_id not in route.retire_pending:
        return None
    new = gateway_pb2.Route()
    new.CopyFrom(route)
    new.retire_pending.remove(version_id)
    return new


def retire_due(route: gateway_pb2.Route, now: float) -> bool:
    """The held previous version's time is up and it has not been retired yet."""
    return (
        bool(route.previous_version_id)
        and not route.previous_retired
        and route.HasField("hold_until")
        and route.hold_until.ToNanoseconds() <= now * 1e9
    )


def mark_retired(route: gateway_pb2.Route | None, version_id: str) -> gateway_pb2.Route | None:
    if route is None or route.previous_version_id != version_id or route.previous_retired:
        return None
    new = gateway_pb2.Route()
    new.CopyFrom(route)
    new.previous_retired = True
    return new


def versions_in_use(route: gateway_pb2.Route) -> set[str]:
    """Versions a route may still send traffic to (held previous versions included)."""
    used = {route.stable_version_id, route.candidate_version_id}
    if route.previous_version_id and not route.previous_retired:
        used.add(route.previous_version_id)
    return used - {""}


def snapshot(route: gateway_pb2.Route) -> events_pb2.ReleaseSnapshot:
    """The release's whole state for route.changed (empty when the alias never had one)."""
    if not route.release_id:
        return events_pb2.ReleaseSnapshot()
    decision = route.last_decision
    change = events_pb2.ReleaseChange(
        kind=decision.kind,
        event_id=decision.event_id,
        weight=decision.weight,
        final=decision.final,
        reason=decision.reason,
        figures=dict(decision.figures),
        manual=decision.manual,
        actor=route.actor if decision.kind == "started" else "",
    )
    change.occurred_at.CopyFrom(decision.occurred_at)
    snap = events_pb2.ReleaseSnapshot(
        release_id=route.release_id,
        state=state_of(route),
        strategy=route.strategy,
        stable_version_id=route.release_stable_version_id,
        candidate_version_id=route.release_candidate_version_id,
        candidate_weight=route.candidate_weight if is_running(route) else 0,
        steps=list(route.steps),
        step_index=route.step_index,
        analysis=route.analysis,
        change=change,
        evidence_mirror_percent=route.evidence_mirror_percent,
        shadow_percent=route.shadow_percent,
    )
    snap.started_at.CopyFrom(route.started_at)
    if route.HasField("step_started_at"):
        snap.step_started_at.CopyFrom(route.step_started_at)
    return snap


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
