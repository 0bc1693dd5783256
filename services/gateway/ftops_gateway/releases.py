"""Release administration: SetRoute / GetRoute / StartRelease, and applying the monitor's
``release.promote`` / ``release.rollback`` decisions to the routing tables in Redis."""

from __future__ import annotations

import logging
import uuid

from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2
from ftops_gateway import route_rules
from ftops_gateway.route_cache import RouteCache
from ftops_gateway.route_store import RouteStore
from ftops_gateway.versions import VersionResolver
from ftops_runtime.bus import Delivery, EventBus
from ftops_runtime.errors import InvalidArgument, NotFound, Unavailable
from ftops_runtime.events import RELEASE_STARTED, ROUTE_CHANGED, new_meta

log = logging.getLogger(__name__)


def _check_alias(alias: str) -> None:
    # ':' is reserved for "adapter:number" version names in the same ``model`` field.
    if not alias or any(c.isspace() or c == ":" for c in alias):
        raise InvalidArgument(f"alias {alias!r} must be non-empty and contain no whitespace or ':'")
    if alias == "base":
        raise InvalidArgument("'base' names the base model and cannot be an alias")


class ReleaseManager:
    def __init__(
        self, store: RouteStore, cache: RouteCache, versions: VersionResolver, bus: EventBus
    ) -> None:
        self.store = store
        self.cache = cache
        self.versions = versions
        self.bus = bus

    async def _announce(self, route: gateway_pb2.Route, cause_event_id: str) -> None:
        """route.changed is informational: a NATS outage must not undo a stored change."""
        event = events_pb2.RouteChanged(
            meta=new_meta(self.bus.service, self.bus.instance),
            alias=route.alias,
            weights=route_rules.weights(route),
            cause_event_id=cause_event_id,
        )
        try:
            await self.bus.publish(ROUTE_CHANGED, event)
        except Exception as exc:
            log.warning("could not publish route.changed for %s: %s", route.alias, exc)

    async def set_route(self, alias: str, version_ref: str) -> gateway_pb2.Route:
        _check_alias(alias)
        version_id = await self.versions.resolve(version_ref)
        route, _ = await self.store.update(
            alias, lambda current: route_rules.set_route(current, alias, version_id)
        )
        assert route is not None
        self.cache.put(route)
        await self._announce(route, "")
        return route

    async def get_route(self, alias: str) -> gateway_pb2.Route:
        route = await self.cache.lookup(alias)
        if route is None:
            raise NotFound(f"no route for alias {alias!r}")
        return route

    async def start_release(self, request: gateway_pb2.StartReleaseRequest) -> gateway_pb2.Route:
        alias = request.alias
        _check_alias(alias)
        candidate = await self.versions.resolve(request.candidate_version_id)
        steps = route_rules.validate_steps(request.steps)
        analysis = route_rules.analysis_with_defaults(
            request.analysis if request.HasField("analysis") else None
        )
        release_id = f"rel_{uuid.uuid4().hex[:16]}"
        route, _ = await self.store.update(
            alias,
            lambda current: route_rules.start_release(current, alias, candidate, steps, release_id),
        )
        assert route is not None
        self.cache.put(route)
        started = events_pb2.ReleaseStarted(
            meta=new_meta(self.bus.service, self.bus.instance),
            release_id=release_id,
            alias=alias,
            stable_version_id=route.stable_version_id,
            candidate_version_id=candidate,
            strategy=request.strategy or events_pb2.RELEASE_STRATEGY_CANARY,
            steps=steps,
            current_weight=steps[0],
            analysis=analysis,
        )
        try:
            await self.bus.publish(RELEASE_STARTED, started)
        except Exception as exc:
            # Nobody would ever decide on this release: take it back.
            await self._abandon(alias, release_id)
            raise Unavailable(
                f"could not announce release {release_id} of {alias!r} on NATS ({exc}); "
                "the route is unchanged, retry later"
            ) from exc
        await self._announce(route, started.meta.event_id)
        return route

    async def _abandon(self, alias: str, release_id: str) -> None:
        def undo(current: gateway_pb2.Route | None) -> gateway_pb2.Route | None:
            if current is None or current.release_id != release_id:
                return None
            new = gateway_pb2.Route()
            new.CopyFrom(current)
            new.candidate_version_id = ""
            new.candidate_weight = 0
            new.release_id = ""
            del new.steps[:]
            new.step_index = 0
            return new

        route, _ = await self.store.update(alias, undo)
        if route is not None:
            self.cache.put(route)

    # -- decisions from the monitor (at-least-once; deduplicated by event id) ------------

    async def on_promote(self, event: events_pb2.ReleasePromote, delivery: Delivery) -> None:
        route, changed = await self.store.update(
            event.alias,
            lambda current: route_rules.apply_promote(current, event) if current else None,
            event_id=event.meta.event_id,
        )
        await self._after_decision(route, changed, event.meta.event_id, "promote", event.alias)

    async def on_rollback(self, event: events_pb2.ReleaseRollback, delivery: Delivery) -> None:
        route, changed = await self.store.update(
            event.alias,
            lambda current: route_rules.apply_rollback(current, event) if current else None,
            event_id=event.meta.event_id,
        )
        await self._after_decision(route, changed, event.meta.event_id, "rollback", event.alias)

    async def _after_decision(
        self, route: gateway_pb2.Route | None, changed: bool, event_id: str, kind: str, alias: str
    ) -> None:
        if not changed or route is None:
            log.info("%s %s for %s ignored (duplicate, stale or unknown)", kind, event_id, alias)
            return
        log.info(
            "applied %s %s: %s stable=%s candidate=%s weight=%d",
            kind,
            event_id,
            alias,
            route.stable_version_id,
            route.candidate_version_id,
            route.candidate_weight,
        )
        self.cache.put(route)
        await self._announce(route, event_id)
