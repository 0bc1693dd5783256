"""Publishes ``adapter.retired`` for versions nothing routes to any more: the version a
final switch replaced once its hold time is over, and the route's ``retire_pending``
versions (a rolled-back candidate, a held version superseded before its hold ran out).

Every gateway replica runs this loop; a Redis lease decides which one publishes, the event
id is derived from (alias, release, version) so that a retry after a crash is stored once
by JetStream, and the route records the retirement by compare-and-set afterwards. A
version another alias still routes to (or holds) is settled without an event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid

from ftops.events.v1 import events_pb2
from ftops.gateway.v1 import gateway_pb2
from ftops_gateway import route_rules
from ftops_gateway.route_cache import RouteCache
from ftops_gateway.route_store import RouteStore
from ftops_runtime.bus import EventBus
from ftops_runtime.events import ADAPTER_RETIRED, new_meta
from ftops_runtime.tasks import cancel_and_wait

log = logging.getLogger(__name__)

_NAMESPACE = uuid.UUID("5b0c8a52-3f59-4f7e-9a43-0d1f4b7c2e61")


def retire_event_id(alias: str, release_id: str, version_id: str) -> str:
    return uuid.uuid5(_NAMESPACE, f"{alias}/{release_id}/{version_id}").hex


class Retirer:
    def __init__(
        self,
        store: RouteStore,
        cache: RouteCache,
        bus: EventBus,
        *,
        owner: str,
        interval_s: float = 1.0,
        lease_s: float = 30.0,
    ) -> None:
        self._store = store
        self._cache = cache
        self._bus = bus
        self._owner = owner
        self._interval_s = interval_s
        self._lease_s = lease_s
        self._task: asyncio.Task[None] | None = None
        self.retired: list[str] = []

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="retire-held-versions")

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            with contextlib.suppress(Exception):
                await self.run_once(time.time())

    async def run_once(self, now: float) -> int:
        """Retire every version that is due; returns how many this replica published."""
        done = 0
        routes = self._cache.routes()
        for route in routes:
            due = list(route.retire_pending)
            if route_rules.retire_due(route, now):
                due.append(route.previous_version_id)
            for version in due:
                try:
                    if await self._retire(route.alias, version, routes, now):
                        done += 1
                except Exception as exc:
                    log.warning("retiring %s of %s failed: %s", version, route.alias, exc)
        return done

    async def _retire(
        self, alias: str, version: str, routes: list[gateway_pb2.Route], now: float
    ) -> bool:
        cached = self._cache.get(alias)
        lease = f"retire:{alias}:{cached.release_id if cached else ''}:{version}"
        if not await self._store.claim(lease, self._owner, self._lease_s):
            return False
        fresh = await self._store.get(alias)
        if fresh is None:
            return False
        held = fresh.previous_version_id == version and route_rules.retire_due(fresh, now)
        if not held and version not in fresh.retire_pending:
            return False  # rolled back, re-promoted or already retired meanwhile
        in_use = version in (fresh.stable_version_id, fresh.candidate_version_id) or any(
            version in route_rules.versions_in_use(other)
            for other in routes
            if other.alias != alias
        )
        published = False
        if not in_use:
            why = (
                f"held {fresh.hold_seconds:.0f} s after {alias!r} switched to "
                f"{fresh.stable_version_id}"
                if held
                else f"{alias!r} no longer routes to it (release {fresh.release_id})"
            )
            event = events_pb2.AdapterRetired(
                meta=new_meta(self._bus.service, self._bus.instance),
                version_id=version,
                reason=why,
                release_id=fresh.release_id,
            )
            event.meta.event_id = retire_event_id(alias, fresh.release_id, version)
            await self._bus.publish(ADAPTER_RETIRED, event, timeout=5.0)
            published = True
            self.retired.append(version)
            log.info("retired %s: %s", version, why)

        def settle(cur: gateway_pb2.Route | None) -> gateway_pb2.Route | None:
            if held:
                return route_rules.mark_retired(cur, version)
            return route_rules.retired_pending(cur, version)

        updated, _ = await self._store.update(alias, settle)
        if updated is not None:
            self._cache.put(updated)
        return published
