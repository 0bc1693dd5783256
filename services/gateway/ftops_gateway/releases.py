"""The release API (the gateway owns routing state, so it owns releases): SetRoute,
GetRoute, StartRelease, Get/List/Watch, Pause/Resume, manual Promote/Rollback, and
applying the monitor's ``release.promote`` / ``release.rollback`` decisions.

Every change is a compare-and-set on the alias's route in Redis. A manual command checks
its precondition inside that transaction and records its event id there too, so of two
conflicting commands exactly one wins and the event it publishes is not applied twice
when it comes back through the decision consumers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

import redis.exceptions
from google.protobuf.message import Message

from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2
from ftops_gateway import release_spec, route_rules
from ftops_gateway.release_history import ReleaseHistory, from_record
from ftops_gateway.route_cache import RouteCache
from ftops_gateway.route_store import RouteStore
from ftops_gateway.versions import VersionResolver
from ftops_runtime.bus import Delivery, EventBus
from ftops_runtime.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from ftops_runtime.events import (
    RELEASE_PAUSED,
    RELEASE_PROMOTE,
    RELEASE_RESUMED,
    RELEASE_ROLLBACK,
    RELEASE_STARTED,
    ROUTE_CHANGED,
    derived_event_id,
    new_meta,
)
from ftops_runtime.interceptors import current_principal
from ftops_runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

DEFAULT_LIST_LIMIT = 50
# A decision that could not be published at once is retried in the background this long.
REPUBLISH_FOR_S = 600.0
# A monitor decision waits this long for Redis to come back before the event is retried
# through NATS (and, after the bus's redeliveries, dead-lettered).
DECISION_WAIT_S = 600.0
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

Mutation = Callable[[gateway_pb2.Route | None], gateway_pb2.Route | None]


def _check_alias(alias: str) -> None:
    # ':' is reserved for "adapter:number" version names in the same ``model`` field.
    if not alias or any(c.isspace() or c == ":" for c in alias):
        raise InvalidArgument(f"alias {alias!r} must be non-empty and contain no whitespace or ':'")
    if alias == "base":
        raise InvalidArgument("'base' names the base model and cannot be an alias")


def _actor() -> str:
    return current_principal.get().key_id or "anonymous"


class ReleaseManager:
    def __init__(
        self,
        store: RouteStore,
        cache: RouteCache,
        versions: VersionResolver,
        bus: EventBus,
        history: ReleaseHistory | None = None,
    ) -> None:
        self.store = store
        self.cache = cache
        self.versions = versions
        self.bus = bus
        self.history = history
        self._republish: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        await cancel_and_wait(list(self._republish))

    # -- publishing ----------------------------------------------------------------------

    async def _announce(self, route: gateway_pb2.Route, cause_event_id: str) -> None:
        """route.changed carries the release's whole state: the monitor and the registry
        follow it, so it is published for every stored change (retried in the background
        through a NATS outage; Redis already holds the change, so nothing is undone). Its
        id derives from the alias and revision: every retry and every gateway replica that
        announces the same revision lands once."""
        meta = new_meta(self.bus.service, self.bus.instance)
        meta.event_id = derived_event_id("route.changed", route.alias, route.revision)
        event = events_pb2.RouteChanged(
            meta=meta,
            alias=route.alias,
            weights=route_rules.weights(route),
            cause_event_id=cause_event_id,
            revision=route.revision,
            stable_version_id=route.stable_version_id,
            release=route_rules.snapshot(route),
        )
        await self._publish_reliably(ROUTE_CHANGED, event)

    async def _publish_reliably(self, subject: str, event: Message) -> None:
        """Publish an applied decision; Redis already holds it, so a NATS outage only
        delays the event (same id: JetStream stores a retried publish once)."""
        try:
            await self.bus.publish(subject, event, timeout=2.0)
            return
        except Exception as exc:
            log.warning("could not publish %s now (%s); retrying in the background", subject, exc)
        task = asyncio.create_task(
            self._republish_loop(subject, event), name=f"republish-{subject}"
        )
        self._republish.add(task)
        task.add_done_callback(self._republish.discard)

    async def _republish_loop(self, subject: str, event: Message) -> None:
        deadline = time.monotonic() + REPUBLISH_FOR_S
        delay = 0.5
        while time.monotonic() < deadline:
            await asyncio.sleep(delay)
            try:
                await self.bus.publish(subject, event, timeout=5.0)
                return
            except Exception as exc:
                log.debug("republishing %s failed: %s", subject, exc)
                delay = min(delay * 2, 10.0)
        log.error("gave up publishing %s after %.0f s", subject, REPUBLISH_FOR_S)

    async def _change(
        self, alias: str, mutate: Mutation, *, event_id: str = ""
    ) -> tuple[gateway_pb2.Route | None, bool]:
        try:
            route, changed = await self.store.update(alias, mutate, event_id=event_id)
        except REDIS_DOWN as exc:
            raise Unavailable(
                f"the routing store (Redis) is unreachable ({exc}); retry later (requests "
                "are still served from the last known routes)"
            ) from exc
        if route is not None:
            self.cache.put(route)
        return route, changed

    # -- routes --------------------------------------------------------------------------

    async def set_route(self, alias: str, version_ref: str) -> gateway_pb2.Route:
        _check_alias(alias)
        version_id = await self.versions.resolve(version_ref)
        meta = new_meta(self.bus.service, self.bus.instance)
        ended: list[gateway_pb2.Route] = []

        def mutate(current: gateway_pb2.Route | None) -> gateway_pb2.Route:
            ended[:] = [current] if current is not None and route_rules.is_running(current) else []
            return route_rules.set_route(
                current, alias, version_id, time.time(), event_id=meta.event_id
            )

        route, _ = await self._change(alias, mutate, event_id=meta.event_id)
        assert route is not None
        if ended:
            # The running release is over: tell the monitor and the registry's history.
            old = ended[0]
            await self._publish_reliably(
                RELEASE_ROLLBACK,
                events_pb2.ReleaseRollback(
                    meta=meta,
                    release_id=old.release_id,
                    alias=alias,
                    candidate_version_id=old.candidate_version_id,
                    stable_version_id=version_id,
                    reason=f"replaced: SetRoute sent all traffic to {version_id}",
                    manual=True,
                ),
            )
        await self._announce(route, meta.event_id)
        return route

    async def get_route(self, alias: str) -> gateway_pb2.Route:
        route = await self.cache.lookup(alias)
        if route is None:
            raise NotFound(f"no route for alias {alias!r}")
        return route

    async def _current(self, alias: str) -> gateway_pb2.Route | None:
        """Redis first (commands must see the latest state), the cache when it is down."""
        try:
            route = await self.store.get(alias)
        except Exception:
            return self.cache.get(alias)
        if route is not None:
            self.cache.put(route)
        return route

    # -- starting ------------------------------------------------------------------------

    async def start_release(self, request: gateway_pb2.StartReleaseRequest) -> gateway_pb2.Route:
        alias = request.alias
        _check_alias(alias)
        if not request.candidate_version_id:
            raise InvalidArgument("candidate_version_id is required")
        candidate = await self.versions.get(request.candidate_version_id)
        spec = release_spec.from_request(request, candidate.version_id)
        current = await self._current(alias)
        if current is None or not current.stable_version_id:
            raise FailedPrecondition(
                f"alias {alias!r} has no route with a stable version; call SetRoute first"
            )
        stable = await self.versions.get(current.stable_version_id)
        if candidate.base_model and stable.base_model and candidate.base_model != stable.base_model:
            raise FailedPrecondition(
                f"candidate {candidate.version_id} is an adapter of base model "
                f"{candidate.base_model!r}, but {alias!r} serves {stable.version_id} on "
                f"{stable.base_model!r}; a release cannot change the base model"
            )
        release_id = f"rel_{uuid.uuid4().hex[:16]}"
        meta = new_meta(self.bus.service, self.bus.instance)
        actor = _actor()

        def mutate(cur: gateway_pb2.Route | None) -> gateway_pb2.Route:
            if cur is not None and cur.stable_version_id != stable.version_id:
                # The base-model check above was made against another stable version.
                raise FailedPrecondition(
                    f"alias {alias!r} moved to {cur.stable_version_id} meanwhile; retry"
                )
            return route_rules.start_release(
                cur, spec, release_id, event_id=meta.event_id, now=time.time(), actor=actor
            )

        route, _ = await self._change(alias, mutate)
        assert route is not None
        started = events_pb2.ReleaseStarted(
            meta=meta,
            release_id=release_id,
            alias=alias,
            stable_version_id=route.stable_version_id,
            candidate_version_id=spec.candidate_version_id,
            strategy=spec.strategy,
            steps=spec.steps,
            current_weight=spec.initial_weight,
            analysis=spec.analysis,
            flags=spec.flags,
            shadow_percent=spec.shadow_percent,
            evidence_mirror_percent=spec.evidence_mirror_percent,
            sticky=spec.sticky,
            hold_seconds=spec.hold_seconds,
            actor=actor,
        )
        try:
            await self.bus.publish(RELEASE_STARTED, started, timeout=5.0)
        except Exception as exc:
            # Nobody would ever decide on this release: take it back.
            await self._abandon(alias, release_id, current)
            raise Unavailable(
                f"could not announce release {release_id} of {alias!r} on NATS ({exc}); "
                "the route is unchanged, retry later"
            ) from exc
        await self._announce(route, meta.event_id)
        return route

    async def _abandon(self, alias: str, release_id: str, before: gateway_pb2.Route) -> None:
        def undo(current: gateway_pb2.Route | None) -> gateway_pb2.Route | None:
            if current is None or current.release_id != release_id:
                return None
            restored = gateway_pb2.Route()
            restored.CopyFrom(before)
            return restored

        await self._change(alias, undo)

    # -- reading -------------------------------------------------------------------------

    async def _with_history(self, route: gateway_pb2.Route) -> gateway_pb2.Release:
        release = gateway_pb2.Release(route=route, state=route_rules.state_of(route))
        if self.history is not None and route.release_id:
            record = await self.history.get(route.release_id)
            if record is not None:
                release.history.extend(record.history)
        return release

    async def get_release(self, request: gateway_pb2.GetReleaseRequest) -> gateway_pb2.Release:
        if request.alias:
            route = await self.cache.lookup(request.alias)
            if (
                route is not None
                and route.release_id
                and (not request.release_id or request.release_id == route.release_id)
            ):
                return await self._with_history(route)
        if request.release_id:
            for route in self.cache.routes():
                if route.release_id == request.release_id:
                    return await self._with_history(route)
            record = await self.history.get(request.release_id) if self.history else None
            if record is not None and (not request.alias or record.alias == request.alias):
                return from_record(record)
            raise NotFound(f"release {request.release_id!r} not found")
        if not request.alias:
            raise InvalidArgument("give an alias or a release_id")
        raise NotFound(f"alias {request.alias!r} has no release")

    async def list_releases(
        self, request: gateway_pb2.ListReleasesRequest
    ) -> gateway_pb2.ListReleasesResponse:
        limit = request.limit or DEFAULT_LIST_LIMIT
        if not request.alias:
            active = [r for r in self.cache.routes() if route_rules.is_running(r)]
            active.sort(key=lambda r: r.started_at.ToNanoseconds(), reverse=True)
            return gateway_pb2.ListReleasesResponse(
                releases=[
                    gateway_pb2.Release(route=r, state=route_rules.state_of(r))
                    for r in active[:limit]
                ]
            )
        releases: list[gateway_pb2.Release] = []
        route = await self.cache.lookup(request.alias)
        if (
            route is not None
            and route.release_id
            and (route_rules.is_running(route) or not request.active_only)
        ):
            releases.append(await self._with_history(route))
        if not request.active_only and self.history is not None:
            seen = {r.route.release_id for r in releases}
            for record in await self.history.list(request.alias, limit):
                if record.release_id not in seen:
                    releases.append(from_record(record))
        return gateway_pb2.ListReleasesResponse(releases=releases[:limit])

    async def watch(self, alias: str) -> AsyncIterator[gateway_pb2.Release]:
        """The release now, then on every change, until it has finished."""
        queue = self.cache.watch(alias)
        try:
            route = await self.cache.lookup(alias)
            if route is None or not route.release_id:
                raise NotFound(f"alias {alias!r} has no release")
            sent = route.revision
            yield gateway_pb2.Release(route=route, state=route_rules.state_of(route))
            while route_rules.is_running(route):
                route = await queue.get()
                if route.revision <= sent:
                    continue
                sent = route.revision
                yield gateway_pb2.Release(route=route, state=route_rules.state_of(route))
        finally:
            self.cache.unwatch(alias, queue)

    # -- manual commands -----------------------------------------------------------------

    async def pause(self, request: gateway_pb2.ReleaseCommandRequest) -> gateway_pb2.Release:
        return await self._set_paused(request, True)

    async def resume(self, request: gateway_pb2.ReleaseCommandRequest) -> gateway_pb2.Release:
        return await self._set_paused(request, False)

    async def _set_paused(
        self, request: gateway_pb2.ReleaseCommandRequest, paused: bool
    ) -> gateway_pb2.Release:
        _check_alias(request.alias)
        meta = new_meta(self.bus.service, self.bus.instance)
        reason = request.reason or ("paused by hand" if paused else "resumed by hand")
        route, _ = await self._change(
            request.alias,
            lambda cur: route_rules.set_paused(
                cur,
                request.alias,
                request.release_id,
                paused,
                event_id=meta.event_id,
                reason=reason,
                now=time.time(),
            ),
            event_id=meta.event_id,
        )
        assert route is not None
        kind = events_pb2.ReleasePaused if paused else events_pb2.ReleaseResumed
        event = kind(
            meta=meta,
            release_id=route.release_id,
            alias=route.alias,
            reason=reason,
            actor=_actor(),
        )
        await self._publish_reliably(RELEASE_PAUSED if paused else RELEASE_RESUMED, event)
        await self._announce(route, meta.event_id)
        return gateway_pb2.Release(route=route, state=route_rules.state_of(route))

    async def promote(self, request: gateway_pb2.ReleaseCommandRequest) -> gateway_pb2.Release:
        """The final promotion, whatever step the release is at (or just the next step)."""
        alias = request.alias
        _check_alias(alias)
        meta = new_meta(self.bus.service, self.bus.instance)
        decided: list[events_pb2.ReleasePromote] = []

        def mutate(current: gateway_pb2.Route | None) -> gateway_pb2.Route | None:
            route_rules.require_running(current, alias, request.release_id)
            assert current is not None
            step_index, weight, final = route_rules.next_step(current, one=request.one_step)
            event = events_pb2.ReleasePromote(
                meta=meta,
                release_id=current.release_id,
                alias=alias,
                candidate_version_id=current.candidate_version_id,
                stable_version_id=current.stable_version_id,
                step_index=step_index,
                weight=weight,
                final=final,
                reason=request.reason or ("stepped" if not final else "promoted") + " by hand",
                manual=True,
            )
            decided[:] = [event]
            return route_rules.apply_promote(current, event, time.time())

        route, _ = await self._change(alias, mutate, event_id=meta.event_id)
        assert route is not None
        assert decided
        await self._publish_reliably(RELEASE_PROMOTE, decided[0])
        await self._announce(route, meta.event_id)
        return gateway_pb2.Release(route=route, state=route_rules.state_of(route))

    async def rollback(self, request: gateway_pb2.ReleaseCommandRequest) -> gateway_pb2.Release:
        """All traffic back to the stable version of a running release, or with
        ``revert_promotion`` back to the version a completed promotion replaced."""
        alias = request.alias
        _check_alias(alias)
        meta = new_meta(self.bus.service, self.bus.instance)
        decided: list[events_pb2.ReleaseRollback] = []

        def mutate(current: gateway_pb2.Route | None) -> gateway_pb2.Route | None:
            if request.revert_promotion:
                route_rules.require_release(current, alias, request.release_id)
                assert current is not None
                if current.release_state != route_rules.PROMOTED or not current.previous_version_id:
                    raise FailedPrecondition(
                        f"release {current.release_id} of {alias!r} has no completed promotion "
                        f"to revert (it is {route_rules.state_of(current)})"
                    )
                stable, candidate = current.previous_version_id, current.stable_version_id
            else:
                route_rules.require_running(current, alias, request.release_id)
                assert current is not None
                stable, candidate = current.stable_version_id, current.candidate_version_id
            event = events_pb2.ReleaseRollback(
                meta=meta,
                release_id=current.release_id,
                alias=alias,
                candidate_version_id=candidate,
                stable_version_id=stable,
                reason=request.reason or "rolled back by hand",
                manual=True,
            )
            decided[:] = [event]
            return route_rules.apply_rollback(current, event, time.time())

        route, _ = await self._change(alias, mutate, event_id=meta.event_id)
        assert route is not None
        assert decided
        await self._publish_reliably(RELEASE_ROLLBACK, decided[0])
        await self._announce(route, meta.event_id)
        return gateway_pb2.Release(route=route, state=route_rules.state_of(route))

    # -- decisions from the monitor (at-least-once; deduplicated by event id) ------------

    async def on_promote(self, event: events_pb2.ReleasePromote, delivery: Delivery) -> None:
        route, changed = await self._apply_decision(
            event.alias,
            lambda current: (
                route_rules.apply_promote(current, event, time.time()) if current else None
            ),
            event.meta.event_id,
            delivery,
        )
        await self._after_decision(route, changed, event.meta.event_id, "promote", event.alias)

    async def on_rollback(self, event: events_pb2.ReleaseRollback, delivery: Delivery) -> None:
        route, changed = await self._apply_decision(
            event.alias,
            lambda current: (
                route_rules.apply_rollback(current, event, time.time()) if current else None
            ),
            event.meta.event_id,
            delivery,
        )
        await self._after_decision(route, changed, event.meta.event_id, "rollback", event.alias)

    async def _apply_decision(
        self, alias: str, mutate: Mutation, event_id: str, delivery: Delivery | None
    ) -> tuple[gateway_pb2.Route | None, bool]:
        """Apply a decision, waiting out a Redis outage rather than burning the event's
        redeliveries: decisions wait, nothing is lost."""
        deadline = time.monotonic() + DECISION_WAIT_S
        delay = 0.2
        while True:
            try:
                return await self._change(alias, mutate, event_id=event_id)
            except Unavailable as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("decision %s for %s waits for Redis: %s", event_id, alias, exc)
                if delivery is not None:
                    with contextlib.suppress(Exception):
                        await delivery.in_progress()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

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
        await self._announce(route, event_id)
